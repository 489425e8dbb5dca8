"""What a trainer is: an objective (parameters, loss, what trains, eval metrics) plus a config.

The loop (`train/loop.py`) owns everything else: the mesh, shardings, optimiser, EMA, gradient
accumulation, checkpoints, resume, logging. A new trainer is one file with a subclass of `Objective`
and a `make_objective(cfg)` function, registered by name in `ehrxdiff_jax/train/__init__.py`.
Every hook that the loop or `ehrxdiff train` calls is declared here, with a default that does
nothing (tests/test_objective.py).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np


class Objective:
  """Base class. Subclasses set `name` and implement `init_params` and `loss`.

  Parameters are one dict keyed by part (e.g. {'unet', 'conditioner', 'vae'}).
  """
  name: str = "objective"
  # The top-level parts the optimiser updates (None: all); the rest is frozen (no gradients, no
  # optimiser state).
  trainable_keys: Sequence[str] | None = None
  # The parts that get an EMA copy (state.ema_params).
  ema_keys: Sequence[str] = ()
  # True: `loss` also receives `step` (the optimisation step, traced), e.g. to switch a GAN on.
  uses_step: bool = False

  def __init__(self, cfg):
    self.cfg = cfg

  # -- required -------------------------------------------------------------------------------
  def init_params(self, rng: jax.Array) -> dict:
    """Boxed (logically partitioned) parameters; traced under eval_shape and jit, never eagerly."""
    raise NotImplementedError(f"objective {self.name!r} does not define init_params")

  def loss(self, params: dict, batch: dict, rng: jax.Array, train: bool) -> tuple[jax.Array, dict]:
    """(scalar loss, {name: scalar metric}) of a (micro-)batch of global arrays; params unboxed."""
    raise NotImplementedError(f"objective {self.name!r} does not define loss")

  # -- optional: inside the jitted steps ---------------------------------------------------------
  def eval_metrics(self, params: dict, ema_params: dict, batch: dict, rng: jax.Array) -> dict:
    """Scalar metrics on one validation batch (averaged over batches by the loop). Default: the loss
    and its metrics with train=False."""
    loss, aux = self.loss(params, batch, rng, train=False)
    return {"loss": loss, **aux}

  def post_update(self, params: dict) -> dict:
    """Applied to the parameters inside the step after each update (e.g. clamping CLIP's logit
    scale). Default: unchanged."""
    return params

  def weight_decay_mask(self) -> Any:
    """An optax mask for weight decay. Default None: every trainable parameter decays (as torch)."""
    return None

  # -- optional: on the host -------------------------------------------------------------------
  def dummy_batch(self, batch_size: int) -> dict:
    """Numpy batch with the shapes and dtypes the objective consumes: which entries travel to the
    devices, synthetic data, benchmarks. Default: the LDM batch of `models.dummy_batch`."""
    from ehrxdiff_jax.models import dummy_batch
    return {k: np.asarray(v) for k, v in dummy_batch(self.cfg, batch_size).items()}

  def check_data(self, data_dir: str, split: str) -> None:
    """Refuses (SystemExit naming the problem) a dataset the objective cannot learn from, before
    anything compiles (`ehrxdiff train`). Default: any dataset of the batch format."""
    del data_dir, split

  def init_from(self, state, path: str, trainer=None):
    """`train.init_from`: the fresh TrainState with parts taken from the run or file at `path`
    (called by `ehrxdiff train` after init_state). Default: refused, naming the objective."""
    del state, trainer
    raise NotImplementedError(f"train.init_from={path!r}: objective {self.name!r} does not define "
                              "init_from")

  def sample_hook(self, trainer, batches: Iterator[dict], every: int) -> Callable | None:
    """A `fit` hook `hook(step, state, writer)` for `train.sample_every` (e.g. sample grids), which
    may take its host batch from `batches`. Default None: no hook, nothing read from `batches`."""
    del trainer, batches, every
    return None

  def validation_report(self, trainer, state, batches) -> tuple[dict, dict]:
    """Extra validation output beyond the averaged `eval_metrics`: (scalars, {tag: HWC image in
    [0, 1]}), called by the loop at each validation with a fresh iterator over the validation split.
    Default: ({}, {})."""
    del trainer, state, batches
    return {}, {}
