"""What a trainer is: an objective (parameters, loss, what trains, eval metrics) plus a config.

The loop (`train/loop.py`) owns everything else: the mesh, shardings, optimiser, EMA, gradient
accumulation, checkpoints, resume, logging. A new trainer is one file with a subclass of `Objective`
and a `make_objective(cfg)` function, registered by name in `ehrxdiff_jax/train/__init__.py`.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np


class Objective:
  """Base class. Subclasses set `name`, `trainable_keys`, `ema_keys` and implement `init_params`/`loss`.

  Parameters are one dict keyed by part (e.g. {'unet', 'conditioner', 'vae'}). `trainable_keys` names
  the top-level parts the optimiser updates (None: all); the rest is frozen (no gradients, no optimiser
  state). `ema_keys` names the parts that get an EMA copy.
  """
  name: str = "objective"
  trainable_keys: Sequence[str] | None = None
  ema_keys: Sequence[str] = ()
  # True: `loss` also receives `step` (the optimisation step, a traced int), e.g. to switch a GAN on.
  uses_step: bool = False

  def __init__(self, cfg):
    self.cfg = cfg

  # -- required -------------------------------------------------------------------------------
  def init_params(self, rng: jax.Array) -> dict:
    """Boxed (logically partitioned) parameter dict; traced under eval_shape and jit, never eager."""
    raise NotImplementedError

  def loss(self, params: dict, batch: dict, rng: jax.Array, train: bool) -> tuple[jax.Array, dict]:
    """(scalar loss, dict of scalar metrics) for one (micro-)batch of global arrays; params unboxed."""
    raise NotImplementedError

  # -- optional -------------------------------------------------------------------------------
  def eval_metrics(self, params: dict, ema_params: dict, batch: dict, rng: jax.Array) -> dict:
    """Scalar metrics on one validation batch (averaged over batches by the loop)."""
    loss, aux = self.loss(params, batch, rng, train=False)
    return {"loss": loss, **aux}

  def dummy_batch(self, batch_size: int) -> dict:
    """Numpy batch with the shapes and dtypes the objective consumes (synthetic data, benchmarks)."""
    from ehrxdiff_jax.models import dummy_batch
    return {k: np.asarray(v) for k, v in dummy_batch(self.cfg, batch_size).items()}

  def post_update(self, params: dict) -> dict:
    """Applied to the parameters inside the step after each update (e.g. clamping CLIP's logit scale)."""
    return params

  def validation_report(self, trainer, state, batches) -> tuple[dict, dict]:
    """Extra validation output beyond the averaged `eval_metrics`: (scalars, {tag: HWC image in [0, 1]}).

    Called by the loop at each validation with a fresh iterator over the validation split (host side).
    """
    return {}, {}

  def weight_decay_mask(self) -> Any:
    """An optax mask for weight decay (None: every trainable parameter decays, as torch AdamW)."""
    return None
