"""`ehrxdiff bench`: speed of the training step (and, hook, of sampling) on synthetic batches.

    ehrxdiff bench train --config configs/tiny.py [--batch N] [--steps N] [--warmup N] [--json]
    ehrxdiff bench sample --config configs/tiny.py [--batch N] [--steps N] [--json]

`train` builds the real Trainer (same mesh, shardings, step and objective as `ehrxdiff train`), compiles
the step, runs `--warmup` untimed and `--steps` timed steps and reports samples/s, step time, compile
time, peak device memory (device.memory_stats(), where the backend has it), XLA's FLOPs per step and MFU
(FLOPs over the device's dense bf16 peak, see `train.loop.PEAK_FLOPS`; n/a on CPU).
"""
from __future__ import annotations

import json
import os
import sys
import time


def add_arguments(parser):
  parser.add_argument("what", choices=("train", "sample"), help="which benchmark")
  parser.add_argument("--config", required=True, help="config file")
  parser.add_argument("--batch", type=int, default=None, help="global batch (default train.batch_size / "
                      "sample.batch_size)")
  parser.add_argument("--steps", type=int, default=10, help="timed steps (train) or timed calls (sample)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--out", default=None, help="also append the JSON result to this file")


def _peak_memory() -> int | None:
  import jax
  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # noqa: BLE001
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def _device_info() -> dict:
  import jax
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "devices": jax.device_count(),
          "processes": jax.process_count(), "jax": jax.__version__}


def bench_train(cfg, steps: int, warmup: int) -> dict:
  import jax
  from ehrxdiff_jax import parallel
  from ehrxdiff_jax.train import make_objective
  from ehrxdiff_jax.train.loop import SyntheticBatches, Trainer, peak_flops

  mesh = parallel.make_mesh(cfg)
  objective = make_objective(cfg)
  trainer = Trainer(cfg, objective, mesh)
  b = trainer.global_batch
  data = SyntheticBatches(objective.dummy_batch(1), b, seed=0, rows=parallel.process_batch_rows(mesh, b))
  batches = [trainer.put_batch(next(data)) for _ in range(2)]
  t0 = time.perf_counter()
  state = trainer.init_state()
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
  t_total = sum(times)
  step_s = t_total / max(len(times), 1)
  times.sort()
  median = times[len(times) // 2] if times else float("nan")
  peak = peak_flops()
  flops = trainer.flops_per_step
  mfu = (flops / median / peak) if (peak and flops and median > 0) else None
  return {
      "benchmark": "train", "config": cfg.name, "global_batch": b, "grad_accum": trainer.grad_accum,
      "dtype": cfg.model.dtype, "attention": cfg.model.attention, "remat": cfg.model.remat,
      "mesh": {a: int(mesh.shape[a]) for a in parallel.MESH_AXES},
      "params": trainer.param_count(), "trainable_params": trainer.param_count(True),
      "steps": steps, "step_time_s": step_s, "step_time_median_s": median,
      "samples_per_s": b / median if median > 0 else None,
      "compile_s": trainer.compile_seconds, "init_s": init_s,
      "flops_per_step_per_device": flops, "peak_flops_per_device": peak,
      "mfu": mfu, "peak_memory_bytes": _peak_memory(), "final_loss": float(metrics["loss"]),
      **_device_info(),
  }


def bench_sample(cfg, batch: int | None, steps: int, warmup: int) -> dict:
  """Hook for the sampling engineer: times `sample.make_generate_fn` on synthetic batches."""
  import jax
  import numpy as np
  from ehrxdiff_jax import models, parallel
  from ehrxdiff_jax import sample as sample_lib

  mesh = parallel.make_mesh(cfg)
  b = int(batch or cfg.sample.batch_size)
  vae, unet, cond = models.build_vae(cfg), models.build_unet(cfg), models.build_conditioner(cfg)
  sharding = parallel.batch_sharding(mesh)
  generate = sample_lib.make_generate_fn(
      lambda p, x, t, c: unet.apply({"params": p}, x, t, c),
      lambda p, *a: cond.apply({"params": p}, *a),
      lambda p, z: vae.apply({"params": p}, z, method=vae.decode), cfg,
      vae_encode_mean=lambda p, x: vae.apply({"params": p}, x, method=vae.encode).mean, sharding=sharding)
  import flax.linen as nn
  with jax.set_mesh(mesh):
    params = jax.jit(lambda r: nn.unbox(models.init_ldm(cfg, r)))(jax.random.key(0))
  host = {k: np.asarray(v) for k, v in models.dummy_batch(cfg, b).items()}
  batch_g = parallel.to_global(host, mesh, b)
  keys = sample_lib.per_sample_keys(0, list(range(b)))
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    jax.block_until_ready(generate(params, batch_g, keys))
  first = time.perf_counter() - t0
  times = []
  with jax.set_mesh(mesh):
    for _ in range(max(warmup - 1, 0)):
      jax.block_until_ready(generate(params, batch_g, keys))
    for _ in range(steps):
      t = time.perf_counter()
      jax.block_until_ready(generate(params, batch_g, keys))
      times.append(time.perf_counter() - t)
  times.sort()
  median = times[len(times) // 2]
  return {"benchmark": "sample", "config": cfg.name, "batch": b, "sampler": cfg.sample.sampler,
          "denoising_steps": int(cfg.sample.steps), "call_time_median_s": median,
          "images_per_s": b / median, "first_call_s": first, "peak_memory_bytes": _peak_memory(),
          **_device_info()}


def run(args) -> int:
  from ehrxdiff_jax.config_util import load_config
  cfg = load_config(args.config, args.config_overrides)
  if args.what == "train":
    if args.batch:
      cfg.train.batch_size = int(args.batch)
    result = bench_train(cfg, args.steps, args.warmup)
  else:
    result = bench_sample(cfg, args.batch, args.steps, args.warmup)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
      f.write(json.dumps(result) + "\n")
  if args.json:
    print(json.dumps(result))
  else:
    for k, v in result.items():
      if isinstance(v, float):
        v = f"{v:.4g}"
      print(f"{k:>28}: {v}")
    if result.get("mfu") is None and args.what == "train":
      print(f"{'':>28}  (MFU n/a: no peak FLOP/s known for this device)", file=sys.stderr)
  return 0
