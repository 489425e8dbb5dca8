"""The LDM denoising UNet (CompVis latent-diffusion `openaimodel.UNetModel`, spatial transformers).

Architecture (paper: model_channels 224, channel_mult (1, 2, 4, 4), 2 res blocks per level, spatial
transformers at levels 1, 2, 3 and in the middle block, 8 heads, depth 1, context 768; 505,780,355
parameters):
  t -> sinusoidal embedding (cos first, width model_channels) -> Dense, SiLU, Dense (4 x width)
  x -> conv_in -> per level L: `num_res_blocks` x [ResBlock (+ SpatialTransformer if L in
       attention_levels)], then a stride-2 conv downsample except at the last level
    -> middle: ResBlock, SpatialTransformer, ResBlock
    -> per level L (deepest first): `num_res_blocks + 1` x [concat skip, ResBlock
       (+ SpatialTransformer)], then nearest x2 upsample + conv except at level 0
    -> GroupNorm, SiLU, conv_out
ResBlock: GroupNorm(eps 1e-5), SiLU, conv3x3, + Dense(SiLU(t_emb)), GroupNorm, SiLU, conv3x3, plus
the input (through a 1x1 conv when the width changes); no scale-shift norm, dropout 0.
SpatialTransformer: GroupNorm(eps 1e-6), 1x1 conv proj_in, `transformer_depth` x
BasicTransformerBlock (LN, self-attention; LN, cross-attention to the context (self-attention when
the context is None); LN, GEGLU feed-forward x4), 1x1 conv proj_out, plus the input. Head dim =
channels / num_heads.

NHWC throughout; the activations between blocks and the context carry the logical axis 'batch'
(layers.constrain). Parameter names: time_embed_0, time_embed_1, conv_in, down_{L}_res_{i},
down_{L}_attn_{i}, down_{L}_downsample, mid_res_0, mid_attn, mid_res_1, up_{L}_res_{i},
up_{L}_attn_{i}, up_{L}_upsample, norm_out, conv_out, with the level index L as in LDM (0 = full
resolution) on both paths. Inside a ResBlock: norm1, conv1, emb_proj, norm2, conv2, skip; inside a
SpatialTransformer: norm, proj_in, block_{d} (norm1, attn1 {q, k, v, out}, norm2, attn2, norm3,
ff_in, ff_out), proj_out.
"""
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ehrxdiff_jax.nn.attention import MultiHeadAttention
from ehrxdiff_jax.nn.layers import (CONV_KERNEL_AXES, Conv, Dense, GroupNorm, LayerNorm,
                                   compute_dtype, constrain, maybe_remat, partitioned)

Dtype = Any
BLOCK_AXES = ("batch", None, None, None)  # logical axes of the NHWC activations between blocks
CONTEXT_AXES = ("batch", None, None)       # the cross-attention context [B, T, D]


def _dtype(dtype) -> Dtype:
  return compute_dtype(dtype) if isinstance(dtype, str) else dtype


def ZeroConv(features: int, kernel_size: int, *, dtype: Dtype, name: str) -> nn.Conv:
  """layers.Conv (stride 1, 'same' padding, same logical axes) with a zero kernel, as LDM's
  zero_module() does for the last conv of every ResBlock, every SpatialTransformer's proj_out and
  the output conv."""
  pad = kernel_size // 2
  return nn.Conv(features, (kernel_size, kernel_size), padding=((pad, pad), (pad, pad)),
                 dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=partitioned(nn.initializers.zeros_init(), CONV_KERNEL_AXES),
                 bias_init=partitioned(nn.initializers.zeros_init(), ("conv_out",)), name=name)


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """LDM sinusoidal embedding [B] -> [B, dim] float32: [cos(t f_i), sin(t f_i)],
  f_i = max_period^(-i/half)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


class ResBlock(nn.Module):
  """LDM ResBlock conditioned on the time embedding (added after the first conv)."""
  out_channels: int
  norm_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb):
    dt = _dtype(self.dtype)
    h = GroupNorm(self.norm_groups, 1e-5, dtype=dt, name="norm1")(x)
    h = Conv(self.out_channels, 3, padding=1, dtype=dt, name="conv1")(nn.silu(h))
    e = Dense(self.out_channels, ("embed", "conv_out"), dtype=dt, name="emb_proj")(nn.silu(emb))
    h = h + e[:, None, None, :].astype(h.dtype)
    h = GroupNorm(self.norm_groups, 1e-5, dtype=dt, name="norm2")(h)
    h = ZeroConv(self.out_channels, 3, dtype=dt, name="conv2")(nn.silu(h))
    if x.shape[-1] != self.out_channels:
      x = Conv(self.out_channels, 1, padding=0, dtype=dt, name="skip")(x)
    return x.astype(h.dtype) + h


class BasicTransformerBlock(nn.Module):
  """Pre-LN block: self-attention, cross-attention to `context` (self when None), GEGLU FF."""
  num_heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, context=None):
    dt = _dtype(self.dtype)
    dim = x.shape[-1]
    attn = lambda name: MultiHeadAttention(self.num_heads, self.head_dim, dim, qkv_bias=False,
                                           dtype=dt, implementation=self.attention, name=name)
    x = x + attn("attn1")(LayerNorm(1e-5, dtype=dt, name="norm1")(x))
    h = LayerNorm(1e-5, dtype=dt, name="norm2")(x)
    x = x + attn("attn2")(h, None if context is None else context.astype(dt))
    h = LayerNorm(1e-5, dtype=dt, name="norm3")(x)
    h = Dense(8 * dim, ("embed", "mlp"), dtype=dt, name="ff_in")(h)
    h, gate = jnp.split(h, 2, axis=-1)
    h = h * nn.gelu(gate, approximate=False)
    return x + Dense(dim, ("mlp", "embed"), dtype=dt, name="ff_out")(h)


class SpatialTransformer(nn.Module):
  """GroupNorm, 1x1 conv in, transformer blocks over the h*w tokens, 1x1 conv out, residual."""
  num_heads: int
  depth: int = 1
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  attention: str = "auto"
  remat: str = "none"

  @nn.compact
  def __call__(self, x, context=None):
    dt = _dtype(self.dtype)
    b, hh, ww, c = x.shape
    if c % self.num_heads:
      raise ValueError(f"{c} channels do not split into {self.num_heads} heads")
    h = GroupNorm(self.norm_groups, 1e-6, dtype=dt, name="norm")(x)
    h = Conv(c, 1, padding=0, dtype=dt, name="proj_in")(h)
    h = h.reshape(b, hh * ww, c)
    block_cls = maybe_remat(BasicTransformerBlock, self.remat)
    for d in range(self.depth):
      h = block_cls(self.num_heads, c // self.num_heads, dtype=dt, attention=self.attention,
                    name=f"block_{d}")(h, context)
    h = h.reshape(b, hh, ww, c)
    h = ZeroConv(c, 1, dtype=dt, name="proj_out")(h)
    return x.astype(h.dtype) + h


class Downsample(nn.Module):
  """3x3 conv, stride 2, padding 1."""
  channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return Conv(self.channels, 3, strides=2, padding=1, dtype=_dtype(self.dtype), name="conv")(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""
  channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return Conv(self.channels, 3, padding=1, dtype=_dtype(self.dtype), name="conv")(x)


class UNet(nn.Module):
  """The LDM UNet: fields are the keys of `cfg.model.unet` plus dtype, attention, remat."""
  in_channels: int = 3
  out_channels: int = 3
  model_channels: int = 224
  channel_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attention_levels: Sequence[int] = (1, 2, 3)
  num_heads: int = 8
  transformer_depth: int = 1
  context_dim: int = 768
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  attention: str = "auto"
  remat: str = "none"
  # > 0: a vector y [B, adm_in_channels] is added to the time embedding through Dense, SiLU, Dense
  # (LDM's `label_emb` for adm_in_channels, names label_emb_0/1). Not in the paper's UNet (0); the demo
  # feeds the pooled table-tower tokens here (model.conditioner.pooled_events).
  adm_in_channels: int = 0

  @nn.compact
  def __call__(self, x, timesteps, context=None, y=None):
    """x [B, h, w, in_channels], timesteps [B] (int or float), context [B, T, context_dim]|None,
    y [B, adm_in_channels] when adm_in_channels > 0."""
    dt = _dtype(self.dtype)
    if x.shape[-1] != self.in_channels:
      raise ValueError(f"UNet expects {self.in_channels} input channels, got {x.shape}")
    if context is not None and context.shape[-1] != self.context_dim:
      raise ValueError(f"UNet expects context width {self.context_dim}, got {context.shape}")
    n_levels = len(self.channel_mult)
    if x.shape[1] % 2 ** (n_levels - 1) or x.shape[2] % 2 ** (n_levels - 1):
      raise ValueError(f"spatial size {x.shape[1:3]} must be divisible by {2 ** (n_levels - 1)}")
    res_cls = maybe_remat(ResBlock, self.remat)
    attn_levels = set(self.attention_levels)
    mc = self.model_channels

    def transformer(name):
      return SpatialTransformer(self.num_heads, self.transformer_depth, self.norm_groups, dtype=dt,
                                attention=self.attention, remat=self.remat, name=name)

    t = timestep_embedding(jnp.reshape(timesteps, (-1,)), mc)
    t = jnp.broadcast_to(t, (x.shape[0], mc)) if t.shape[0] == 1 else t
    emb = Dense(4 * mc, ("embed", "mlp"), dtype=dt, name="time_embed_0")(t)
    emb = Dense(4 * mc, ("mlp", "embed"), dtype=dt, name="time_embed_1")(nn.silu(emb))
    if self.adm_in_channels:
      if y is None or y.shape[-1] != self.adm_in_channels:
        raise ValueError(f"UNet with adm_in_channels={self.adm_in_channels} needs y [B, "
                         f"{self.adm_in_channels}], got {None if y is None else y.shape}")
      e = Dense(4 * mc, (None, "mlp"), dtype=dt, name="label_emb_0")(y.astype(dt))
      emb = emb + Dense(4 * mc, ("mlp", "embed"), dtype=dt, name="label_emb_1")(nn.silu(e))

    act = lambda a: constrain(a, BLOCK_AXES)  # noqa: E731 - every block's input and output
    context = None if context is None else constrain(context, CONTEXT_AXES)
    h = act(Conv(mc, 3, padding=1, dtype=dt, name="conv_in")(act(x)))
    skips = [h]
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        res = res_cls(mult * mc, self.norm_groups, dtype=dt, name=f"down_{level}_res_{i}")
        h = act(res(h, emb))
        if level in attn_levels:
          h = act(transformer(f"down_{level}_attn_{i}")(h, context))
        skips.append(h)
      if level != n_levels - 1:
        h = act(Downsample(h.shape[-1], dtype=dt, name=f"down_{level}_downsample")(h))
        skips.append(h)

    h = act(res_cls(h.shape[-1], self.norm_groups, dtype=dt, name="mid_res_0")(h, emb))
    h = act(transformer("mid_attn")(h, context))
    h = act(res_cls(h.shape[-1], self.norm_groups, dtype=dt, name="mid_res_1")(h, emb))

    for level in reversed(range(n_levels)):
      mult = self.channel_mult[level]
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
        h = act(res_cls(mult * mc, self.norm_groups, dtype=dt, name=f"up_{level}_res_{i}")(h, emb))
        if level in attn_levels:
          h = act(transformer(f"up_{level}_attn_{i}")(h, context))
      if level != 0:
        h = act(Upsample(h.shape[-1], dtype=dt, name=f"up_{level}_upsample")(h))

    h = GroupNorm(self.norm_groups, 1e-5, dtype=dt, name="norm_out")(h)
    h = ZeroConv(self.out_channels, 3, dtype=dt, name="conv_out")(nn.silu(h))
    return act(h.astype(x.dtype))
