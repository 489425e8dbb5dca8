"""`ehrxdiff train`: train the objective named by `c.train.objective` (ldm | clip | vae | table_classifier |
image_classifier).

    ehrxdiff train --config configs/tiny.py --data DIR --workdir DIR [--force] [--config.x=y ...]
    # multi-host without SLURM / TPU: add --coordinator HOST:PORT --num-processes N --process-id I

A second invocation with the same workdir resumes from the latest complete checkpoint (the model, the
optimiser, the EMA and the data iterator). The resolved config is saved as WORKDIR/config.json once every
check has passed; a workdir holding a run of a different config, or checkpoints without a config.json, is
refused unless --force (fields in `RESUMABLE_KEYS` may change). A checkpoint without its data iterator
state is refused unless --restart-data.
"""
from __future__ import annotations

import json
import logging
import os
import sys

from ehrxdiff_jax.errors import UserError

# Config fields that may differ between a run and its resumption (they do not change the model or the
# optimisation trajectory up to the point of resumption).
RESUMABLE_KEYS = ("train.num_steps", "train.log_every", "train.eval_every", "train.eval_batches",
                  "train.ckpt_every", "train.keep_checkpoints", "train.sample_every", "data.dir",
                  "data.num_workers", "data.read_threads", "data.prefetch", "sample", "mesh")

log = logging.getLogger("ehrxdiff.train")


def add_arguments(parser):
  parser.add_argument("--config", required=True, help="config file (configs/*.py), optionally FILE:ARG")
  parser.add_argument("--data", default=None, help="dataset directory written by `ehrxdiff prepare` "
                      "(default: config data.dir); 'synthetic' trains on random in-memory batches")
  parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard, config.json")
  parser.add_argument("--force", action="store_true", help="reuse a workdir that holds a different config")
  parser.add_argument("--restart-data", action="store_true",
                      help="resume a checkpoint that has no data iterator state, reading the data from the "
                           "beginning (the resume is then not exact)")
  parser.add_argument("--steps", type=int, default=None, help="stop at this step (default train.num_steps)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  from ehrxdiff_jax import parallel
  parallel.add_distributed_arguments(parser)


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def config_dict(cfg) -> dict:
  return json.loads(cfg.to_json_best_effort(sort_keys=True))


def config_differences(old: dict, new: dict) -> list[str]:
  """Keys whose values differ, ignoring RESUMABLE_KEYS (and everything under them)."""
  a, b = _flatten(old), _flatten(new)
  diffs = []
  for k in sorted(set(a) | set(b)):
    if any(k == r or k.startswith(r + ".") for r in RESUMABLE_KEYS):
      continue
    if a.get(k, "<absent>") != b.get(k, "<absent>"):
      diffs.append(f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}")
  return diffs


def check_workdir(workdir: str, cfg, force: bool) -> None:
  """Refuses (unless force) a workdir whose config.json is a different config, is not readable, or is
  missing beside checkpoints (a resume under an unknown config). Writes nothing: see write_config."""
  path = os.path.join(workdir, "config.json")
  if force:
    return
  if not os.path.exists(path):
    ckpt = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt)):
      raise UserError(f"{workdir} holds checkpoints but no config.json, so their config cannot be compared with "
                      "this one: use another --workdir, or --force to resume them under this config")
    return
  try:
    with open(path) as f:
      old = json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not valid JSON ({e}), so the run's config cannot be compared with this one: "
                    "restore it, use another --workdir, or --force to replace it with this config") from None
  diffs = config_differences(old, config_dict(cfg))
  if diffs:
    raise UserError(f"{workdir} holds a run of a different config ({len(diffs)} differences: "
                    + "; ".join(diffs[:8]) + ("; ..." if len(diffs) > 8 else "")
                    + "). Use another --workdir, or --force to train there anyway.")


def write_config(workdir: str, cfg) -> None:
  """WORKDIR/config.json (atomically): called once the run is accepted."""
  path = os.path.join(workdir, "config.json")
  os.makedirs(workdir, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(config_dict(cfg), f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def check_event_dim(cfg, objective, manifest: dict, data_dir: str) -> None:
  """The dataset's event vectors must have the width the model's table tower takes (checked before the
  step compiles, which is where a mismatch would otherwise surface)."""
  events = objective.dummy_batch(1).get("events")
  if events is not None and int(manifest.get("event_dim", -1)) != events.shape[-1]:
    raise UserError(f"{os.path.join(data_dir, 'manifest.json')}: the data's events have event_dim "
                    f"{manifest.get('event_dim')}, the model takes model.table_tower.event_dim={events.shape[-1]}: "
                    f"pass --config.model.table_tower.event_dim={manifest.get('event_dim')} or prepare the data with "
                    f"--event-dim {events.shape[-1]}")


def make_data(cfg, objective, mesh, data_dir: str):
  """(train iterator, eval iterator factory or None, schema note) for this process."""
  from ehrxdiff_jax import parallel
  from ehrxdiff_jax.train.loop import SyntheticBatches
  b = int(cfg.train.batch_size)
  if data_dir == "synthetic":
    rows = parallel.process_batch_rows(mesh, b)
    template = objective.dummy_batch(1)
    train = SyntheticBatches(template, b, seed=int(cfg.data.shuffle_seed), rows=rows)
    return train, (lambda: SyntheticBatches(template, b, seed=10_000 + int(cfg.data.shuffle_seed), rows=rows))
  from ehrxdiff_jax import pipeline
  manifest = pipeline.read_manifest(data_dir)  # refuses a schema version mismatch, naming both versions
  objective.check_data(data_dir, cfg.data.train_split)
  max_events = int(cfg.model.conditioner.max_events)
  train = iter(pipeline.make_loader(data_dir, cfg.data.train_split, global_batch_size=b, config_data=cfg.data,
                                    seed=int(cfg.data.shuffle_seed), shuffle=True, max_events=max_events))
  eval_fn = None
  valid = cfg.data.valid_split
  if valid and valid in manifest.get("splits", {valid: None}) and int(cfg.train.eval_every) > 0:
    # Validation measures the model on the real pairs: no w_null samples, no target augmentation.
    valid_data = cfg.data.copy_and_resolve_references()
    valid_data.w_null = False
    valid_data.augment_target = False

    def eval_fn():
      return iter(pipeline.make_loader(data_dir, valid, global_batch_size=b, config_data=valid_data, seed=0,
                                       shuffle=False, num_epochs=1, max_events=max_events))
  return train, eval_fn


def check_cached_latents(cfg, data_dir: str, state) -> None:
  """Cached latents must come from the model's own frozen VAE (it decodes the samples): the dataset's
  latent shape and, where the VAE parameters are readable on this process, their fingerprint."""
  import jax
  from data_prep.latents import check_dataset_latents
  from ehrxdiff_jax import pipeline
  vae = state.params.get("vae")
  readable = vae is not None and all(x.is_fully_addressable for x in jax.tree.leaves(vae))
  check_dataset_latents(pipeline.read_manifest(data_dir), cfg, jax.device_get(vae) if readable else None)


def run(args) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
  from ehrxdiff_jax import parallel
  parallel.init_distributed(args.coordinator, args.num_processes, args.process_id)

  import jax
  from ehrxdiff_jax.config_util import load_config
  from ehrxdiff_jax.train import make_objective
  from ehrxdiff_jax.train.checkpoint import Checkpointer
  from ehrxdiff_jax.train.loop import NonFiniteLoss, Trainer, fit

  cfg = load_config(args.config, args.config_overrides)
  if args.data:
    cfg.data.dir = args.data
  data_dir = cfg.data.dir
  if not data_dir:
    raise UserError("no data: pass --data DIR (or --data synthetic)")
  workdir = os.path.abspath(args.workdir)
  check_workdir(workdir, cfg, args.force)
  try:  # clear errors before anything compiles; the messages name the config keys
    mesh = parallel.make_mesh(cfg)
    parallel.check_batch(cfg, mesh)
    objective = make_objective(cfg)
  except ValueError as e:
    raise UserError(f"{args.config}: {e}") from e
  if data_dir != "synthetic":
    from ehrxdiff_jax import pipeline
    check_event_dim(cfg, objective, pipeline.read_manifest(data_dir), data_dir)
  trainer = Trainer(cfg, objective, mesh)
  if jax.process_index() == 0:
    log.info("%s: %s; %d parameters (%d trainable); global batch %d (%d x %d accumulation)", cfg.name,
             parallel.describe(mesh), trainer.param_count(), trainer.param_count(True), trainer.global_batch,
             trainer.global_batch // trainer.grad_accum, trainer.grad_accum)

  train_iter, eval_fn = make_data(cfg, objective, mesh, data_dir)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(cfg.train.keep_checkpoints))
  try:
    state = _start_state(cfg, args, trainer, ckpt, train_iter, data_dir)
    meta = {"config_name": cfg.name, "objective": cfg.train.objective}
    hooks = []
    if int(cfg.train.sample_every) > 0:
      batches = eval_fn() if eval_fn is not None else make_data(cfg, objective, mesh, data_dir)[0]
      hook = objective.sample_hook(trainer, batches, int(cfg.train.sample_every))
      if hook is not None:
        hooks.append(hook)
    if jax.process_index() == 0:
      write_config(workdir, cfg)  # the run is accepted
    state = fit(trainer, state, train_iter, num_steps=args.steps, workdir=workdir, checkpointer=ckpt,
                eval_iter_fn=eval_fn, meta=meta, progress=not args.no_progress, hooks=tuple(hooks))
  except NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr)
    return 3
  finally:
    ckpt.close()
  log.info("stopped at step %d; checkpoints in %s", int(jax.device_get(state.step)), ckpt.directory)
  return 0


def _start_state(cfg, args, trainer, ckpt, train_iter, data_dir: str):
  """The latest checkpoint's state (and the iterator's), or a fresh one initialised as the config says;
  cached latents checked against the state's VAE."""
  latest = ckpt.latest_step()
  if latest is not None:
    state, _ = ckpt.restore(trainer.abstract_state(), latest, data_iter=train_iter, restart_data=args.restart_data)
    log.info("resumed from step %d (%s)", latest, ckpt.directory)
  else:
    state = trainer.init_state()
    if cfg.train.init_from:
      state = trainer.objective.init_from(state, cfg.train.init_from, trainer)
    if cfg.train.get("vae_from"):
      from ehrxdiff_jax.train.vae import vae_init_state
      state = vae_init_state(state, cfg.train.vae_from)
  if cfg.data.cached_latents and data_dir != "synthetic":
    try:
      check_cached_latents(cfg, data_dir, state)
    except ValueError as e:
      raise UserError(str(e)) from e
  return state

