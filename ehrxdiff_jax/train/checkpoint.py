"""Orbax checkpoints of the training state, the data iterator state and a small JSON record.

Layout: WORKDIR/checkpoints/<step>/{state, data, meta}. Saves are asynchronous (the device->host copy
happens in `save`, the writing in a background thread); at most `keep` are kept. Orbax writes every
checkpoint into `<step>.orbax-checkpoint-tmp-*` and renames it only once all items are written, so a
crash in the middle of a save leaves a temporary directory that `latest_step` ignores (and the next
manager removes): it never restores as if complete.

Restoring goes through an abstract target whose leaves carry the *current* mesh's shardings, so a
checkpoint saved on 8 devices restores on 1 or 4 (or another mesh shape).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def _grain_args():
  import grain
  return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore, grain.checkpoint.CheckpointHandler


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
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(dict(meta or {}, step=int(step)))}
    if data_iter is not None and hasattr(data_iter, "get_state"):
      items["data"] = save_cls(data_iter)
    return self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state: Any, step: int | None = None, data_iter: Any = None) -> tuple[Any, dict]:
    """(state, meta) of `step` (default: the latest complete one), placed as `abstract_state` says.

    `abstract_state`: a pytree of jax.ShapeDtypeStruct with `sharding` set (see `Trainer.abstract_state`).
    `data_iter`, when given, has its state set to the saved one (in place).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    _, restore_cls, _ = _grain_args()
    items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    saved_items = self._items_of(step)
    if data_iter is not None and hasattr(data_iter, "set_state"):
      if "data" in saved_items:
        items["data"] = restore_cls(data_iter)
      else:
        log.warning("checkpoint %d has no data iterator state; the data restart from the beginning", step)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out["state"], dict(out["meta"] or {})

  def restore_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"] or {})

  def _items_of(self, step: int) -> set[str]:
    path = os.path.join(self.directory, str(step))
    return set(os.listdir(path)) if os.path.isdir(path) else set()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` (arrays or structs) carrying `shardings` (a matching tree)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
