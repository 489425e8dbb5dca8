"""The CLIP image tower: an OpenAI-CLIP Vision Transformer (ViT-B/32 at 256 px in the paper).

Patch convolution (no bias) -> [CLS] + patch tokens + learned positional embedding -> ln_pre ->
`layers` pre-LN residual blocks (LN, multi-head self-attention with q/k/v biases, LN, MLP with
QuickGELU x*sigmoid(1.702x)); every LayerNorm has eps 1e-5.

`__call__` returns all 1 + (image_size/patch_size)^2 tokens WITHOUT ln_post: that is what the conditioner
feeds to the fusion adapter (65 x 768 at the paper config). `pooled` returns ln_post(CLS), the image
embedding of CLIP pretraining; the reference's `proj` is set to None there, so there is no projection.
The ln_post parameters exist only when `pooled` is used (submodules declared in `setup` are lazy).

Parameter names: patch_embed (conv kernel [p, p, 3, W]), class_embedding [W], positional_embedding
[1+N, W], ln_pre, blocks_{i}/{ln_1, attn/{q,k,v,out}, ln_2, fc1, fc2}, ln_post.

The same encoder serves the DINO/timm ViT of the evaluation classifiers (evaluate/vit_classifier.py), so
that one ViT block exists: `ln_eps` (timm: 1e-6), `activation` ('quick_gelu' | 'gelu', exact erf GELU as
torch nn.GELU), `patch_bias` (timm's patch conv has a bias) and `pre_norm=False` (no ln_pre) select it;
`hidden_states` returns the outputs of the last blocks (DINO `get_intermediate_layers`).
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ehrxdiff_jax.nn.attention import MultiHeadAttention
from ehrxdiff_jax.nn.layers import Conv, Dense, LayerNorm, compute_dtype, maybe_remat, partitioned

LN_EPS = 1e-5


def as_dtype(dtype):
  """Accepts a jnp dtype or its config string ('float32' | 'bfloat16' | 'float16')."""
  return compute_dtype(dtype) if isinstance(dtype, str) else dtype


def quick_gelu(x):
  return x * nn.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: nn.gelu(x, approximate=False)}


class ResidualAttentionBlock(nn.Module):
  """Pre-LN transformer block of OpenAI CLIP (and timm / DINO with ln_eps 1e-6, activation 'gelu'):
  x + attn(ln_1(x)); x + mlp(ln_2(x))."""
  width: int
  heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  attention: str = "auto"
  ln_eps: float = LN_EPS
  activation: str = "quick_gelu"

  @nn.compact
  def __call__(self, x):
    h = LayerNorm(self.ln_eps, dtype=self.dtype, name="ln_1")(x)
    h = MultiHeadAttention(num_heads=self.heads, head_dim=self.width // self.heads, out_features=self.width,
                           dtype=self.dtype, implementation=self.attention, name="attn")(h)
    x = x + h
    h = LayerNorm(self.ln_eps, dtype=self.dtype, name="ln_2")(x)
    h = Dense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype, name="fc1")(h)
    h = ACTIVATIONS[self.activation](h)
    h = Dense(self.width, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)
    return x + h


class VisionTransformer(nn.Module):
  """OpenAI-CLIP ViT image tower. Fields as `cfg.model.image_tower` plus dtype, attention, remat."""
  image_size: int = 256
  patch_size: int = 32
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  dtype: Any = jnp.float32
  attention: str = "auto"
  remat: str = "none"
  ln_eps: float = LN_EPS
  activation: str = "quick_gelu"
  patch_bias: bool = False
  pre_norm: bool = True

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    """1 + (image_size // patch_size)^2: the token count of `__call__` (65 at the paper config)."""
    return 1 + self.grid ** 2

  def setup(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
    if self.width % self.heads:
      raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"unknown activation {self.activation!r}; expected one of {sorted(ACTIVATIONS)}")
    dtype = as_dtype(self.dtype)
    scale = self.width ** -0.5
    self.patch_embed = Conv(self.width, self.patch_size, strides=self.patch_size, padding="VALID",
                            use_bias=self.patch_bias, dtype=dtype)
    self.class_embedding = self.param(
        "class_embedding", partitioned(nn.initializers.normal(scale), ("embed",)), (self.width,), jnp.float32)
    self.positional_embedding = self.param(
        "positional_embedding", partitioned(nn.initializers.normal(scale), ("tokens", "embed")),
        (self.num_tokens, self.width), jnp.float32)
    self.ln_pre = LayerNorm(self.ln_eps, dtype=dtype) if self.pre_norm else None
    block = maybe_remat(ResidualAttentionBlock, self.remat)
    self.blocks = [block(self.width, self.heads, self.mlp_dim, dtype=dtype, attention=self.attention,
                         ln_eps=self.ln_eps, activation=self.activation)
                   for _ in range(self.layers)]
    self.ln_post = LayerNorm(self.ln_eps, dtype=dtype)

  def __call__(self, images):
    """images [B, H, W, 3] (NHWC, in [-1, 1] in this project) -> tokens [B, 1 + N, width] (no ln_post)."""
    return self.hidden_states(images, 1)[0]

  def hidden_states(self, images, n_last: int) -> list:
    """The token outputs [B, 1 + N, width] of the last `n_last` blocks, in block order (no ln_post)."""
    if not 1 <= n_last <= self.layers:
      raise ValueError(f"n_last must be in [1, {self.layers}], got {n_last}")
    b, h, w, _ = images.shape
    if h != self.image_size or w != self.image_size:
      raise ValueError(f"image tower expects {self.image_size}x{self.image_size} images, got {h}x{w}; "
                       "adapt the positional embedding (interop.clip.adapt_position_embedding) for another size")
    dtype = as_dtype(self.dtype)
    x = self.patch_embed(images.astype(dtype))                     # [B, g, g, W]
    x = x.reshape(b, -1, self.width)                               # row-major patches, as torch's NCHW flatten
    cls = jnp.broadcast_to(self.class_embedding.astype(x.dtype), (b, 1, self.width))
    x = jnp.concatenate([cls, x], axis=1)
    x = x + self.positional_embedding.astype(x.dtype)
    if self.ln_pre is not None:
      x = self.ln_pre(x)
    outputs = []
    for i, blk in enumerate(self.blocks):
      x = blk(x)
      if self.layers - i <= n_last:
        outputs.append(x)
    return outputs

  def pooled(self, images):
    """The CLIP image embedding: ln_post(CLS token) [B, width] (the reference sets `proj` to None)."""
    return self.ln_post(self(images)[:, 0])
