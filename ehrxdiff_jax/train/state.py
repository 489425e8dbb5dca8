"""The training state pytree, the optimiser from the config, the EMA, and parameter surgery.

TrainState(step, params, opt_state, ema_params, rng):
  params      the full parameter dict of the objective (trainable and frozen parts, e.g. the LDM's
              {'unet', 'conditioner', 'vae'})
  opt_state   optax state of the trainable part only (`trainable_params(params, keys)`)
  ema_params  EMA copy of the parts named by the objective's `ema_keys` (the LDM: {'unet': ...});
              {} if none
  rng         base key; the step's randomness is `fold_in(rng, step)`, so a resumed run repeats it

Parameter surgery (the objectives' `init_from`): `replace_in_boxed` (inside init_params, keeps the
logical axes), `put_params` (placed arrays, keeps their shardings), `replace_part` (a part and its
EMA copy), `init_parts_from_run` (parts and EMA copies from another run's checkpoint).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array


def trainable_params(params: dict, keys: Sequence[str] | None) -> dict:
  """The trainable sub-dict (top-level keys of the parameter dict); None means all of them."""
  if keys is None:
    return dict(params)
  missing = [k for k in keys if k not in params]
  if missing:
    raise KeyError(f"trainable keys {missing} not in the parameter tree (have {sorted(params)})")
  return {k: params[k] for k in keys}


def merge_params(params: dict, trainable: dict) -> dict:
  return {**params, **trainable}


# ------------------------------------------------------------------ optimiser


SCHEDULES = ("constant", "cosine", "cosine_restarts")


def learning_rate_schedule(t) -> optax.Schedule:
  """The learning rate per optimisation step from config `train` (every trainer's one builder):

  constant         linear warm-up over `warmup_steps`, then `learning_rate`
  cosine           linear warm-up, then cosine decay to `end_lr` (default 0) at `num_steps`
  cosine_restarts  cycles of `restart_every` steps, each a linear warm-up over `warmup_steps` and a
                   cosine decay to `end_lr` over the rest of the cycle (the reference CLIP
                   pretraining: CosineAnnealingWarmupRestarts(first_cycle_steps=500,
                   warmup_steps=100, cycle_mult=1), stepped once per optimisation step)
  """
  lr, warm, total = float(t.learning_rate), int(t.warmup_steps), int(t.num_steps)
  end = float(t.get("end_lr", 0.0))
  if t.schedule == "constant":
    if warm <= 0:
      return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)],
                                [warm])
  if t.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0 if warm > 0 else lr, lr, max(warm, 0),
                                              max(total, warm + 1), end_value=end)
  if t.schedule == "cosine_restarts":
    every = int(t.get("restart_every", 0))
    if every <= max(warm, 0):
      raise ValueError(f"train.schedule='cosine_restarts' needs train.restart_every (the cycle "
                       f"length in steps, got {every}) greater than train.warmup_steps ({warm})")
    cycle = optax.warmup_cosine_decay_schedule(0.0 if warm > 0 else lr, lr, max(warm, 0), every,
                                               end_value=end)
    # The step modulo the cycle rather than optax.sgdr_schedule's finite list of cycles: the cycles
    # go on past num_steps, so a run resumed with a larger train.num_steps keeps restarting.
    return lambda step: cycle(jnp.asarray(step) % every)
  raise ValueError(f"unknown train.schedule {t.schedule!r}; expected one of {SCHEDULES}")


def make_optimizer(t, weight_decay_mask: Any = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (optionally after global-norm clipping) from config `train`; returns (tx, schedule)."""
  schedule = learning_rate_schedule(t)
  adamw = optax.adamw(schedule, b1=float(t.b1), b2=float(t.b2), eps=float(t.eps),
                      weight_decay=float(t.weight_decay), mask=weight_decay_mask)
  if float(t.grad_clip) > 0:
    return optax.chain(optax.clip_by_global_norm(float(t.grad_clip)), adamw), schedule
  return adamw, schedule


# ------------------------------------------------------------------ EMA


def ema_decay(max_decay: float, num_updates) -> jax.Array:
  """The LDM warm-up decay min(max_decay, (1 + n) / (10 + n)), n = updates so far (>= 1)."""
  n = jnp.asarray(num_updates, jnp.float32)
  return jnp.minimum(jnp.float32(max_decay), (1.0 + n) / (10.0 + n))


def ema_update(ema: Any, new: Any, decay) -> Any:
  return jax.tree.map(lambda e, p: e - (1.0 - decay) * (e - p.astype(e.dtype)), ema, new)


def ema_subset(params: dict, keys: Sequence[str]) -> dict:
  return {k: params[k] for k in keys}


# ------------------------------------------------------------------ parameter surgery


def _replace_leaves(tree: Any, new: Any, replace_leaf, where: str = "") -> Any:
  """A copy of `tree` with the leaves present in `new` (a nested dict, a subset of the tree)
  replaced by `replace_leaf(old leaf, new value)`; a sub-tree where the model has a leaf, an unknown
  name or another shape is an error naming the path."""
  if isinstance(new, Mapping):
    if not isinstance(tree, Mapping):
      raise ValueError(f"{where or '<root>'}: the checkpoint has a sub-tree where the model has a "
                       "leaf")
    out = dict(tree)
    for k, v in new.items():
      if k not in tree:
        raise ValueError(f"{where}/{k}: not a parameter of the model (have {sorted(tree)})")
      out[k] = _replace_leaves(tree[k], v, replace_leaf, f"{where}/{k}")
    return out
  model_shape = tuple((tree.value if isinstance(tree, nn.Partitioned) else tree).shape)
  if tuple(np.shape(new)) != model_shape:
    raise ValueError(f"{where}: shape {tuple(np.shape(new))} from the checkpoint, the model has "
                     f"{model_shape}")
  return replace_leaf(tree, new)


def _boxed_leaf(boxed, new):
  value = boxed.value if isinstance(boxed, nn.Partitioned) else boxed
  arr = jnp.asarray(new, value.dtype)
  return boxed.replace_boxed(arr) if isinstance(boxed, nn.Partitioned) else arr


def replace_in_boxed(boxed: Any, new: Any, where: str = "") -> Any:
  """The (possibly boxed) tree `boxed` with the leaves present in `new` (nested arrays, a subset)
  replaced, keeping the nn.Partitioned boxes (logical axes). Shapes must match exactly."""
  return _replace_leaves(boxed, new, _boxed_leaf, where)


def _placed_leaf(placed, new):
  value = np.asarray(new, dtype=placed.dtype)
  return jax.make_array_from_callback(value.shape, placed.sharding, lambda idx: value[idx])


def put_params(tree: Any, new: Any, where: str = "") -> Any:
  """A tree of placed (sharded) jax.Arrays with the leaves present in `new` (nested numpy, a subset)
  replaced by arrays of the same shape, dtype and sharding (every process holds the whole value)."""
  return _replace_leaves(tree, new, _placed_leaf, where)


def replace_part(state: TrainState, part: str | None, fn: Callable[[Any], Any]) -> TrainState:
  """state with params[part] (the whole params when part is None) := fn(params[part]); an EMA copy
  of that part, if any, gets the same values."""
  params = dict(state.params)
  if part is None:
    params = fn(params)
  else:
    params[part] = fn(params[part])
  ema = state.ema_params
  if ema and part is not None and part in ema:
    ema = {**ema, part: fn(ema[part])}
  return state.replace(params=params, ema_params=ema)


def init_parts_from_run(state: TrainState, path: str, parts: Sequence[str]) -> TrainState:
  """`parts` of params from the checkpoint at `path` (a run directory or one step folder; every leaf
  checked against the model's shapes); the EMA copies continue from the saved EMA where the
  checkpoint has one, not from the raw weights."""
  from ehrxdiff_jax.train.checkpoint import abstract_params, restore_run_params
  expected = {p: abstract_params(state.params[p]) for p in parts}
  saved = restore_run_params(path, expected=expected, ema=True)
  for part in parts:
    state = replace_part(state, part, lambda tree, p=part: put_params(tree, saved.params[p], p))
  ema = dict(state.ema_params or {})
  for part, tree in saved.ema_params.items():
    if part in ema:
      ema[part] = put_params(ema[part], tree, f"ema_params/{part}")
  return state.replace(ema_params=ema)
