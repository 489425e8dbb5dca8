"""`ehrxdiff sample`: predict the target X-rays of a dataset split with a trained or imported model.

    ehrxdiff sample --checkpoint RUN --data DATA --split test --out GEN
        [--sampler ddim|ddpm|dpmpp_2m --steps 100 --eta 1.0 --guidance 1.0 --seeds 0,1,2 --ema/--no-ema
         --events all|none
         --batch N --limit N --step N --overwrite] [--config.sample.x=y ...]
    ehrxdiff sample --from-torch EHRXDIFF.ckpt --config configs/ehrxdiff.py --data DATA --out GEN ...
    # multi-host without SLURM / TPU: add --coordinator HOST:PORT --num-processes N --process-id I

RUN is a training workdir (config.json + checkpoints/<step>/) or the output of `ehrxdiff convert`; its
saved config is used (--config.* overrides apply on top, e.g. the mesh). With --from-torch the weights come
from a published PyTorch checkpoint (interop.ehrxdiff.import_ehrxdiff; --config names the architecture).

Output (written under OUT.tmp-<pid> and renamed to OUT at the end):
    OUT/seed{S}/{sample_key}.png   8-bit grey prediction at the data's image size (--png-size to resize)
    OUT/grid.png                   previous | prediction per seed | target, for the first --grid samples
    OUT/manifest.json              config, checkpoint, sampler settings, seeds, keys, count, timings:
                                   load_s, first_call_s (the first call, compilation included), per_seed_s
                                   and images_per_s over the other calls, wall_s

The split is read in record order with a static batch shape (the last batch is padded and the padded
outputs dropped); the conditioner, every denoising step and the decoder run as one jitted program per
batch and seed. Sample i's noise depends only on (seed, sample key) (sample.per_sample_keys), so results
do not depend on --batch, the device count or the process count. A checkpoint whose config does not match
the data (image size, event dim, max events, schema version) is refused, naming both values.

Multi-host (several processes, one jax.distributed runtime, as `ehrxdiff train`; OUT on a filesystem all
of them share): every process reads the same global batches, feeds its own rows
(parallel.process_batch_rows) to the one jitted program and writes the PNGs of those rows into one
temporary directory named after process 0's pid; process 0 writes grid.png and manifest.json and renames
the directory once every process has written (barriers), and alone logs.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

from ehrxdiff_jax import outputs

log = logging.getLogger("ehrxdiff.sample")

GRID_SAMPLES = 8


class SampleError(RuntimeError):
  """A user-facing error of `ehrxdiff sample` (printed as 'error: ...', exit status 2)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  src = parser.add_argument_group("model")
  src.add_argument("--checkpoint", default=None, help="training workdir / `ehrxdiff convert` output (or its "
                   "checkpoints/ or checkpoints/<step> folder)")
  src.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  src.add_argument("--from-torch", default=None, metavar="FILE",
                   help="published EHRXDiff Lightning .ckpt instead of --checkpoint (needs --config)")
  src.add_argument("--config", default=None, help="config file for --from-torch (configs/*.py[:ARG])")
  src.add_argument("--vae-mismatch", choices=("error", "warn"), default="error",
                   help="--from-torch: when the conditioner's VAE copy differs from first_stage_model")
  data = parser.add_argument_group("data and output")
  data.add_argument("--data", required=True, help="dataset directory written by `ehrxdiff prepare`")
  data.add_argument("--split", default="test")
  data.add_argument("--out", required=True, help="output directory")
  data.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
  data.add_argument("--limit", type=int, default=None, help="only the first N samples of the split")
  data.add_argument("--png-size", type=int, default=None, help="resize PNGs to N x N (default: data size)")
  data.add_argument("--grid", type=int, default=GRID_SAMPLES, help="samples in grid.png (0: no grid)")
  smp = parser.add_argument_group("sampler (defaults: the config's `sample` fields)")
  smp.add_argument("--sampler", default=None, help="ddim | ddpm | dpmpp_2m")
  smp.add_argument("--steps", type=int, default=None)
  smp.add_argument("--eta", type=float, default=None, help="DDIM eta (1.0: the reference)")
  smp.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1: none)")
  smp.add_argument("--events", choices=("all", "none"), default="all",
                   help="none: every sample's events removed (the no-events condition the model was "
                   "trained with, sample.events_removed): the 'EHRXDiff (no events)' row")
  smp.add_argument("--seeds", default="0", help="comma-separated seeds, one image per sample and seed")
  smp.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="use the EMA UNet (default: config sample.use_ema)")
  smp.add_argument("--batch", type=int, default=None, help="global batch (default: sample.batch_size)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")
  # The same flags as `ehrxdiff train`.
  from ehrxdiff_jax import parallel
  parallel.add_distributed_arguments(parser)


# ----------------------------------------------------------------------------- checkpoint


def load_checkpoint_params(step_dir: str, cfg, sharding, use_ema) -> tuple[dict, bool, dict]:
  """(params with the EMA UNet swapped in when used, whether EMA was used, saved meta) of a checkpoint.

  Reads only the LDM's parameters (and the EMA UNet) through train.checkpoint.restore_run_params, placed
  with `sharding`, after checking every shape against the config's networks. use_ema: False, True (the
  config's default: falls back to the raw UNet with a warning) or 'explicit' (--ema: an error without one)."""
  from ehrxdiff_jax.interop.ehrxdiff import expected_ldm_params
  from ehrxdiff_jax.train.checkpoint import restore_run_params
  run = restore_run_params(step_dir, expected=expected_ldm_params(cfg), ema=bool(use_ema), sharding=sharding)
  has_ema = "unet" in run.ema_params
  if use_ema and not has_ema:
    if use_ema == "explicit":
      raise SampleError(f"--ema: the checkpoint {step_dir} has no EMA parameters (use --no-ema)")
    log.warning("the checkpoint has no EMA UNet; sampling with the raw parameters")
  params = dict(run.params)
  if has_ema:
    params["unet"] = run.ema_params["unet"]
  return params, has_ema, run.meta


# ----------------------------------------------------------------------------- data checks


def check_data(cfg, data_dir: str, split: str) -> dict:
  """The dataset manifest, after refusing a dataset the model cannot read (names both values)."""
  from ehrxdiff_jax import pipeline
  from ehrxdiff_jax import records as rec
  path = os.path.join(data_dir, rec.MANIFEST)
  if not os.path.exists(path):
    raise SampleError(f"{path} not found: {data_dir} is not a dataset written by `ehrxdiff prepare`")
  with open(path) as f:
    man = json.load(f)
  problems = []
  if man.get("schema_version") != rec.SCHEMA_VERSION:
    problems.append(f"schema version: the data has {man.get('schema_version')}, this code reads {rec.SCHEMA_VERSION}")
  if int(man.get("image_size", -1)) != int(cfg.data.image_size):
    problems.append(f"image size: the data has {man.get('image_size')}, the model's config has "
                    f"data.image_size={cfg.data.image_size}")
  streams = tuple(cfg.model.conditioner.cross_attention)
  if "table" in streams:
    if int(man.get("event_dim", -1)) != int(cfg.model.table_tower.event_dim):
      problems.append(f"event dim: the data has {man.get('event_dim')}, the model's config has "
                      f"model.table_tower.event_dim={cfg.model.table_tower.event_dim}")
    if "max_events" in man and int(man["max_events"]) != int(cfg.model.conditioner.max_events):
      problems.append(f"max events: the data has {man['max_events']}, the model's config has "
                      f"model.conditioner.max_events={cfg.model.conditioner.max_events}")
  if problems:
    raise SampleError(f"the model does not match the data in {data_dir}: " + "; ".join(problems))
  pipeline.read_manifest(data_dir)  # its own checks (same schema rule)
  if split not in man.get("splits", {}):
    raise SampleError(f"{data_dir}: no split {split!r}; splits are {sorted(man.get('splits', {}))}")
  return man


# ----------------------------------------------------------------------------- the model


def make_generate(cfg, sharding, **settings):
  """`sample.make_generate_fn` over this config's networks (Flax modules wrapped as plain functions)."""
  from ehrxdiff_jax import models
  from ehrxdiff_jax import sample as smp
  vae, unet, cond = models.build_vae(cfg), models.build_unet(cfg), models.build_conditioner(cfg)

  unet_apply = models.make_unet_apply(cfg, unet)

  def conditioner_apply(p, prev_image, prev_mean, events, event_mask):
    return cond.apply({"params": p}, prev_image, prev_mean, events, event_mask, deterministic=True)

  def vae_decode(p, z):
    return vae.apply({"params": p}, z, method=vae.decode)

  def vae_encode_mean(p, image):
    return vae.apply({"params": p}, image, method=vae.encode).mean

  return smp.make_generate_fn(unet_apply, conditioner_apply, vae_decode, cfg, vae_encode_mean=vae_encode_mean,
                              sharding=sharding, **settings)


def sampling_mesh(cfg):
  """The config's mesh when it fits the devices at hand, else every device on the 'data' axis.

  Sampling replicates the parameters and shards only the batch, so a run trained on another mesh (e.g.
  data=2 x fsdp=4 on 8 devices) samples on any number of devices."""
  import copy

  from ehrxdiff_jax import parallel
  try:
    return parallel.make_mesh(cfg)
  except ValueError as e:
    c = copy.deepcopy(cfg)
    c.mesh.shape = type(cfg.mesh.shape)(dict(data=-1, fsdp=1, tensor=1))
    log.info("sampling on a data-parallel mesh (%s)", e)
    return parallel.make_mesh(c)


def _parse_seeds(text: str) -> list[int]:
  try:
    seeds = [int(s) for s in str(text).split(",") if s.strip() != ""]
  except ValueError:
    raise SampleError(f"--seeds {text!r}: expected comma-separated integers") from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise SampleError(f"--seeds {text!r}: expected distinct integers")
  return seeds


def _barrier(name: str) -> None:
  """Waits for every process (nothing to wait for in a single-process run)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _local_rows(x, start: int, stop: int) -> np.ndarray:
  """Rows [start, stop) of a batch-sharded global array, read from this process's shards only (a
  multi-host array is not fully addressable, so it cannot be device_get whole)."""
  out = np.empty((stop - start,) + tuple(x.shape[1:]), x.dtype)
  filled = np.zeros(stop - start, bool)
  for shard in x.addressable_shards:
    a, b, _ = shard.index[0].indices(x.shape[0])
    if a < start or b > stop:
      raise ValueError(f"rows [{a}, {b}) of this process's shard are outside its batch rows [{start}, {stop})")
    out[a - start: b - start] = np.asarray(shard.data)
    filled[a - start: b - start] = True
  if not filled.all():
    raise ValueError(f"this process's shards do not cover its batch rows [{start}, {stop})")
  return out


def _pad(batch: dict, size: int) -> dict:
  n = len(batch["prev_image"])
  if n == size:
    return batch
  idx = np.concatenate([np.arange(n), np.full(size - n, n - 1)])
  return {k: np.asarray(v)[idx] for k, v in batch.items()}


# ----------------------------------------------------------------------------- run


def run(args) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  from ehrxdiff_jax import parallel
  from ehrxdiff_jax.interop.common import ConversionError
  from ehrxdiff_jax.train.checkpoint import CheckpointError
  try:
    # Before anything touches a device.
    parallel.init_distributed(args.coordinator, args.num_processes, args.process_id)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  import jax
  if jax.process_index() != 0:
    logging.getLogger().setLevel(logging.WARNING)  # process 0 logs for the run
  try:
    return _run(args)
  except (SampleError, ConversionError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


def _load_config(args):
  """(cfg, source description) from --checkpoint (its saved config) or --from-torch (--config)."""
  from ehrxdiff_jax.config_util import apply_override, load_config, read_saved_config
  from ehrxdiff_jax.train.checkpoint import resolve_step_dir
  if bool(args.checkpoint) == bool(args.from_torch):
    raise SampleError("pass exactly one of --checkpoint DIR and --from-torch FILE")
  if args.from_torch:
    if not args.config:
      raise SampleError("--from-torch needs --config (the architecture of the checkpoint)")
    if not os.path.exists(args.from_torch):
      raise SampleError(f"no checkpoint file at {args.from_torch}")
    cfg = load_config(args.config, args.config_overrides)
    return cfg, {"from_torch": os.path.abspath(args.from_torch), "config_file": args.config}
  if args.config:
    raise SampleError("--config is only for --from-torch; a checkpoint is sampled with its saved config "
                      "(change fields with --config.a.b=v)")
  workdir, step_dir, step = resolve_step_dir(args.checkpoint, args.step)
  try:
    cfg = read_saved_config(workdir)
  except FileNotFoundError as e:
    raise SampleError(str(e)) from None
  for item in args.config_overrides:
    apply_override(cfg, item)
  return cfg, {"checkpoint": step_dir, "workdir": workdir, "step": step}


def _run(args) -> int:
  import jax
  from jax.experimental import multihost_utils

  from ehrxdiff_jax import parallel, pipeline
  from ehrxdiff_jax import images_io
  from ehrxdiff_jax import sample as smp

  seeds = _parse_seeds(args.seeds)
  # Refuse a non-empty --out before anything slow happens.
  try:
    out = outputs.check_writable(args.out, args.overwrite, allow_empty=True)
  except FileExistsError as e:
    raise SampleError(str(e)) from None

  cfg, source = _load_config(args)
  man = check_data(cfg, args.data, args.split)

  mesh = sampling_mesh(cfg)
  dp = parallel.data_parallel_size(mesh)
  batch_sharding = parallel.batch_sharding(mesh)
  replicated = parallel.replicated(mesh)
  use_ema = cfg.sample.use_ema if args.ema is None else ("explicit" if args.ema else False)

  t_load = time.perf_counter()
  if args.from_torch:
    from ehrxdiff_jax.interop.ehrxdiff import load_torch_weights
    imported = load_torch_weights(args.from_torch, "ehrxdiff", cfg, vae_mismatch=args.vae_mismatch)
    params = dict(imported.params)
    used_ema = bool(use_ema) and imported.ema_params is not None
    if use_ema == "explicit" and imported.ema_params is None:
      raise SampleError(f"--ema: {args.from_torch} has no model_ema.* weights (use --no-ema)")
    if used_ema:
      params["unet"] = imported.ema_params["unet"]
    # Every process holds the same host copy: placed shard by shard, without the cross-process equality
    # check (an all-gather of every leaf) that device_put does for a multi-host sharding.
    params = jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), replicated, np.asarray(x).__getitem__),
                          params)
    source["import"] = {k: v for k, v in imported.info.items() if k != "fields"}
  else:
    params, used_ema, meta = load_checkpoint_params(source["checkpoint"], cfg, replicated, use_ema)
    source["meta"] = meta
  load_s = time.perf_counter() - t_load

  s = cfg.sample
  settings = dict(sampler=args.sampler or s.sampler, steps=int(args.steps or s.steps),
                  eta=float(s.eta if args.eta is None else args.eta),
                  guidance_scale=float(s.guidance_scale if args.guidance is None else args.guidance))
  try:
    generate = make_generate(cfg, batch_sharding, **settings)
  except ValueError as e:
    raise SampleError(str(e)) from None
  settings = dict(generate.settings)
  batch_size = int(args.batch or s.batch_size)
  if batch_size < 1:
    raise SampleError(f"--batch {batch_size}: must be positive")
  if batch_size % dp:
    padded = -(-batch_size // dp) * dp
    log.info("batch %d rounded up to %d (a multiple of the %d data-parallel devices)", batch_size, padded, dp)
    batch_size = padded
  rows = parallel.process_batch_rows(mesh, batch_size)
  main_process = jax.process_index() == 0

  total = int(man["splits"][args.split]["samples"])
  count = total if args.limit is None else max(0, min(total, int(args.limit)))
  if count == 0:
    raise SampleError(f"split {args.split!r} of {args.data} has no samples to generate (limit {args.limit})")
  config_data = dict(image_size=int(cfg.data.image_size), w_null=False, augment_target=False,
                     cached_latents=False, num_workers=0)
  if cfg.data.get("labels", None):
    config_data["labels"] = cfg.data.labels
  # Every process reads the whole global batches (keys and grid rows) and feeds only its own rows.
  loader = pipeline.make_loader(args.data, args.split, global_batch_size=batch_size, config_data=config_data,
                                shuffle=False, num_epochs=1, drop_remainder=False, process_index=0,
                                process_count=1, max_events=int(cfg.model.conditioner.max_events))

  # One temporary directory for all processes, named after process 0's pid.
  tmp_dir = outputs.temporary_path(out, int(multihost_utils.broadcast_one_to_all(np.int32(os.getpid()))))
  with outputs.atomic_directory(out, args.overwrite, allow_empty=True, tmp=tmp_dir, owner=main_process) as tmp:
    if main_process:
      for sd in seeds:
        os.makedirs(os.path.join(tmp, f"seed{sd}"))
    _barrier("ehrxdiff sample: output directory created")
    n_batches = -(-count // batch_size)
    bar = None
    if not args.no_progress and main_process:
      from tqdm import tqdm
      bar = tqdm(total=count * len(seeds), desc="sample", unit="img", dynamic_ncols=True)
    timings = {sd: 0.0 for sd in seeds}
    first_call_s = None
    grid_rows: dict = {"prev": [], "target": [], "keys": [], **{sd: [] for sd in seeds}}
    keys_written: list[str] = []
    done = 0
    t_all = time.perf_counter()
    for bi, host in enumerate(loader):
      if done >= count:
        break
      n = min(len(host["prev_image"]), count - done)
      host = {k: np.asarray(v)[:n] for k, v in host.items()}
      if args.events == "none":
        host["events"], host["event_mask"] = smp.events_removed(host["events"], host["event_mask"], cfg)
      keys = [k.decode() if isinstance(k, (bytes, np.bytes_)) else str(k) for k in host["key"]]
      padded = _pad(host, batch_size)
      local = parallel.to_global({k: padded[k][rows[0]:rows[1]] for k in smp.BATCH_KEYS if k in padded}, mesh,
                                 batch_size)
      for sd in seeds:
        rng = smp.per_sample_keys(sd, [k.encode() for k in keys] + [keys[-1].encode()] * (batch_size - n))
        rng = jax.make_array_from_process_local_data(batch_sharding, rng[rows[0]:rows[1]], (batch_size,))
        t0 = time.perf_counter()
        images = generate(params, local, rng)
        mine = _local_rows(images, *rows)
        dt = time.perf_counter() - t0
        if first_call_s is None:
          first_call_s = dt  # includes compilation
        else:
          timings[sd] += dt
        for i in range(rows[0], min(rows[1], n)):  # padded rows are dropped
          name = images_io.png_name(keys[i]) + ".png"
          images_io.write_png(os.path.join(tmp, f"seed{sd}", name), mine[i - rows[0]], args.png_size)
        if len(grid_rows[sd]) < args.grid:  # the same on every process: all take part in the gather
          grid = multihost_utils.process_allgather(images, tiled=True)[:n]
          grid_rows[sd].extend(grid[: args.grid - len(grid_rows[sd])])
        if bar is not None:
          bar.update(n)
      if len(grid_rows["prev"]) < args.grid:
        m = args.grid - len(grid_rows["prev"])
        grid_rows["prev"].extend(host["prev_image"][:m])
        grid_rows["target"].extend(host["target_image"][:m])
        grid_rows["keys"].extend(keys[:m])
      keys_written.extend(keys)
      done += n
    if bar is not None:
      bar.close()
    wall = time.perf_counter() - t_all
    _barrier("ehrxdiff sample: every image written")
    if not main_process:
      return 0
    if args.grid > 0 and grid_rows["prev"]:
      columns = [("previous", np.stack(grid_rows["prev"]))]
      columns += [(f"pred s{sd}" if len(seeds) > 1 else "predicted", np.stack(grid_rows[sd])) for sd in seeds]
      columns.append(("target", np.stack(grid_rows["target"])))
      images_io.write_grid(os.path.join(tmp, "grid.png"), columns, row_labels=grid_rows["keys"])
    calls = n_batches * len(seeds)
    timed_calls = calls - 1
    timed_images = done * len(seeds) - min(batch_size, done)
    steady = sum(timings.values())
    manifest = {
        "count": done, "split": args.split, "data": os.path.abspath(args.data), "seeds": seeds,
        "keys": keys_written,
        "source": source, "used_ema": bool(used_ema),
        "events": args.events,
        "sampler": {**settings, "batch_size": batch_size, "devices": int(mesh.devices.size),
                    "data_parallel": dp, "processes": jax.process_count()},
        "timings": {
            "load_s": round(load_s, 3), "first_call_s": round(first_call_s or 0.0, 3), "wall_s": round(wall, 3),
            "per_seed_s": {str(k): round(v, 3) for k, v in timings.items()},
            "images_per_s": (round(timed_images / steady, 4) if timed_calls > 0 and steady > 0 else None),
            "images_per_s_incl_compile": round(done * len(seeds) / wall, 4) if wall > 0 else None,
        },
        "png_size": args.png_size or int(cfg.data.image_size),
        "config": json.loads(cfg.to_json_best_effort(sort_keys=True)),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tmp_m = os.path.join(tmp, "manifest.json")
    with open(tmp_m, "w") as f:
      json.dump(manifest, f, indent=1, default=str)
  ips = manifest["timings"]["images_per_s"]
  log.info("wrote %d images x %d seeds to %s in %.1fs (%s images/s after compilation)", done, len(seeds), out,
           wall, "n/a" if ips is None else f"{ips:.2f}")
  return 0
