"""The conditioner: CLIP table tower + CLIP image tower + VAE tokens -> fusion adapter -> context.

Restates the reference's `MultiModalTransformerAdaptor` (and its ablation siblings `TabAdaptor`,
`ImgAdaptor`, `ClipAdaptor`, `ClipTabAdaptor`, `ClipImgAdaptor`, `VAEAdaptor`, paper Table 4):

  table tokens  [B, max_events, D]  the table tower on the events (every slot, padding included; at
                                    inference padded slots follow `padded_slots_at_inference`, nn/table.py)
  image tokens  [B, 1+N, D]         the CLIP image tower on I_prev: all tokens, no ln_post, no projection
  VAE tokens    [B, c, D]           the UNSCALED VAE mean of I_prev [B, h, w, c] -> c tokens of h*w values
                                    (token i = channel i flattened row-major, the reference's NCHW
                                    `b c h w -> b c (h w)`) -> Dense h*w -> D ('vae_proj')
  concat [table, image, vae] on the token axis -> 'adapter': Dense over the TOKEN axis n_tokens ->
  context_tokens -> (only when D != context_dim) 'projector': Dense D -> context_dim.

D, the token width, is the table tower's out_dim / the image tower's width (they must agree; 768 in the
paper, equal to context_dim, so there is no projector). With 'vae' alone D = context_dim, as the
reference's VAEAdaptor projects straight to context_dim.

As in the reference, the adapter exists only when two or more streams are fused; a single stream
('table', 'image' or 'vae' alone) is passed through unfused, so the context then has that stream's token
count (max_events, 1+N or c) instead of context_tokens. An empty `cross_attention` gives None (no
cross-attention context; the UNet then has no cross-attention input).

`pooled_events` (not in the reference; the demo's config): the masked mean of the table tokens over
the real events is appended as one extra last token (through 'pooled_proj' when D != context_dim), for
the UNet's time embedding (models.split_context, unet.adm_in_channels). Measured on the demo database:
without this route the trained context did not depend on the events (the adapter's token mixing
averaged 64 event tokens with the image and VAE tokens away); with it the events steer the sample.

Parameter tree: {'table_tower', 'image_tower', 'vae_proj', 'adapter'} (+ 'projector' when D !=
context_dim); only the parts the selected streams use exist. Paper config: 149,575,168 parameters.
The VAE itself is not part of this module: the caller encodes I_prev (frozen VAE) and passes its mean.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ehrxdiff_jax.nn.layers import Dense
from ehrxdiff_jax.nn.table import TableTower, pool_tokens
from ehrxdiff_jax.nn.vit import VisionTransformer, as_dtype

STREAMS = ("table", "image", "vae")


class Conditioner(nn.Module):
  image_tower: VisionTransformer
  table_tower: TableTower
  cross_attention: tuple = STREAMS
  max_events: int = 1024
  context_tokens: int = 1024
  context_dim: int = 768
  latent_channels: int = 3
  latent_size: int = 64
  pooled_events: bool = False
  dtype: Any = jnp.float32

  def streams(self) -> tuple:
    """The selected streams in the fixed concatenation order (table, image, vae)."""
    unknown = set(self.cross_attention) - set(STREAMS)
    if unknown:
      raise ValueError(f"unknown cross_attention streams {sorted(unknown)}; expected a subset of {STREAMS}")
    return tuple(s for s in STREAMS if s in self.cross_attention)

  def token_width(self) -> int:
    """D: the width of the fused tokens before the optional projector."""
    s = self.streams()
    if "table" in s and "image" in s and self.table_tower.out_dim != self.image_tower.width:
      raise ValueError(f"table_tower.out_dim {self.table_tower.out_dim} != image_tower.width "
                       f"{self.image_tower.width}: the fused tokens need one width")
    if "table" in s:
      return self.table_tower.out_dim
    if "image" in s:
      return self.image_tower.width
    return self.context_dim

  def num_tokens(self) -> int:
    """Tokens entering the adapter (1092 at the paper config)."""
    s = self.streams()
    return (("table" in s) * self.max_events + ("image" in s) * self.image_tower.num_tokens
            + ("vae" in s) * self.latent_channels)

  def uses_adapter(self) -> bool:
    return len(self.streams()) > 1

  def context_shape(self) -> tuple | None:
    """(tokens, dim) of the context, None without cross-attention."""
    if not self.streams():
      return None
    tokens = self.context_tokens if self.uses_adapter() else self.num_tokens()
    return (tokens + int(self.pooled_events), self.context_dim)

  @nn.compact
  def __call__(self, prev_image, prev_latent_mean, events, event_mask, deterministic: bool = True):
    """prev_image [B, H, W, 3] in [-1, 1]; prev_latent_mean [B, h, w, c] (unscaled VAE mean of I_prev);
    events [B, max_events, event_dim]; event_mask [B, max_events] bool (True = real event).
    Inputs of unused streams may be None. Returns the context [B, T, context_dim] or None."""
    streams = self.streams()
    if not streams:
      return None
    dtype = as_dtype(self.dtype)
    width = self.token_width()
    parts = []
    if self.pooled_events and "table" not in streams:
      raise ValueError("model.conditioner.pooled_events needs the 'table' cross-attention stream")
    if "table" in streams:
      if events.shape[1] != self.max_events:
        raise ValueError(f"conditioner expects {self.max_events} event slots, got events {events.shape}")
      parts.append(self.table_tower(events, event_mask, deterministic=deterministic))
      pooled = pool_tokens(parts[-1], event_mask, "mean")              # [B, D]; 0 without events
    if "image" in streams:
      parts.append(self.image_tower(prev_image))
    if "vae" in streams:
      b, h, w, c = prev_latent_mean.shape
      if (h, w, c) != (self.latent_size, self.latent_size, self.latent_channels):
        raise ValueError(f"conditioner expects VAE means of {self.latent_size}x{self.latent_size}x"
                         f"{self.latent_channels}, got {prev_latent_mean.shape}")
      z = jnp.transpose(prev_latent_mean.astype(dtype), (0, 3, 1, 2)).reshape(b, c, h * w)  # channel-major
      parts.append(Dense(width, (None, "embed"), dtype=dtype, name="vae_proj")(z))
    x = jnp.concatenate([p.astype(dtype) for p in parts], axis=1)     # [B, n_tokens, D]
    if self.uses_adapter():
      x = jnp.swapaxes(x, 1, 2)                                        # [B, D, n_tokens]
      x = Dense(self.context_tokens, ("tokens", None), dtype=dtype, name="adapter")(x)
      x = jnp.swapaxes(x, 1, 2)                                        # [B, context_tokens, D]
    if width != self.context_dim:
      x = Dense(self.context_dim, ("embed", None), dtype=dtype, name="projector")(x)
    if self.pooled_events:
      if width != self.context_dim:
        pooled = Dense(self.context_dim, ("embed", None), dtype=dtype, name="pooled_proj")(pooled)
      x = jnp.concatenate([x, pooled[:, None, :].astype(x.dtype)], axis=1)
    return x
