"""`ehrxdiff bench`: speed of the training step and of sampling, on synthetic batches.

    ehrxdiff bench train --config configs/tiny.py [--batch N] [--steps N] [--warmup N] [--json]
    ehrxdiff bench sample --config configs/tiny.py [--batch N] [--steps S] [--repeats N] [--json]

`train` builds the real Trainer (same mesh, shardings, step and objective as `ehrxdiff train`), compiles
the step, runs `--warmup` untimed and `--steps` timed steps and reports samples/s, step time, compile
time, peak device memory (device.memory_stats(), where the backend has it), XLA's FLOPs per step and MFU
(FLOPs over the device's dense bf16 peak, see `train.loop.PEAK_FLOPS`; null on CPU, with the reason).

Both benchmarks draw the parameters on the host (`_random_params`) instead of running the networks'
initialisers: speed does not depend on the values, and XLA:CPU takes minutes to compile the
threefry-heavy initialiser even of a tiny LDM, which would dwarf the CPU test of this command.

`sample` times the jitted sampler of `ehrxdiff sample` (conditioner, `--steps` denoising steps in one
scan, VAE decode) at `--batch`: images/s from the median of `--repeats` calls, and compile time (first
call minus a steady one). Beside it, one denoising step (UNet + scheduler step, `sample_latents` with
steps=1) and the VAE decode are compiled and timed on their own: they give the time per denoising step,
the decode time and the FLOPs behind MFU (steps x step FLOPs + decode FLOPs; XLA's cost analysis does
not multiply a scan body by its trip count, so the whole sampler's own count would be wrong).
Every result is one JSON object (`--json`), the last line of stdout.
"""
from __future__ import annotations

import json
import os
import time


def add_arguments(parser):
  parser.add_argument("what", choices=("train", "sample"), help="which benchmark")
  parser.add_argument("--config", required=True, help="config file")
  parser.add_argument("--batch", type=int, default=None, help="global batch (default train.batch_size / "
                      "sample.batch_size)")
  parser.add_argument("--steps", type=int, default=None, help="train: timed steps (default 10); sample: "
                      "denoising steps (default sample.steps)")
  parser.add_argument("--repeats", type=int, default=3, help="sample: timed calls of the whole sampler")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps (calls) after compiling; for "
                      "sample the compiling call counts as one")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--out", default=None, help="also append the JSON result to this file")


def _peak_memory() -> dict:
  """peak_memory_bytes over the local devices, or null with the reason (CPU has no memory_stats)."""
  import jax
  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # noqa: BLE001 - backends without allocator statistics raise or return None
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  if peaks:
    return {"peak_memory_bytes": max(peaks)}
  return {"peak_memory_bytes": None,
          "peak_memory_note": f"{jax.devices()[0].platform} devices report no allocator statistics"}


def _mfu(flops_per_s: float | None) -> dict:
  """mfu = achieved FLOP/s per device over the device's dense peak, or null with the reason."""
  import jax
  from ehrxdiff_jax.train.loop import peak_flops
  peak = peak_flops()
  out = {"peak_flops_per_device": peak, "mfu": None}
  if peak is None:
    out["mfu_note"] = f"no peak FLOP/s known for device kind {jax.devices()[0].device_kind!r}"
  elif not flops_per_s:
    out["mfu_note"] = "XLA's cost analysis gave no FLOP count"
  else:
    out["mfu"] = flops_per_s / peak
  return out


def _device_info() -> dict:
  import jax
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "devices": jax.device_count(),
          "processes": jax.process_count(), "jax": jax.__version__}


def _median(times: list[float]) -> float:
  times = sorted(times)
  return times[len(times) // 2]


def _time_calls(fn, n: int) -> float:
  """Median wall time of n calls of fn() (each waited for)."""
  import jax
  times = []
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return _median(times)


def _random_params(abstract, seed: int = 0):
  """Arrays shaped and sharded as the ShapeDtypeStructs of `abstract`, drawn on the host: floats
  N(0, 0.02^2) (finite activations in bf16 as well), integers zero."""
  import jax
  import numpy as np
  rng = np.random.default_rng(seed)

  def leaf(s):
    if np.issubdtype(s.dtype, np.floating):
      x = (0.02 * rng.standard_normal(s.shape, np.float32)).astype(s.dtype)
    else:
      x = np.zeros(s.shape, s.dtype)
    return jax.device_put(x, s.sharding)
  return jax.tree.map(leaf, abstract)


def _train_state(trainer):
  """A fresh TrainState as `Trainer.init_state` makes it (optimiser state, EMA copy, step 0, the config's
  key), but with host-drawn parameters (see the module doc)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from ehrxdiff_jax.train import state as state_lib
  a = trainer.abstract_state()
  params = _random_params(a.params)
  trainable = state_lib.trainable_params(params, trainer.objective.trainable_keys)
  opt_state = jax.jit(trainer.tx.init, out_shardings=trainer.state_shardings.opt_state)(trainable)
  # A copy, not the same buffers: the train step donates its state.
  ema = jax.tree.map(jnp.copy, state_lib.ema_subset(params, trainer.objective.ema_keys))
  return state_lib.TrainState(step=jax.device_put(np.zeros((), a.step.dtype), a.step.sharding), params=params,
                              opt_state=opt_state, ema_params=ema,
                              rng=jax.device_put(jax.random.key(int(trainer.cfg.seed)), a.rng.sharding))


def bench_train(cfg, steps: int, warmup: int) -> dict:
  import jax
  from ehrxdiff_jax import parallel
  from ehrxdiff_jax.train import make_objective
  from ehrxdiff_jax.train.loop import SyntheticBatches, Trainer

  mesh = parallel.make_mesh(cfg)
  parallel.check_batch(cfg, mesh)
  objective = make_objective(cfg)
  trainer = Trainer(cfg, objective, mesh)
  b = trainer.global_batch
  data = SyntheticBatches(objective.dummy_batch(1), b, seed=0, rows=parallel.process_batch_rows(mesh, b))
  batches = [trainer.put_batch(next(data)) for _ in range(2)]
  t0 = time.perf_counter()
  state = _train_state(trainer)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  trainer.compile()
  for i in range(warmup):
    state, metrics = trainer.train_step(state, batches[i % 2])
  jax.block_until_ready(state)
  times = []
  for i in range(steps):
    t = time.perf_counter()
    state, metrics = trainer.train_step(state, batches[i % 2])
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  median = _median(times)
  flops = trainer.flops_per_step
  return {
      "benchmark": "train", "config": cfg.name, "global_batch": b, "grad_accum": trainer.grad_accum,
      "dtype": cfg.model.dtype, "attention": cfg.model.attention, "remat": cfg.model.remat,
      "mesh": {a: int(mesh.shape[a]) for a in parallel.MESH_AXES},
      "params": trainer.param_count(), "trainable_params": trainer.param_count(True),
      "steps": steps, "step_time_s": sum(times) / len(times), "step_time_median_s": median,
      "samples_per_s": b / median, "compile_time_s": trainer.compile_seconds, "init_s": init_s,
      "flops_per_step_per_device": flops, **_mfu(flops / median if flops else None),
      **_peak_memory(), "final_loss": float(metrics["loss"]), **_device_info(),
  }


def bench_sample(cfg, repeats: int, warmup: int) -> dict:
  """The sampler of `cfg.sample` (sampler, steps, batch_size) on a synthetic batch; see the module doc."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from ehrxdiff_jax import models, parallel
  from ehrxdiff_jax import sample as sample_lib
  from ehrxdiff_jax.train.ldm import LDMObjective
  from ehrxdiff_jax.train.loop import compiled_flops

  mesh = parallel.make_mesh(cfg)
  b = int(cfg.sample.batch_size)
  ldm = LDMObjective(cfg)
  sharding = parallel.batch_sharding(mesh)
  generate = ldm.generate_fn(sharding)
  s = generate.settings
  with jax.set_mesh(mesh):  # the parameters sharded as in training
    boxed = jax.eval_shape(ldm.init_params, jax.random.key(0))
  shardings = parallel.tree_shardings(boxed, mesh, parallel.rules_from_config(cfg), int(cfg.mesh.min_shard_size))
  params = _random_params(jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                       nn.unbox(boxed), shardings))
  batch = parallel.to_global({k: np.asarray(v) for k, v in models.dummy_batch(cfg, b).items()}, mesh, b)
  keys = jax.device_put(sample_lib.per_sample_keys(0, list(range(b))), sharding)

  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    jax.block_until_ready(generate(params, batch, keys))
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
      jax.block_until_ready(generate(params, batch, keys))
    call = _time_calls(lambda: generate(params, batch, keys), repeats)

    # One denoising step and the decode on their own (same shapes, shardings and guidance as above).
    shape = models.latent_shape(cfg)
    z = jax.device_put(jnp.zeros((b, *shape), jnp.float32), sharding)
    context = jax.eval_shape(lambda p, x: ldm.context(p, x, z, None, train=False),
                             params["conditioner"], batch)
    if context is not None:  # None: a conditioner without a cross-attention stream (VAE concat only)
      context = jax.device_put(jnp.zeros(context.shape, context.dtype), sharding)

    def one_step(unet_params, prev_mean, ctx, keys):
      def denoise(z_t, t, cond=True):
        x_in = models.unet_input(z_t, prev_mean, cfg)
        return ldm.unet_apply(unet_params, x_in, t, ctx if cond or ctx is None else jnp.zeros_like(ctx))
      return sample_lib.sample_latents(denoise, shape, keys, schedule=ldm.schedule, sampler=s["sampler"],
                                       steps=1, eta=s["eta"], guidance_scale=s["guidance_scale"],
                                       sharding=sharding, prediction=s["prediction"],
                                       spacing=s["timestep_spacing"])

    def decode(vae_params, z0):
      return ldm.vae.apply({"params": vae_params}, z0, method=ldm.vae.decode)

    parts = {}
    for name, fn, args in (("step", one_step, (params["unet"], z, context, keys)),
                           ("decode", decode, (params["vae"], z))):
      compiled = jax.jit(fn).lower(*args).compile()
      jax.block_until_ready(compiled(*args))
      parts[name] = (_time_calls(lambda c=compiled, a=args: c(*a), max(repeats, 5)), compiled_flops(compiled))

  (step_s, step_flops), (decode_s, decode_flops) = parts["step"], parts["decode"]
  steps = int(s["steps"])
  flops = steps * step_flops + decode_flops if step_flops and decode_flops else None
  return {"benchmark": "sample", "config": cfg.name, "batch": b, "sampler": s["sampler"],
          "denoising_steps": steps, "eta": s["eta"], "guidance_scale": s["guidance_scale"],
          "dtype": cfg.model.dtype, "attention": cfg.model.attention,
          "images_per_s": b / call, "call_time_median_s": call, "first_call_s": first,
          "compile_time_s": max(first - call, 0.0), "time_per_denoising_step_s": step_s,
          "decode_time_s": decode_s, "flops_per_denoising_step_per_device": step_flops,
          "flops_decode_per_device": decode_flops, **_mfu(flops / call if flops else None),
          **_peak_memory(), **_device_info()}


def run(args) -> int:
  from ehrxdiff_jax.config_util import load_config
  if (args.steps is not None and args.steps < 1) or args.repeats < 1 or args.warmup < 0:
    raise SystemExit(f"error: --steps and --repeats must be >= 1 and --warmup >= 0 (got --steps {args.steps}, "
                     f"--repeats {args.repeats}, --warmup {args.warmup})")
  cfg = load_config(args.config, args.config_overrides)
  if args.what == "train":
    if args.batch:
      cfg.train.batch_size = int(args.batch)
    result = bench_train(cfg, 10 if args.steps is None else args.steps, args.warmup)
  else:
    if args.batch:
      cfg.sample.batch_size = int(args.batch)
    if args.steps:
      cfg.sample.steps = int(args.steps)
    result = bench_sample(cfg, args.repeats, args.warmup)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
      f.write(json.dumps(result) + "\n")
  if args.json:
    print(json.dumps(result))
  else:
    for k, v in result.items():
      print(f"{k:>36}: {f'{v:.4g}' if isinstance(v, float) else v}")
  return 0
