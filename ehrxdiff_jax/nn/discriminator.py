"""The PatchGAN discriminator of the LDM autoencoder recipe (taming-transformers `NLayerDiscriminator`,
pix2pix) and its hinge losses.

  conv4x4 s2 (in -> ndf) + bias, LeakyReLU(0.2)
  for n in 1 .. n_layers-1: conv4x4 s2 (ndf*min(2^(n-1), 8) -> ndf*min(2^n, 8)), no bias, BatchNorm, LeakyReLU
  conv4x4 s1 (-> ndf*min(2^n_layers, 8)), no bias, BatchNorm, LeakyReLU(0.2)
  conv4x4 s1 (-> 1) + bias: a map of patch logits ([B, 30, 30, 1] for 256 px, n_layers=3)
All convolutions pad 1. Initialisation as taming's `weights_init`: conv kernels N(0, 0.02), norm scales
N(1, 0.02), norm offsets 0 (`dcgan_init`).

BatchNorm: torch's training-mode BatchNorm normalises with the statistics of the current batch (biased
variance, eps 1e-5); that is what this module always does (`BatchStatNorm`, no running averages, so the
parameter tree is all there is and the loop needs no extra state). The only difference is in eval mode,
where torch would use running averages; the discriminator only serves the training loss. Under jit the
statistics are over the whole global batch (torch DDP without SyncBN uses each GPU's share).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ehrxdiff_jax.nn.layers import Conv, partitioned


class BatchStatNorm(nn.Module):
  """BatchNorm2d in training mode: per-channel mean/var over (N, H, W) of this call, then scale + bias."""
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", partitioned(nn.initializers.ones_init(), ("norm",)), (c,), jnp.float32)
    bias = self.param("bias", partitioned(nn.initializers.zeros_init(), ("norm",)), (c,), jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(self.dtype)


class NLayerDiscriminator(nn.Module):
  ndf: int = 64
  n_layers: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = Conv(self.ndf, 4, strides=2, padding=1, dtype=self.dtype, name="conv_0")(x.astype(self.dtype))
    h = nn.leaky_relu(h, 0.2)
    mult = 1
    for n in range(1, self.n_layers):
      mult = min(2 ** n, 8)
      h = Conv(self.ndf * mult, 4, strides=2, padding=1, use_bias=False, dtype=self.dtype, name=f"conv_{n}")(h)
      h = nn.leaky_relu(BatchStatNorm(dtype=self.dtype, name=f"norm_{n}")(h), 0.2)
    mult = min(2 ** self.n_layers, 8)
    n = self.n_layers
    h = Conv(self.ndf * mult, 4, strides=1, padding=1, use_bias=False, dtype=self.dtype, name=f"conv_{n}")(h)
    h = nn.leaky_relu(BatchStatNorm(dtype=self.dtype, name=f"norm_{n}")(h), 0.2)
    return Conv(1, 4, strides=1, padding=1, dtype=self.dtype, name="conv_out")(h).astype(jnp.float32)


def dcgan_init(params: Any, rng: jax.Array) -> Any:
  """taming's weights_init on a (boxed or plain) discriminator tree: conv kernels ~ N(0, 0.02), norm
  scales ~ N(1, 0.02), biases unchanged (zeros)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  keys = jax.random.split(rng, max(len(flat), 1))
  out = []
  for (path, leaf), key in zip(flat, keys):
    names = [str(getattr(p, "key", p)) for p in path]
    value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
    if names[-1] == "kernel":
      new = 0.02 * jax.random.normal(key, value.shape, value.dtype)
    elif names[-1] == "scale" and names[-2].startswith("norm_"):
      new = 1.0 + 0.02 * jax.random.normal(key, value.shape, value.dtype)
    else:
      new = value
    out.append(leaf.replace_boxed(new) if isinstance(leaf, nn.Partitioned) else new)
  return jax.tree_util.tree_unflatten(treedef, out)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_rec))))."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_loss(logits_fake: jax.Array) -> jax.Array:
  """The generator's adversarial loss: -mean(D(x_rec))."""
  return -jnp.mean(logits_fake)
