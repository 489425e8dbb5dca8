"""The KL autoencoder (LDM / Cheff `AutoencoderKL`): images [B, H, W, C] in [-1, 1] <-> latents [B, h, w, z].

Architecture (CompVis latent-diffusion `Encoder` / `Decoder`, no attention except the mid blocks):
  encoder: conv_in -> per level `num_res_blocks` ResnetBlocks (+ a stride-2 downsample except at the
           last level) -> mid (res, single-head self-attention, res) -> norm, swish, conv_out to 2*z
  quant_conv (1x1, 2z -> 2*embed_dim) -> DiagonalGaussian (mean = [..., :embed_dim], logvar = rest)
  post_quant_conv (1x1, embed_dim -> z) -> decoder: conv_in -> mid -> per level (coarsest first)
           `num_res_blocks + 1` ResnetBlocks (+ nearest x2 upsample and conv except at level 0)
           -> norm, swish, conv_out
NHWC throughout; the latent channels are the last axis. Parameter names (flat inside `encoder` /
`decoder`): conv_in, down_{i}_block_{j}, down_{i}_downsample, mid_block_1, mid_attn_1, mid_block_2,
up_{i}_block_{j}, up_{i}_upsample, norm_out, conv_out; level index i as in LDM (0 = full resolution).
"""
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ehrxdiff_jax.nn.attention import dot_product_attention
from ehrxdiff_jax.nn.layers import Conv, Dense, GroupNorm, compute_dtype, maybe_remat

Dtype = Any


def _dtype(dtype) -> Dtype:
  return compute_dtype(dtype) if isinstance(dtype, str) else dtype


@flax.struct.dataclass
class DiagonalGaussian:
  """q(z|x) = N(mean, exp(logvar)) per latent element; a pytree, so it passes through jit.

  Build it with `from_moments` (which clips logvar to [-30, 20] as LDM does).
  """
  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
    """moments [..., 2*z]: mean = moments[..., :z], logvar = moments[..., z:] (clipped to [-30, 20])."""
    z = moments.shape[-1] // 2
    return cls(mean=moments[..., :z], logvar=jnp.clip(moments[..., z:], -30.0, 20.0))

  @property
  def moments(self) -> jax.Array:
    """[..., 2*z]: mean and (clipped) logvar, the layout of cached `target_moments`."""
    return jnp.concatenate([self.mean, self.logvar], axis=-1)

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  def sample(self, rng: jax.Array) -> jax.Array:
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL(q || N(0, I)) summed over every non-batch axis: [B]."""
    axes = tuple(range(1, self.mean.ndim))
    return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=axes)

  def nll(self, x: jax.Array) -> jax.Array:
    """Negative log-likelihood of x under q, summed over every non-batch axis: [B]."""
    axes = tuple(range(1, self.mean.ndim))
    return 0.5 * jnp.sum(jnp.log(2.0 * jnp.pi) + self.logvar + jnp.square(x - self.mean) / self.var,
                         axis=axes)


class ResnetBlock(nn.Module):
  """norm1, swish, conv1, norm2, swish, conv2 (+ 1x1 `nin_shortcut` when the width changes)."""
  out_channels: int
  norm_groups: int = 32
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = GroupNorm(self.norm_groups, self.norm_eps, dtype=self.dtype, name="norm1")(x)
    h = Conv(self.out_channels, 3, dtype=self.dtype, name="conv1")(nn.swish(h))
    h = GroupNorm(self.norm_groups, self.norm_eps, dtype=self.dtype, name="norm2")(h)
    h = Conv(self.out_channels, 3, dtype=self.dtype, name="conv2")(nn.swish(h))
    if x.shape[-1] != self.out_channels:
      x = Conv(self.out_channels, 1, dtype=self.dtype, name="nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over the H*W positions with a residual (q, k, v, proj_out as Dense)."""
  norm_groups: int = 32
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    h = GroupNorm(self.norm_groups, self.norm_eps, dtype=self.dtype, name="norm")(x)
    h = h.reshape(b, hgt * wid, c)
    q = Dense(c, ("embed", "heads"), dtype=self.dtype, name="q")(h)
    k = Dense(c, ("embed", "heads"), dtype=self.dtype, name="k")(h)
    v = Dense(c, ("embed", "heads"), dtype=self.dtype, name="v")(h)
    o = dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None], implementation=self.attention)
    o = Dense(c, ("heads", "embed"), dtype=self.dtype, name="proj_out")(o[:, :, 0])
    return x + o.reshape(b, hgt, wid, c)


def downsample_factor(ch_mult: Sequence[int]) -> int:
  """f, the image-to-latent size ratio: one stride-2 downsample between consecutive levels."""
  return 2 ** (len(ch_mult) - 1)


def _downsample(x, conv):
  # LDM pads right and bottom by one, then a 3x3 stride-2 convolution without padding.
  return conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


def _upsample(x):
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


class Encoder(nn.Module):
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  z_channels: int
  norm_groups: int = 32
  norm_eps: float = 1e-6
  double_z: bool = True
  dtype: Dtype = jnp.float32
  attention: str = "auto"
  remat: str = "none"

  @nn.compact
  def __call__(self, x):
    block = maybe_remat(ResnetBlock, self.remat)
    kw = dict(norm_groups=self.norm_groups, norm_eps=self.norm_eps, dtype=self.dtype)
    h = Conv(self.ch, 3, dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = block(self.ch * mult, **kw, name=f"down_{i}_block_{j}")(h)
      if i != len(self.ch_mult) - 1:
        h = _downsample(h, Conv(self.ch * mult, 3, strides=2, padding="VALID", dtype=self.dtype,
                                name=f"down_{i}_downsample"))
    width = h.shape[-1]
    h = block(width, **kw, name="mid_block_1")(h)
    h = AttnBlock(**kw, attention=self.attention, name="mid_attn_1")(h)
    h = block(width, **kw, name="mid_block_2")(h)
    h = nn.swish(GroupNorm(self.norm_groups, self.norm_eps, dtype=self.dtype, name="norm_out")(h))
    out = 2 * self.z_channels if self.double_z else self.z_channels
    return Conv(out, 3, dtype=self.dtype, name="conv_out")(h)


class Decoder(nn.Module):
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  out_channels: int
  norm_groups: int = 32
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  attention: str = "auto"
  remat: str = "none"

  @nn.compact
  def __call__(self, z):
    block = maybe_remat(ResnetBlock, self.remat)
    kw = dict(norm_groups=self.norm_groups, norm_eps=self.norm_eps, dtype=self.dtype)
    width = self.ch * self.ch_mult[-1]
    h = Conv(width, 3, dtype=self.dtype, name="conv_in")(z.astype(self.dtype))
    h = block(width, **kw, name="mid_block_1")(h)
    h = AttnBlock(**kw, attention=self.attention, name="mid_attn_1")(h)
    h = block(width, **kw, name="mid_block_2")(h)
    for i in reversed(range(len(self.ch_mult))):
      for j in range(self.num_res_blocks + 1):
        h = block(self.ch * self.ch_mult[i], **kw, name=f"up_{i}_block_{j}")(h)
      if i != 0:
        h = Conv(h.shape[-1], 3, dtype=self.dtype, name=f"up_{i}_upsample")(_upsample(h))
    h = nn.swish(GroupNorm(self.norm_groups, self.norm_eps, dtype=self.dtype, name="norm_out")(h))
    return Conv(self.out_channels, 3, dtype=self.dtype, name="conv_out")(h)


class AutoencoderKL(nn.Module):
  """The KL-regularised autoencoder; fields are the keys of `cfg.model.vae` plus dtype/attention/remat.

  `encode(x) -> DiagonalGaussian` (float32 moments), `decode(z) -> image` (float32), and
  `__call__(x, sample_rng=None)` reconstructs through the posterior mode (or a sample given a key).
  Latents [B, H/f, W/f, embed_dim] with f = `downsample_factor(ch_mult)`.
  """
  in_channels: int = 3
  out_channels: int = 3
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 2
  z_channels: int = 3
  embed_dim: int = 3
  norm_groups: int = 32
  norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  attention: str = "auto"
  remat: str = "none"

  def setup(self):
    dt = _dtype(self.dtype)
    common = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                  norm_groups=self.norm_groups, norm_eps=self.norm_eps, dtype=dt,
                  attention=self.attention, remat=self.remat)
    self.encoder = Encoder(z_channels=self.z_channels, **common)
    self.decoder = Decoder(out_channels=self.out_channels, **common)
    self.quant_conv = Conv(2 * self.embed_dim, 1, dtype=dt)
    self.post_quant_conv = Conv(self.z_channels, 1, dtype=dt)

  @property
  def downsample_factor(self) -> int:
    return downsample_factor(self.ch_mult)

  def encode(self, x: jax.Array) -> DiagonalGaussian:
    """x [B, H, W, in_channels] in [-1, 1] -> posterior over latents [B, H/f, W/f, embed_dim]."""
    if x.shape[-1] != self.in_channels:
      raise ValueError(f"expected {self.in_channels} input channels (NHWC), got shape {x.shape}")
    moments = self.quant_conv(self.encoder(x))
    return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

  def decode(self, z: jax.Array) -> jax.Array:
    """z [B, h, w, embed_dim] (unscaled latents) -> image [B, h*f, w*f, out_channels] (float32)."""
    h = self.post_quant_conv(z.astype(_dtype(self.dtype)))
    return self.decoder(h).astype(jnp.float32)

  def __call__(self, x: jax.Array, sample_rng: jax.Array | None = None) -> jax.Array:
    posterior = self.encode(x)
    z = posterior.mode() if sample_rng is None else posterior.sample(sample_rng)
    return self.decode(z)
