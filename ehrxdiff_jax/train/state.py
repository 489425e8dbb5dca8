"""The training state pytree, the optimiser from the config, and the EMA.

TrainState(step, params, opt_state, ema_params, rng):
  params      the full parameter dict of the objective (trainable and frozen parts, e.g. the LDM's
              {'unet', 'conditioner', 'vae'})
  opt_state   optax state of the trainable part only (`trainable_params(params, keys)`)
  ema_params  EMA copy of the parts named by the objective's `ema_keys` (the LDM: {'unet': ...}); {} if none
  rng         base key; the step's randomness is `fold_in(rng, step)`, so a resumed run repeats it exactly
"""
from __future__ import annotations

from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
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
  """The learning rate per optimisation step from config `train` (the one builder every trainer uses):

  constant         linear warm-up over `warmup_steps`, then `learning_rate`
  cosine           linear warm-up, then cosine decay to `end_lr` (default 0) at `num_steps`
  cosine_restarts  cycles of `restart_every` steps, each a linear warm-up over `warmup_steps` and a cosine
                   decay to `end_lr` over the rest of the cycle (the reference CLIP pretraining:
                   CosineAnnealingWarmupRestarts(first_cycle_steps=500, warmup_steps=100, cycle_mult=1),
                   stepped once per optimisation step)
  """
  lr, warm, total = float(t.learning_rate), int(t.warmup_steps), int(t.num_steps)
  end = float(t.get("end_lr", 0.0))
  if t.schedule == "constant":
    if warm <= 0:
      return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)], [warm])
  if t.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0 if warm > 0 else lr, lr, max(warm, 0),
                                              max(total, warm + 1), end_value=end)
  if t.schedule == "cosine_restarts":
    every = int(t.get("restart_every", 0))
    if every <= max(warm, 0):
      raise ValueError(f"train.schedule='cosine_restarts' needs train.restart_every (the cycle length in steps, "
                       f"got {every}) greater than train.warmup_steps ({warm})")
    cycle = optax.warmup_cosine_decay_schedule(0.0 if warm > 0 else lr, lr, max(warm, 0), every, end_value=end)
    # The step modulo the cycle rather than optax.sgdr_schedule's finite list of cycles: the cycles go
    # on past num_steps, so a run resumed with a larger train.num_steps keeps restarting.
    return lambda step: cycle(jnp.asarray(step) % every)
  raise ValueError(f"unknown train.schedule {t.schedule!r}; expected one of {SCHEDULES}")


def make_optimizer(t, weight_decay_mask: Any = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (optionally after global-norm clipping) from config `train`; returns (tx, schedule)."""
  schedule = learning_rate_schedule(t)
  adamw = optax.adamw(schedule, b1=float(t.b1), b2=float(t.b2), eps=float(t.eps),
                      weight_decay=float(t.weight_decay), mask=weight_decay_mask)
  if float(t.grad_clip) > 0:
    return optax.chain(optax.clip_by_global_norm(float(t.grad_clip)), adamw), schedule
  return adamw, schedule


# ------------------------------------------------------------------ EMA


def ema_decay(max_decay: float, num_updates) -> jax.Array:
  """The LDM warm-up decay min(max_decay, (1 + n) / (10 + n)), n = number of updates so far (>= 1)."""
  n = jnp.asarray(num_updates, jnp.float32)
  return jnp.minimum(jnp.float32(max_decay), (1.0 + n) / (10.0 + n))


def ema_update(ema: Any, new: Any, decay) -> Any:
  return jax.tree.map(lambda e, p: e - (1.0 - decay) * (e - p.astype(e.dtype)), ema, new)


def ema_subset(params: dict, keys: Sequence[str]) -> dict:
  return {k: params[k] for k in keys}
