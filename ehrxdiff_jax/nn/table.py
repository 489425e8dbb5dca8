"""The CLIP table tower: a PyTorch-style Transformer encoder over the event embeddings.

Semantics of `torch.nn.TransformerEncoder(TransformerEncoderLayer(d_model=event_dim, nhead=heads,
dim_feedforward=ff_dim, dropout, batch_first=True), layers)` with its defaults (post-LN, ReLU,
LayerNorm eps 1e-5) and a key padding mask, then one Linear event_dim -> out_dim applied to every
token (the reference's `TabTransformerEmbedder.fc`). There is NO positional encoding: the events are a
set (their order only matters through the padding mask).

Per layer:  x = norm1(x + dropout(self_attn(x)));  x = norm2(x + dropout(linear2(dropout(relu(linear1(x)))))),
and self_attn drops attention probabilities too: torch uses the one rate `dropout` at every site; here the
attention-probability site has its own field `attention_dropout` (default = torch's 0.1) because it is the
one that costs memory: dropping probabilities needs the XLA attention path, which materialises the
[B, heads, L, L] probabilities (24 x 1024^2 per sample at paper scale) where the fused kernel does not.
Dropout is active when `deterministic=False` and then needs a 'dropout' rng.

`project=False` leaves out `fc` and returns the encoder output (the table-classifier baselines,
train/classifier.py, use the encoder alone).

Padded slots at inference (`padded_slots_at_inference`, deterministic calls only): 'train' keeps what the
encoder computes there (padded queries still attend to the valid events), as torch does with gradients
on; 'zero' sets the encoder output of every padded slot to 0 before `fc` (so those tokens are fc's bias),
as torch's eval-mode TransformerEncoder does under no_grad: its nested-tensor fast path drops the padded
slots and pads the output with zeros. The reference samples that way; valid slots are the same in both.

Parameter names: layer_{i}/{self_attn/{q,k,v,out}, linear1, linear2, norm1, norm2}, fc.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ehrxdiff_jax.nn.attention import MultiHeadAttention
from ehrxdiff_jax.nn.layers import Dense, LayerNorm, maybe_remat
from ehrxdiff_jax.nn.vit import as_dtype

LN_EPS = 1e-5
POOL_MODES = ("mean", "reference_sum")
PADDED_SLOT_MODES = ("train", "zero")


class EncoderLayer(nn.Module):
  """torch.nn.TransformerEncoderLayer (norm_first=False, activation=relu, batch_first=True)."""
  d_model: int
  heads: int
  ff_dim: int
  dropout: float = 0.1
  attention_dropout: float = 0.1
  dtype: Any = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, key_mask, deterministic: bool = True):
    drop = lambda name: nn.Dropout(self.dropout, deterministic=deterministic, name=name)  # noqa: E731
    h = MultiHeadAttention(num_heads=self.heads, head_dim=self.d_model // self.heads, out_features=self.d_model,
                           dtype=self.dtype, implementation=self.attention, dropout=self.attention_dropout,
                           name="self_attn")(x, key_mask=key_mask, deterministic=deterministic)
    x = LayerNorm(LN_EPS, dtype=self.dtype, name="norm1")(x + drop("dropout1")(h))
    h = Dense(self.ff_dim, ("embed", "mlp"), dtype=self.dtype, name="linear1")(x)
    h = drop("dropout")(nn.relu(h))
    h = Dense(self.d_model, ("mlp", "embed"), dtype=self.dtype, name="linear2")(h)
    return LayerNorm(LN_EPS, dtype=self.dtype, name="norm2")(x + drop("dropout2")(h))


class TableTower(nn.Module):
  """Table tower. Fields as `cfg.model.table_tower` plus dtype, attention, remat."""
  event_dim: int = 1536
  heads: int = 24
  ff_dim: int = 6144
  layers: int = 2
  dropout: float = 0.1
  attention_dropout: float = 0.1
  out_dim: int = 768
  dtype: Any = jnp.float32
  attention: str = "auto"
  remat: str = "none"
  project: bool = True
  padded_slots_at_inference: str = "train"
  input_scale: float = 1.0  # events are multiplied by this before the first layer (1 = reference)

  @nn.compact
  def __call__(self, events, event_mask, deterministic: bool = True):
    """events [B, L, event_dim] (valid rows first), event_mask [B, L] bool (True = real event)
    -> tokens [B, L, out_dim] for every slot, padding included (as the reference); without `project`
    the encoder output [B, L, event_dim]."""
    if self.event_dim % self.heads:
      raise ValueError(f"event_dim {self.event_dim} is not divisible by heads {self.heads}")
    if events.shape[-1] != self.event_dim:
      raise ValueError(f"table tower expects event_dim {self.event_dim}, got events {events.shape}")
    if self.padded_slots_at_inference not in PADDED_SLOT_MODES:
      raise ValueError(f"padded_slots_at_inference={self.padded_slots_at_inference!r}; expected one of "
                       f"{PADDED_SLOT_MODES}")
    dtype = as_dtype(self.dtype)
    event_mask = jnp.asarray(event_mask, bool)
    x = events.astype(dtype)
    if self.input_scale != 1.0:
      x = x * jnp.asarray(self.input_scale, dtype)
    layer = maybe_remat(EncoderLayer, self.remat, static_argnums=(3,))  # (self, x, key_mask, deterministic)
    for i in range(self.layers):
      x = layer(self.event_dim, self.heads, self.ff_dim, self.dropout, self.attention_dropout, dtype=dtype,
                attention=self.attention, name=f"layer_{i}")(x, event_mask, deterministic)
    if deterministic and self.padded_slots_at_inference == "zero":
      x = jnp.where(event_mask[..., None], x, jnp.zeros((), x.dtype))
    if not self.project:
      return x
    return Dense(self.out_dim, ("embed", None), dtype=dtype, name="fc")(x)


def pool_tokens(tokens, mask, mode: str = "mean"):
  """Pools table-tower tokens [B, L, D] to [B, D] for CLIP pretraining.

  'mean': mean over the valid tokens (mask True); rows without a valid token give 0.
  'reference_sum': the reference's `x.sum(1) / (~attn_mask).sum(1)`: the sum over ALL slots, padding
    included (padded slots carry non-zero outputs), divided by the number of valid tokens.
  """
  if mode not in POOL_MODES:
    raise ValueError(f"unknown pooling mode {mode!r}; expected one of {POOL_MODES}")
  mask = jnp.asarray(mask, bool)
  count = jnp.sum(mask, axis=1, keepdims=True).astype(jnp.float32)
  tokens32 = tokens.astype(jnp.float32)
  if mode == "mean":
    total = jnp.sum(jnp.where(mask[..., None], tokens32, 0.0), axis=1)
    return (total / jnp.maximum(count, 1.0)).astype(tokens.dtype)
  return (jnp.sum(tokens32, axis=1) / count).astype(tokens.dtype)
