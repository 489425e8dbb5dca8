"""`ehrxdiff info --config FILE [--json]`: parameter counts and forward FLOPs per image of every network.

Nothing is allocated: parameters come from `jax.eval_shape` of the initialiser and FLOPs from XLA's cost
analysis of the lowered (not compiled) forward pass at batch 1.
"""
from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp

from ehrxdiff_jax import models
from ehrxdiff_jax.config_util import load_config

# Measured on the PyTorch original (model-facts.md), shown beside ours.
REFERENCE_PARAMS = {"unet": 505_780_355, "conditioner": 149_575_168, "vae": 55_312_063}
REFERENCE_GFLOPS = {"unet": 363.8, "conditioner_with_vae_encode": 489.9, "vae_encoder": 345.4,
                    "vae_decoder": 670.6}


def add_arguments(parser):
  parser.add_argument("--config", required=True, help="config file, e.g. configs/ehrxdiff.py")
  parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returns one dict per computation
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def network_info(cfg) -> dict:
  """{'params': {...}, 'gflops_per_image': {...}} for the config, without allocating weights."""
  shapes = jax.eval_shape(functools.partial(models.init_ldm, cfg), jax.random.key(0))
  params = {name: models.param_count(tree) for name, tree in shapes.items()}
  shapes = nn.unbox(shapes)
  vae, unet, cond = models.build_vae(cfg), models.build_unet(cfg), models.build_conditioner(cfg)
  batch = models.dummy_batch(cfg, 1)
  h, w, c = models.latent_shape(cfg)
  z = jax.ShapeDtypeStruct((1, h, w, c), jnp.float32)

  def vae_encode(p, x):
    return vae.apply({"params": p}, x, method=vae.encode).mean

  def vae_decode(p, z):
    return vae.apply({"params": p}, z, method=vae.decode)

  def condition(p_cond, p_vae, x, events, mask):
    mean = vae_encode(p_vae, x)
    return cond.apply({"params": p_cond}, x, mean, events, mask)

  context = jax.eval_shape(condition, shapes["conditioner"], shapes["vae"], batch["prev_image"],
                           batch["events"], batch["event_mask"])
  unet_in = jax.eval_shape(lambda z, m: models.unet_input(z, m, cfg), z, z)

  denoise = models.make_unet_apply(cfg, unet)

  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  gflops = {
      "unet": _flops(denoise, shapes["unet"], unet_in, t, context) / 1e9,
      "conditioner_with_vae_encode": _flops(condition, shapes["conditioner"], shapes["vae"],
                                            batch["prev_image"], batch["events"], batch["event_mask"]) / 1e9,
      "vae_encoder": _flops(vae_encode, shapes["vae"], batch["prev_image"]) / 1e9,
      "vae_decoder": _flops(vae_decode, shapes["vae"], z) / 1e9,
  }
  return {"config": cfg.name, "params": params, "gflops_per_image": gflops,
          "reference_params": REFERENCE_PARAMS, "reference_gflops_per_image": REFERENCE_GFLOPS}


def run(args) -> int:
  cfg = load_config(args.config, args.config_overrides)
  info = network_info(cfg)
  if args.json:
    print(json.dumps(info, indent=2))
    return 0
  print(f"config: {info['config']}")
  print(f"{'network':<30}{'parameters':>15}{'reference':>15}")
  for name, n in info["params"].items():
    print(f"{name:<30}{n:>15,}{REFERENCE_PARAMS.get(name, 0):>15,}")
  print(f"\n{'forward GFLOP per image':<30}{'ours (XLA)':>15}{'reference':>15}")
  for name, g in info["gflops_per_image"].items():
    print(f"{name:<30}{g:>15.1f}{REFERENCE_GFLOPS[name]:>15.1f}")
  return 0
