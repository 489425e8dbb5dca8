"""The one attention function and multi-head attention module used by every network.

`dot_product_attention` dispatches to `jax.nn.dot_product_attention`: the fused cuDNN kernel on NVIDIA
GPUs in half precision, XLA's implementation elsewhere (CPU, TPU, fp32). The choice is the config field
`model.attention` ('auto' | 'xla' | 'cudnn').

Dropout on the attention probabilities (torch.nn.MultiheadAttention's `dropout`, used by the table
tower in training) is computed by the XLA formulation below whatever the implementation: the fused
cuDNN kernel behind `jax.nn.dot_product_attention` takes no dropout. Without dropout (evaluation, or a
rate of 0) the dispatch above is unchanged.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ehrxdiff_jax.nn.layers import Dense, constrain

IMPLEMENTATIONS = ("auto", "xla", "cudnn")
QKV_AXES = ("batch", None, "heads", None)  # logical axes of q, k, v [B, L, H, D]


def resolve_implementation(implementation: str, dtype, head_dim: int) -> str:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; expected {IMPLEMENTATIONS}")
  if implementation != "auto":
    return implementation
  # cuDNN's fused kernel takes half precision and head dims that are multiples of 8 up to 128.
  fused_ok = (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
              and head_dim % 8 == 0 and head_dim <= 128)
  return "cudnn" if fused_ok else "xla"


def _attention_with_dropout(q, k, v, key_mask, rate: float, rng):
  """XLA attention with inverted dropout on the probabilities, as torch.nn.MultiheadAttention in
  training: softmax (fp32 logits, as jax's XLA path), then each probability is zeroed with probability
  `rate` (independently per batch row, head, query and key) and the kept ones are scaled by 1/(1-rate)."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / np.sqrt(q.shape[-1])
  if key_mask is not None:
    logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  keep = jax.random.bernoulli(rng, 1.0 - rate, probs.shape)
  probs = jnp.where(keep, probs / (1.0 - rate), 0.0).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def dot_product_attention(q, k, v, *, key_mask=None, implementation: str = "auto", dropout_rate: float = 0.0,
                          dropout_rng=None):
  """Scaled dot-product attention.

  Args:
    q: [B, Lq, H, D]; k, v: [B, Lk, H, D].
    key_mask: optional [B, Lk] bool, True where the key is a real token (padding is False).
      For the cuDNN path padding must be a suffix (valid tokens first), which the input pipeline
      guarantees; it is passed as key lengths.
    implementation: 'auto' | 'xla' | 'cudnn'.
    dropout_rate: dropout on the attention probabilities (training); > 0 needs `dropout_rng` and always
      runs the XLA formulation (the fused kernel has no dropout).
  Returns: [B, Lq, H, D].
  """
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"attention dropout rate must be in [0, 1), got {dropout_rate}")
  if dropout_rate > 0.0:
    if dropout_rng is None:
      raise ValueError("attention dropout (dropout_rate > 0) needs a dropout_rng")
    return _attention_with_dropout(q, k, v, key_mask, dropout_rate, dropout_rng)
  impl = resolve_implementation(implementation, q.dtype, q.shape[-1])
  if key_mask is None:
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)
  if impl == "cudnn":
    lengths = jnp.sum(key_mask, axis=-1).astype(jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=impl)
  return jax.nn.dot_product_attention(q, k, v, mask=key_mask[:, None, None, :], implementation=impl)


class MultiHeadAttention(nn.Module):
  """Multi-head attention with separate q/k/v projections (names: q, k, v, out).

  Self-attention when `context` is None, cross-attention otherwise. `dropout` is the dropout rate of
  the attention probabilities, active with `deterministic=False` (then it needs a 'dropout' rng).
  """
  num_heads: int
  head_dim: int
  out_features: int
  qkv_bias: bool = True
  out_bias: bool = True
  dtype: Any = jnp.float32
  implementation: str = "auto"
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, context=None, key_mask=None, deterministic: bool = True):
    context = x if context is None else context
    inner = self.num_heads * self.head_dim
    b, lq = x.shape[0], x.shape[1]
    q = Dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, dtype=self.dtype, name="q")(x)
    k = Dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, dtype=self.dtype, name="k")(context)
    v = Dense(inner, ("embed", "heads"), use_bias=self.qkv_bias, dtype=self.dtype, name="v")(context)
    q, k, v = (constrain(t.reshape(b, t.shape[1], self.num_heads, self.head_dim), QKV_AXES)
               for t in (q, k, v))
    rate = 0.0 if deterministic else self.dropout
    out = dot_product_attention(q, k, v, key_mask=key_mask, implementation=self.implementation, dropout_rate=rate,
                                dropout_rng=self.make_rng("dropout") if rate > 0.0 else None)
    out = out.reshape(b, lq, inner)
    return Dense(self.out_features, ("heads", "embed"), use_bias=self.out_bias, dtype=self.dtype,
                 name="out")(out)
