"""Orbax checkpoints of the training state, the data iterator state and a small JSON record.

Layout: WORKDIR/checkpoints/<step>/{state, data, meta}. Saves are asynchronous (the device->host
copy happens in `save`, the writing in a background thread); at most `keep` are kept. Orbax writes
every checkpoint into `<step>.orbax-checkpoint-tmp-*` and renames it only once all items are
written, so a crash in the middle of a save leaves a temporary directory that `latest_step` ignores
(and the next manager removes): it never restores as if complete.

Restoring goes through an abstract target whose leaves carry the *current* mesh's shardings, so a
checkpoint saved on 8 devices restores on 1 or 4 (or another mesh shape).

Reading another run's parameters (initialising from a CLIP / VAE / LDM run, sampling, `ehrxdiff
convert` output) goes through one function, `restore_run_params`: a partial restore of `params`
(and optionally `ema_params`) of one step, as host numpy arrays or placed with a sharding, checked
against expected shapes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from ehrxdiff_jax.errors import UserError

log = logging.getLogger(__name__)


def _grain_args():
  import grain
  ckpt = grain.checkpoint
  return ckpt.CheckpointSave, ckpt.CheckpointRestore, ckpt.CheckpointHandler


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with the items this project saves."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    _, _, grain_handler = _grain_args()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep and keep > 0 else None, save_interval_steps=1, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain_handler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    self.manager.reload()
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    self.manager.reload()
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iter: Any = None, meta: dict | None = None) -> bool:
    """Starts an (asynchronous) save of `state` (+ iterator state, + JSON `meta`) at `step`."""
    save_cls, _, _ = _grain_args()
    items = {"state": ocp.args.StandardSave(state),
             "meta": ocp.args.JsonSave(dict(meta or {}, step=int(step)))}
    if data_iter is not None and hasattr(data_iter, "get_state"):
      items["data"] = save_cls(data_iter)
    return self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)

  def delete(self, step: int) -> None:
    self.manager.delete(int(step))

  def restore(self, abstract_state: Any, step: int | None = None, data_iter: Any = None,
              restart_data: bool = False) -> tuple[Any, dict]:
    """(state, meta) of `step` (default: the latest complete one), placed as `abstract_state` says.

    `abstract_state`: a pytree of jax.ShapeDtypeStruct with `sharding` set (see `Trainer.abstract_state`).
    `data_iter`, when given, has its state set to the saved one (in place); a checkpoint without that
    state is refused (the resume would not be exact) unless `restart_data`, which reads the data from the
    beginning instead.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    _, restore_cls, _ = _grain_args()
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    saved_items = self._require_items(step, ("state", "meta"))
    if data_iter is not None and hasattr(data_iter, "set_state"):
      if "data" in saved_items:
        items["data"] = restore_cls(data_iter)
      elif restart_data:
        log.warning("checkpoint %d has no data iterator state; the data restart from the beginning", step)
      else:
        raise CheckpointError(
            f"checkpoint {os.path.join(self.directory, str(step))} has no data/ item (the data iterator state), so "
            "the resume would not continue the data where the run stopped: pass --restart-data to resume with "
            "the data read from the beginning, or use another --workdir")
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out["state"], dict(out["meta"] or {})

  def _require_items(self, step: int, needed: Sequence[str]) -> set[str]:
    """The items saved in checkpoint `step`; CheckpointError naming the first of `needed` that is missing."""
    path = os.path.join(self.directory, str(step))
    items = set(os.listdir(path)) if os.path.isdir(path) else set()
    for item in needed:
      if item not in items:
        raise CheckpointError(f"checkpoint {path} has no {item}/ item: it is damaged or was not written by "
                              f"`ehrxdiff train`; move {path} away to resume from the checkpoint before it, or "
                              "use another --workdir")
    return items

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


# ------------------------------------------------------------- reading another run's parameters


class CheckpointError(UserError):
  """A run directory or checkpoint that cannot be read as asked; the message names the path and the problem."""


def resolve_step_dir(path: str, step: int | None = None) -> tuple[str, str, int]:
  """A run directory (WORKDIR with checkpoints/<step>/), its checkpoints/ folder or one step folder
  -> (workdir, step folder, step): `step`, or the latest complete one. Unfinalised saves
  (`<step>.orbax-checkpoint-tmp-*`) are not steps."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise CheckpointError(f"no checkpoint directory at {path}")
  if os.path.isdir(os.path.join(path, "state")) and os.path.basename(path).isdigit():
    if step is not None and int(os.path.basename(path)) != step:
      raise CheckpointError(f"step {step} asked for, but {path} is step {os.path.basename(path)}")
    return os.path.dirname(os.path.dirname(path)), path, int(os.path.basename(path))
  ckpt = os.path.join(path, "checkpoints")
  ckpt = ckpt if os.path.isdir(ckpt) else path
  workdir = os.path.dirname(ckpt) if os.path.basename(ckpt) == "checkpoints" else path
  steps = sorted(int(d) for d in os.listdir(ckpt)
                 if d.isdigit() and os.path.isdir(os.path.join(ckpt, d, "state")))
  if not steps:
    raise CheckpointError(f"no complete checkpoint under {ckpt}")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise CheckpointError(f"no checkpoint of step {step} under {ckpt}; steps: {steps}")
  return workdir, os.path.join(ckpt, str(step)), step


class _NoItemMetadataWarning(logging.Filter):
  """Reading the 'state' item of a CheckpointManager step on its own, orbax warns that
  `state/_CHECKPOINT_METADATA` is absent: that file lives one level up, in the step directory.
  Expected; dropped so that users see no false alarm."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Metadata file does not exist")


@contextlib.contextmanager
def _item_read():
  logger, quiet = logging.getLogger("absl"), _NoItemMetadataWarning()
  logger.addFilter(quiet)
  try:
    yield ocp.PyTreeCheckpointer()
  finally:
    logger.removeFilter(quiet)


def saved_state_tree(step_dir: str) -> dict:
  """The saved TrainState's structure (nested dicts of orbax ArrayMetadata: shape, dtype); reads no
  array."""
  with _item_read() as checkpointer:
    tree = checkpointer.metadata(os.path.join(step_dir, "state"))
  for attr in ("item_metadata", "tree"):   # the metadata object differs between orbax versions
    tree = getattr(tree, attr, tree)
  tree = dict(tree)
  if not isinstance(tree.get("params"), dict):
    raise CheckpointError(f"{step_dir} is not a training-state checkpoint (no 'params'; has "
                          f"{sorted(tree)})")
  return tree


def saved_param_parts(path: str, step: int | None = None) -> set[str]:
  """The top-level parameter parts of a run's checkpoint (e.g. {'unet', 'conditioner', 'vae'})."""
  return set(saved_state_tree(resolve_step_dir(path, step)[1])["params"])


def shape_problems(saved: Any, expected: Any, where: str) -> list[str]:
  """Each leaf missing from `saved`, not in `expected`, or of another shape, named by its path."""
  s = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
  e = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
  out = [f"{where}{k}: missing in the checkpoint (expected shape {tuple(e[k].shape)})"
         for k in sorted(set(e) - set(s))]
  out += [f"{where}{k}: in the checkpoint but not in the model" for k in sorted(set(s) - set(e))]
  out += [f"{where}{k}: checkpoint {tuple(s[k].shape)}, model {tuple(e[k].shape)}"
          for k in sorted(set(s) & set(e)) if tuple(s[k].shape) != tuple(e[k].shape)]
  return out


def abstract_params(tree: Any) -> Any:
  """ShapeDtypeStructs of a tree of arrays (the `expected` of restore_run_params)."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), tree)


@dataclasses.dataclass
class RunParams:
  params: dict           # the restored parts of `params`
  ema_params: dict       # the saved EMA copies of those parts (only when asked for; {} if none)
  meta: dict             # the step's JSON record (Checkpointer.save `meta`)
  step: int
  step_dir: str
  workdir: str


def restore_run_params(path: str, step: int | None = None, *, parts: Sequence[str] | None = None,
                       expected: dict | None = None, ema: bool = False, sharding=None) -> RunParams:
  """The parameters of a run's checkpoint, without its optimiser state (orbax partial restore).

  path: a run directory, its checkpoints/ folder or one step folder (resolve_step_dir); step:
  default the latest. parts: the top-level parts of `params` to read (default all); each must be
  present. expected: {part: tree of ShapeDtypeStruct} (e.g. `abstract_params` of the model's tree):
  reads those parts and refuses any missing, extra or mis-shaped leaf, naming every problem. ema:
  also read the saved `ema_params` of those parts, where the run has them. sharding: None gives host
  numpy arrays (any mesh the run was saved on); a jax Sharding places every leaf with it.
  """
  workdir, step_dir, step = resolve_step_dir(path, step)
  saved = saved_state_tree(step_dir)
  have = sorted(saved["params"])
  if expected is not None:
    parts = tuple(expected)
  parts = tuple(have if parts is None else parts)
  missing = [p for p in parts if p not in saved["params"]]
  if missing:
    raise CheckpointError(f"{step_dir} holds the parameters {have}, not {missing}")
  if expected is not None:
    problems = shape_problems({p: saved["params"][p] for p in parts}, expected, "params")
    if problems:
      raise CheckpointError(f"the checkpoint {step_dir} does not match the model ({len(problems)} "
                            "problems): " + "; ".join(problems[:8])
                            + ("; ..." if len(problems) > 8 else ""))
  item = {"params": {p: saved["params"][p] for p in parts}}
  saved_ema = saved.get("ema_params") or {}
  ema_parts = [p for p in parts if p in saved_ema] if ema else []
  if ema_parts:
    item["ema_params"] = {p: saved_ema[p] for p in ema_parts}
  item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding),
                      item)
  if sharding is None:
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  else:
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
  with _item_read() as checkpointer:
    restored = checkpointer.restore(
        os.path.join(step_dir, "state"),
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
  meta = {}
  meta_path = os.path.join(step_dir, "meta", "metadata")
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
  return RunParams(params=dict(restored["params"]),
                   ema_params=dict(restored.get("ema_params") or {}), meta=meta, step=step,
                   step_dir=step_dir, workdir=workdir)
