"""The one training machinery: sharded state, the jitted step, and the loop around it.

    trainer = Trainer(cfg, objective, mesh)          # shardings, optimiser, jitted step (nothing compiled yet)
    state = trainer.init_state()                      # or Checkpointer.restore(trainer.abstract_state())
    state = fit(trainer, state, train_iter, workdir=..., checkpointer=..., eval_iter_fn=...)

The step: `train_step(state, batch) -> (state, metrics)`, one `jax.jit` with explicit in/out shardings
and the state donated. The step's randomness is `fold_in(state.rng, state.step)` (a resumed run repeats
it exactly). Gradient accumulation: the global batch is split into `grad_accum` micro-batches (each
still sharded over the data axes) and `lax.scan` sums their gradients. Metrics: loss, grad_norm (before
clipping), lr, plus the objective's own.

`fit` adds: the progress bar (step, loss, samples/s, MFU, ETA), TensorBoard scalars and metrics.jsonl
(process 0), periodic validation, periodic and SIGTERM checkpoints, and a stop on a non-finite loss that
names the step and keeps the last good checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from typing import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ehrxdiff_jax import batch_format, parallel
from ehrxdiff_jax.train import state as state_lib
from ehrxdiff_jax.train.objective import Objective
from ehrxdiff_jax.train.state import TrainState

log = logging.getLogger(__name__)


_norm = optax.tree.norm if hasattr(optax, "tree") and hasattr(optax.tree, "norm") else optax.global_norm


class NonFiniteLoss(RuntimeError):
  """The loss or gradient norm of step `.step`, or the state to be saved at `.step`, holds NaN or inf.

  `fit` fills in what happened to the checkpoints (`.removed`, `.kept` in `.directory`) before it raises."""

  def __init__(self, step: int, what: str, detail: str):
    super().__init__(step, what, detail)
    self.step, self.what, self.detail = step, what, detail
    self.removed: int | None = None
    self.kept: int | None = None
    self.directory: str | None = None

  def __str__(self):
    text = f"non-finite {self.what} at step {self.step} ({self.detail}); stopped."
    if self.removed is not None:
      text += f" Removed checkpoint {self.removed}: it holds the state that step {self.step} started from."
    if self.directory is not None:
      text += (f" The last good checkpoint is step {self.kept} in {self.directory}." if self.kept is not None else
               f" No good checkpoint is left in {self.directory}: the next run starts from step 0.")
    return text + (" Lower train.learning_rate, enable train.grad_clip or check the data, then run again with the "
                   "same --workdir (with --force if the config changes).")


def _finite_parts(state: TrainState) -> dict:
  """{part: every value finite} for the floating-point leaves of params, opt_state and ema_params."""
  def finite(tree):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)
  return {part: finite(getattr(state, part)) for part in ("params", "opt_state", "ema_params")}


# ------------------------------------------------------------------ device peak FLOP/s (dense, per chip)

PEAK_FLOPS = (  # (substring of device_kind, lower-cased), bf16 dense FLOP/s
    ("h200", 989e12), ("h100", 989e12), ("gh200", 989e12), ("a100", 312e12), ("a6000", 155e12),
    ("l40s", 362e12), ("l4", 121e12), ("v100", 125e12),
    ("tpu v4", 275e12), ("tpu v5p", 459e12), ("tpu v5 lite", 197e12), ("tpu v5e", 197e12),
    ("tpu v6", 918e12),
)


def peak_flops(device: jax.Device | None = None) -> float | None:
  """Per-device dense peak FLOP/s from the table above; None (MFU n/a) for CPUs and unknown chips."""
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    return None
  kind = device.device_kind.lower()
  for name, flops in PEAK_FLOPS:
    if name in kind:
      return flops
  return None


def compiled_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled executable (XLA cost analysis of the per-device SPMD program)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return None
  flops = cost.get("flops")
  return float(flops) if flops is not None and flops > 0 else None


# ------------------------------------------------------------------ synthetic / in-memory data


class SyntheticBatches:
  """Deterministic random host batches for an objective's `dummy_batch` template (in the host format of
  batch_format.host_template: uint8 images, float16 events): an in-memory, checkpointable iterator
  (grain's checkpoint handler API: get_state() -> bytes, set_state(bytes)).

  Batch i of the global stream depends only on (seed, i); a process yields rows [start, stop) of it,
  so any number of processes reproduce the same global batches.
  """

  def __init__(self, template: dict, global_batch: int, seed: int = 0, rows: tuple[int, int] | None = None):
    self.template = batch_format.host_template(template)
    self.global_batch = int(global_batch)
    self.seed = int(seed)
    self.rows = rows or (0, self.global_batch)
    self.index = 0

  def __iter__(self):
    return self

  def batch(self, i: int) -> dict:
    rng = np.random.default_rng([self.seed, i])
    out = {}
    for k, v in sorted(self.template.items()):
      shape = (self.global_batch,) + v.shape[1:]
      if v.dtype == np.bool_:
        out[k] = rng.random(shape) < 0.8
      elif v.dtype == np.uint8:
        out[k] = rng.integers(0, 256, shape, dtype=np.uint8)
      elif np.issubdtype(v.dtype, np.integer):
        out[k] = rng.integers(0, 2, shape).astype(v.dtype)
      else:
        out[k] = np.clip(rng.normal(0.0, 0.5, shape), -1, 1).astype(v.dtype)
    start, stop = self.rows
    return {k: v[start:stop] for k, v in out.items()}

  def __next__(self) -> dict:
    b = self.batch(self.index)
    self.index += 1
    return b

  def get_state(self) -> bytes:
    return json.dumps({"index": self.index, "seed": self.seed}).encode()

  def set_state(self, state: bytes) -> None:
    self.index = int(json.loads(bytes(state).decode())["index"])

  def start_prefetch(self) -> None:  # grain's checkpoint handler calls it after set_state
    pass


# ------------------------------------------------------------------ the trainer


class Trainer:
  """Shardings, optimiser and the jitted step for one (config, objective, mesh)."""

  def __init__(self, cfg, objective: Objective, mesh):
    self.cfg = cfg
    self.objective = objective
    self.mesh = mesh
    parallel.check_batch(cfg, mesh)
    t = cfg.train
    self.global_batch = int(t.batch_size)
    self.grad_accum = int(t.grad_accum)
    self.rules = parallel.rules_from_config(cfg)
    self.tx, self.schedule = state_lib.make_optimizer(t, objective.weight_decay_mask())
    self.ema_decay = float(t.ema_decay)
    self._rng0 = jax.random.key(int(cfg.seed))
    with jax.set_mesh(mesh):
      abstract_boxed = jax.eval_shape(self._init_boxed, self._rng0)
    self.state_shardings: TrainState = parallel.tree_shardings(abstract_boxed, mesh, self.rules,
                                                               int(cfg.mesh.min_shard_size))
    self._abstract = nn.unbox(abstract_boxed)
    self.batch_sharding = parallel.batch_sharding(mesh)
    self.replicated = parallel.replicated(mesh)
    self._step = jax.jit(parallel.under_rules(self._train_step, self.rules),
                         in_shardings=(self.state_shardings, self.batch_sharding),
                         out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))
    self._finite = jax.jit(_finite_parts, in_shardings=(self.state_shardings,), out_shardings=self.replicated)
    self._eval = jax.jit(parallel.under_rules(self._eval_step, self.rules),
                         in_shardings=(self.state_shardings, self.batch_sharding, None),
                         out_shardings=self.replicated)
    self.batch_keys = tuple(sorted(parallel.device_batch(objective.dummy_batch(1))))
    self._compiled = None
    self.flops_per_step: float | None = None
    self.compile_seconds: float | None = None

  # ---------------------------------------------------------------- state
  def _init_boxed(self, rng, param_impl: str | None = None) -> TrainState:
    r_params, r_state = jax.random.split(rng)
    if param_impl is not None:  # the parameters' draws only (init_state); state.rng stays the default impl
      r_params = jax.random.wrap_key_data(jnp.tile(jax.random.key_data(r_params), 2), impl=param_impl)
    params = self.objective.init_params(r_params)
    opt_state = self.tx.init(state_lib.trainable_params(params, self.objective.trainable_keys))
    ema = jax.tree.map(lambda x: x, state_lib.ema_subset(params, self.objective.ema_keys))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, ema_params=ema,
                      rng=r_state)

  def init_state(self, rng: jax.Array | None = None) -> TrainState:
    """Fresh state. On accelerators it is initialised directly into its shardings (nothing materialised
    on one device). On CPU (tests, demo) the initialiser is compiled without shardings and the result
    placed afterwards, so that the persistent compile cache serves every mesh of a config; and the
    parameters are drawn with the 'rbg' PRNG, because XLA:CPU compiles the threefry bit generator of
    hundreds of parameter draws very slowly (micro LDM initialiser: 210 s with threefry, 67 s with rbg).
    So CPU and accelerator initial weights differ for one seed; each is deterministic, and the training
    randomness (state.rng) is the default threefry everywhere."""
    rng = self._rng0 if rng is None else rng
    cpu = self.mesh.devices.flat[0].platform == "cpu"
    init = lambda r: nn.unbox(self._init_boxed(r, param_impl="rbg" if cpu else None))  # noqa: E731
    if cpu and jax.process_count() == 1:
      return jax.device_put(jax.jit(init)(rng), self.state_shardings)
    with jax.set_mesh(self.mesh):
      return jax.jit(init, out_shardings=self.state_shardings)(rng)

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs of the state with this mesh's shardings (the restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        self._abstract, self.state_shardings)

  def param_count(self, trainable_only: bool = False) -> int:
    params = self._abstract.params
    if trainable_only:
      params = state_lib.trainable_params(params, self.objective.trainable_keys)
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))

  # ---------------------------------------------------------------- step
  def _grads(self, params, batch, rng, step):
    keys = self.objective.trainable_keys
    train_p = state_lib.trainable_params(params, keys)
    extra = {"step": step} if self.objective.uses_step else {}

    def loss_fn(tp, mb, r):
      loss, aux = self.objective.loss(state_lib.merge_params(params, tp), mb, r, train=True, **extra)
      return loss, aux

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if self.grad_accum == 1:
      (loss, aux), grads = grad_fn(train_p, batch, rng)
      return loss, aux, grads
    a = self.grad_accum
    micro_spec = NamedSharding(self.mesh, P(None, parallel.BATCH_AXES))

    def split(x):  # [B, ...] -> [A, B/A, ...]; row i goes to micro-batch i % A: no data movement
      x = x.reshape((x.shape[0] // a, a) + x.shape[1:]).swapaxes(0, 1)
      return jax.lax.with_sharding_constraint(x, micro_spec)

    micro = jax.tree.map(split, batch)
    (_, aux_shape), _ = jax.eval_shape(grad_fn, train_p, jax.tree.map(lambda x: x[0], micro), rng)
    zeros_g = jax.tree.map(jnp.zeros_like, train_p)
    zeros_aux = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)

    def body(carry, xs):
      g_sum, l_sum, a_sum = carry
      mb, i = xs
      (loss, aux), g = grad_fn(train_p, mb, jax.random.fold_in(rng, i))
      return (jax.tree.map(jnp.add, g_sum, g), l_sum + loss, jax.tree.map(jnp.add, a_sum, aux)), None

    (g_sum, l_sum, a_sum), _ = jax.lax.scan(body, (zeros_g, jnp.zeros((), jnp.float32), zeros_aux),
                                            (micro, jnp.arange(a)))
    inv = 1.0 / a
    return l_sum * inv, jax.tree.map(lambda x: x * inv, a_sum), jax.tree.map(lambda g: g * inv, g_sum)

  def _train_step(self, state: TrainState, batch: dict):
    batch = batch_format.to_device(batch)
    rng = jax.random.fold_in(state.rng, state.step)
    loss, aux, grads = self._grads(state.params, batch, rng, state.step)
    train_p = state_lib.trainable_params(state.params, self.objective.trainable_keys)
    updates, opt_state = self.tx.update(grads, state.opt_state, train_p)
    new_train = optax.apply_updates(train_p, updates)
    params = self.objective.post_update(state_lib.merge_params(state.params, new_train))
    step = state.step + 1
    ema = state.ema_params
    if self.objective.ema_keys:
      decay = state_lib.ema_decay(self.ema_decay, step)
      ema = state_lib.ema_update(ema, state_lib.ema_subset(params, self.objective.ema_keys), decay)
    metrics = {"loss": loss, "grad_norm": _norm(grads), "lr": self.schedule(state.step), **aux}
    return state.replace(step=step, params=params, opt_state=opt_state, ema_params=ema), metrics

  def _eval_step(self, state: TrainState, batch: dict, rng):
    return self.objective.eval_metrics(state.params, state.ema_params, batch_format.to_device(batch), rng)

  def batch_spec(self, batch_size: int | None = None) -> dict:
    """ShapeDtypeStructs of a global host batch (device entries only) for lowering."""
    b = self.global_batch if batch_size is None else batch_size
    template = parallel.device_batch(batch_format.host_template(self.objective.dummy_batch(1)))
    return {k: jax.ShapeDtypeStruct((b,) + v.shape[1:], v.dtype, sharding=self.batch_sharding)
            for k, v in template.items()}

  def compile(self, batch_spec: dict | None = None):
    """Lowers and compiles the step (once); records compile time and XLA's FLOPs per step."""
    if self._compiled is None:
      t0 = time.perf_counter()
      with jax.set_mesh(self.mesh):
        lowered = self._step.lower(self.abstract_state(), batch_spec or self.batch_spec())
        self._compiled = lowered.compile()
      self.compile_seconds = time.perf_counter() - t0
      self.flops_per_step = compiled_flops(self._compiled)
    return self._compiled

  def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    """One optimisation step on a global batch (dict of jax.Arrays sharded over the batch axes)."""
    with jax.set_mesh(self.mesh):
      return self.compile()(state, batch)

  def non_finite_parts(self, state: TrainState) -> list[str]:
    """The parts of the state (params, opt_state, ema_params) that hold a NaN or an inf."""
    with jax.set_mesh(self.mesh):
      finite = jax.device_get(self._finite(state))
    return [part for part, ok in finite.items() if not ok]

  def eval_step(self, state: TrainState, batch: dict, rng: jax.Array) -> dict:
    with jax.set_mesh(self.mesh):
      return self._eval(state, batch, rng)

  def put_batch(self, host_batch: dict, stats: dict | None = None) -> dict:
    """This process's rows of a host batch -> global arrays; only the entries the objective consumes travel
    (the events' rows up to `event_rows` where the batch has it). `stats`: see parallel.to_global."""
    missing = [k for k in self.batch_keys if k not in host_batch]
    if missing:
      raise KeyError(f"the batch lacks {missing} that objective {self.objective.name!r} needs "
                     f"(has {sorted(host_batch)})")
    keys = self.batch_keys + ((parallel.EVENT_ROWS,) if "events" in self.batch_keys else ())
    return parallel.to_global({k: host_batch[k] for k in keys if k in host_batch}, self.mesh, self.global_batch,
                              stats)

  def mfu(self, steps_per_second: float) -> float | None:
    peak = peak_flops(self.mesh.devices.flat[0])
    if peak is None or not self.flops_per_step:
      return None
    return self.flops_per_step * steps_per_second / peak


# ------------------------------------------------------------------ logging


class MetricWriter:
  """metrics.jsonl + TensorBoard scalars in the workdir, on process 0 only."""

  def __init__(self, workdir: str | None):
    self.enabled = workdir is not None and parallel.is_main_process()
    self.path = None
    self.tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self.path = os.path.join(workdir, "metrics.jsonl")
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tb"))
      except Exception as e:  # noqa: BLE001 - TensorBoard is optional
        log.warning("TensorBoard disabled: %s", e)

  def write(self, step: int, scalars: dict, prefix: str = "train") -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": prefix, "time": time.time(),
              **{k: (float(v) if v is not None else None) for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.tb is not None:
      for k, v in scalars.items():
        if v is not None and math.isfinite(float(v)):
          self.tb.add_scalar(f"{prefix}/{k}", float(v), int(step))

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    """An HWC image in [0, 1]: TensorBoard, and a PNG in WORKDIR/images/ for a quick look."""
    if not self.enabled:
      return
    if self.tb is not None:
      self.tb.add_image(tag, image, int(step), dataformats="HWC")
    from PIL import Image
    folder = os.path.join(os.path.dirname(self.path), "images")
    os.makedirs(folder, exist_ok=True)
    pixels = (np.clip(np.asarray(image, np.float32), 0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(os.path.join(folder, f"{tag.replace('/', '_')}_{int(step):07d}.png"))

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def _progress(total: int, initial: int, enabled: bool):
  if not enabled:
    return None
  try:
    from tqdm import tqdm
  except ImportError:
    return None
  return tqdm(total=total, initial=initial, dynamic_ncols=True, desc="train", unit="step")


# ------------------------------------------------------------------ validation


def evaluate(trainer: Trainer, state: TrainState, batches: Iterator[dict], num_batches: int,
             seed: int = 1234) -> dict:
  """Mean of the objective's eval metrics over `num_batches` batches (fixed randomness per batch)."""
  values: dict[str, list] = {}
  base = jax.random.key(seed)
  for i, host in enumerate(batches):
    if i >= num_batches:
      break
    out = jax.device_get(trainer.eval_step(state, trainer.put_batch(host), jax.random.fold_in(base, i)))
    for k, v in out.items():
      values.setdefault(k, []).append(float(v))
  return {k: _nanmean(v) for k, v in values.items()}


def _nanmean(values) -> float:
  """Mean of the finite-or-inf values, NaN only when every value is NaN (no warning)."""
  values = [v for v in map(float, values) if not math.isnan(v)]
  return sum(values) / len(values) if values else float("nan")


# ------------------------------------------------------------------ the loop


class _StopFlag:
  """SIGTERM/SIGINT -> save and stop at the next step boundary (process-local; multi-host runs use
  orbax's preemption sync point instead, see `fit`)."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def install(self):
    for sig in (signal.SIGTERM,):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def uninstall(self):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def fit(trainer: Trainer, state: TrainState, train_iter: Iterator[dict], *, num_steps: int | None = None,
        workdir: str | None = None, checkpointer=None, eval_iter_fn: Callable[[], Iterator[dict]] | None = None,
        meta: dict | None = None, progress: bool = True, hooks: tuple = ()) -> TrainState:
  """Trains from `state.step` to `num_steps` (default `cfg.train.num_steps`).

  `train_iter` yields this process's rows of each global batch; its state is saved with each checkpoint.
  `eval_iter_fn()` returns a fresh iterator over the validation split. `hooks`: callables
  `hook(step, state, writer)` run on every process after each step (e.g. sample grids; `writer` is the
  MetricWriter, which writes on process 0 only). Raises NonFiniteLoss (see the module docstring for the
  checkpoint it keeps).
  Returns the final state (after waiting for pending checkpoint writes).
  """
  cfg = trainer.cfg
  t = cfg.train
  num_steps = int(t.num_steps if num_steps is None else num_steps)
  step = int(jax.device_get(state.step))
  main = parallel.is_main_process()
  writer = MetricWriter(workdir)
  stop = _StopFlag().install() if jax.process_count() == 1 else None
  log_every, eval_every, ckpt_every = int(t.log_every), int(t.eval_every), int(t.ckpt_every)
  meta = dict(meta or {})

  trainer.compile()
  if main:
    mfu_txt = "n/a" if peak_flops(trainer.mesh.devices.flat[0]) is None else "on"
    log.info("compiled the train step in %.1fs; %s GFLOP/step per device (XLA); MFU %s; %s",
             trainer.compile_seconds or 0.0,
             "?" if trainer.flops_per_step is None else f"{trainer.flops_per_step / 1e9:.1f}", mfu_txt,
             parallel.describe(trainer.mesh))

  bar = _progress(num_steps, step, progress and main)
  window: list[dict] = []
  pending: tuple[int, dict] | None = None
  t_window = time.perf_counter()
  steps_in_window = 0

  def check(item) -> dict:
    s, m = item
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
      raise NonFiniteLoss(s, "loss", f"loss={m['loss']}, grad_norm={m['grad_norm']}")
    return m

  def flush():
    nonlocal pending
    if pending is not None:
      window.append(check(pending))
      pending = None

  last_saved = [checkpointer.latest_step() if checkpointer is not None else None]

  def save(s):
    if checkpointer is not None and last_saved[0] != s:
      flush()  # never checkpoint a state whose loss was not checked
      bad = trainer.non_finite_parts(state)
      if bad:
        raise NonFiniteLoss(s, "values in the state to be saved", ", ".join(bad))
      checkpointer.save(s, state, train_iter, meta=dict(meta, step=s))
      last_saved[0] = s

  try:
    while step < num_steps:
      if stop is not None and stop.signum is not None:
        log.warning("signal %d: saving a checkpoint at step %d and stopping", stop.signum, step)
        save(step)
        break
      if jax.process_count() > 1 and checkpointer is not None and checkpointer.manager.reached_preemption(step):
        log.warning("preemption: saving a checkpoint at step %d and stopping", step)
        save(step)
        break
      host = next(train_iter)
      batch = trainer.put_batch(host)
      state, metrics = trainer.train_step(state, batch)
      step += 1
      steps_in_window += 1
      if pending is not None:  # check the previous step while this one runs (one step of lag)
        window.append(check(pending))
      pending = (step, metrics)
      if hooks:
        t_hooks = time.perf_counter()
        for hook in hooks:
          hook(step, state, writer)
        t_window += time.perf_counter() - t_hooks  # samples/s counts training only

      if step % log_every == 0 or step == num_steps:
        flush()
        jax.block_until_ready(state.step)
        elapsed = time.perf_counter() - t_window
        sps = steps_in_window / elapsed if elapsed > 0 else float("nan")
        # nanmean: per-t-bucket losses are NaN on steps whose batch drew no t in that bucket.
        scalars = {k: _nanmean([w[k] for w in window]) for k in window[-1]}
        scalars["samples_per_s"] = sps * trainer.global_batch
        mfu = trainer.mfu(sps)
        if mfu is not None:
          scalars["mfu"] = mfu
        writer.write(step, scalars)
        if bar is not None:
          bar.set_postfix(loss=f"{scalars['loss']:.4f}", samples_s=f"{scalars['samples_per_s']:.1f}",
                          mfu="n/a" if mfu is None else f"{100 * mfu:.1f}%", refresh=False)
        window.clear()
        t_window, steps_in_window = time.perf_counter(), 0
      if bar is not None:
        bar.update(1)

      if eval_iter_fn is not None and eval_every > 0 and (step % eval_every == 0 or step == num_steps):
        flush()
        scalars = evaluate(trainer, state, eval_iter_fn(), int(t.eval_batches))
        extra_scalars, images = trainer.objective.validation_report(trainer, state, eval_iter_fn())
        scalars.update(extra_scalars)
        writer.write(step, scalars, prefix="valid")
        for tag, image in images.items():
          writer.image(step, f"valid/{tag}", image)
        if main:
          log.info("step %d: validation %s", step, " ".join(f"{k}={v:.4f}" for k, v in scalars.items()))
        t_window, steps_in_window = time.perf_counter(), 0
      if ckpt_every > 0 and (step % ckpt_every == 0 or step == num_steps):
        save(step)
    flush()
  except NonFiniteLoss as e:
    if checkpointer is not None:
      checkpointer.wait()
      if last_saved[0] == e.step - 1:
        checkpointer.delete(e.step - 1)
        e.removed = e.step - 1
      e.kept, e.directory = checkpointer.latest_step(), checkpointer.directory
    raise
  finally:
    if stop is not None:
      stop.uninstall()
    if bar is not None:
      bar.close()
    writer.close()
    if checkpointer is not None:
      checkpointer.wait()
  return state
