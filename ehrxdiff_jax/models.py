"""Builds the networks of a config and their parameter trees (the one map from config to modules).

Parameter tree of the LDM: {'unet': ..., 'conditioner': ..., 'vae': ...} (see CONTRIBUTING.md).
Initialisation goes through `jax.eval_shape` (shapes, counts, FLOPs without allocating) and a jitted
initialiser (fast on CPU, shardable with out_shardings).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ehrxdiff_jax.nn.layers import compute_dtype


def _common(cfg: ml_collections.ConfigDict) -> dict:
  return dict(dtype=compute_dtype(cfg.model.dtype), attention=cfg.model.attention,
              remat=cfg.model.remat)


def latent_shape(cfg: ml_collections.ConfigDict,
                 image_size: int | None = None) -> tuple[int, int, int]:
  """(h, w, c) of the VAE latent for `image_size` (default `c.data.image_size`)."""
  from ehrxdiff_jax.nn.vae import downsample_factor
  size = int(image_size or cfg.data.image_size)
  f = downsample_factor(cfg.model.vae.ch_mult)
  if size % f:
    raise ValueError(f"image size {size} is not divisible by the VAE factor {f}")
  return size // f, size // f, int(cfg.model.vae.embed_dim)


def build_vae(cfg):
  from ehrxdiff_jax.nn.vae import AutoencoderKL
  return AutoencoderKL(**cfg.model.vae.to_dict(), **_common(cfg))


def build_unet(cfg):
  from ehrxdiff_jax.nn.unet import UNet
  return UNet(**cfg.model.unet.to_dict(), **_common(cfg))


def build_image_tower(cfg):
  from ehrxdiff_jax.nn.vit import VisionTransformer
  return VisionTransformer(**cfg.model.image_tower.to_dict(), **_common(cfg))


def build_table_tower(cfg):
  from ehrxdiff_jax.nn.table import TableTower
  return TableTower(**cfg.model.table_tower.to_dict(), **_common(cfg))


def build_conditioner(cfg):
  from ehrxdiff_jax.nn.conditioner import Conditioner
  h, _, c = latent_shape(cfg)
  k = cfg.model.conditioner
  # Only the conditioner's table tower follows the reference sampler at inference (nn/table.py);
  # CLIP and the table classifier keep the training behaviour. Saved configs older than the field
  # get the default.
  table_tower = build_table_tower(cfg).clone(
      padded_slots_at_inference=k.get("padded_slots_at_inference", "zero"))
  return Conditioner(image_tower=build_image_tower(cfg), table_tower=table_tower,
                     cross_attention=tuple(k.cross_attention), max_events=k.max_events,
                     context_tokens=k.context_tokens, context_dim=k.context_dim,
                     latent_channels=c, latent_size=h, pooled_events=bool(k.get("pooled_events", False)),
                     dtype=compute_dtype(cfg.model.dtype))


def split_context(context, cfg):
  """(cross-attention tokens, the UNet's y) of a conditioner output: with
  `model.conditioner.pooled_events` the last token is the pooled events vector (nn/conditioner.py)."""
  if context is None or not cfg.model.conditioner.get("pooled_events", False):
    return context, None
  adm = int(cfg.model.unet.get("adm_in_channels", 0))
  if adm != int(cfg.model.conditioner.context_dim):
    raise ValueError(f"model.conditioner.pooled_events needs model.unet.adm_in_channels = "
                     f"conditioner.context_dim ({cfg.model.conditioner.context_dim}), got {adm}")
  return context[:, :-1], context[:, -1]


def make_unet_apply(cfg, unet=None):
  """`unet_apply(unet_params, x, t, context) -> output`: the UNet of `cfg` on a conditioner output
  (split by `split_context`), the one form the trainer, the sampler and the benchmarks call."""
  unet = build_unet(cfg) if unet is None else unet

  def unet_apply(params, x, t, context):
    tokens, y = split_context(context, cfg)
    return unet.apply({"params": params}, x, t, tokens, y)
  return unet_apply


def dummy_batch(cfg, batch_size: int = 1) -> dict:
  """A zero batch with the shapes of the pipeline's (CONTRIBUTING.md), for init and tracing."""
  s = cfg.data.image_size
  e, d = cfg.model.conditioner.max_events, cfg.model.table_tower.event_dim
  return {
      "prev_image": jnp.zeros((batch_size, s, s, 3), jnp.float32),
      "target_image": jnp.zeros((batch_size, s, s, 3), jnp.float32),
      "events": jnp.zeros((batch_size, e, d), jnp.float32),
      "event_mask": jnp.ones((batch_size, e), bool),
  }


def unet_input(z_t, prev_mean, cfg):
  """The UNet input: z_t, and the scaled VAE mean of I_prev concatenated when the config asks."""
  if cfg.model.conditioner.vae_concat:
    return jnp.concatenate([z_t, prev_mean * cfg.diffusion.scale_factor], axis=-1)
  return z_t


def init_ldm(cfg, rng, batch_size: int = 1) -> dict:
  """Boxed (logically partitioned) parameters {'unet', 'conditioner', 'vae'} of the LDM.

  Use through `jax.eval_shape(functools.partial(init_ldm, cfg), rng)` for shapes, or inside a
  `jax.jit` with out_shardings for real weights.
  """
  vae, unet, cond = build_vae(cfg), build_unet(cfg), build_conditioner(cfg)
  batch = dummy_batch(cfg, batch_size)
  r_vae, r_unet, r_cond = jax.random.split(rng, 3)
  vae_vars = vae.init(r_vae, batch["prev_image"])
  h, w, c = latent_shape(cfg)
  prev_mean = jnp.zeros((batch_size, h, w, c), jnp.float32)
  cond_inputs = (batch["prev_image"], prev_mean, batch["events"], batch["event_mask"])
  cond_vars = cond.init(r_cond, *cond_inputs)
  context = jax.eval_shape(lambda: cond.apply(cond_vars, *cond_inputs))
  context = None if context is None else jnp.zeros(context.shape, context.dtype)
  z = unet_input(jnp.zeros((batch_size, h, w, c)), prev_mean, cfg)
  tokens, y = split_context(context, cfg)
  unet_vars = unet.init(r_unet, z, jnp.zeros((batch_size,), jnp.int32), tokens, y)
  # A conditioner with no cross-attention stream (the 'VAE concat only' ablation) has no parameters.
  return {"unet": unet_vars["params"], "conditioner": cond_vars.get("params", {}),
          "vae": vae_vars["params"]}


def param_count(tree) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(nn.unbox(tree))))
