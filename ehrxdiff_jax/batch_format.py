"""Host batch -> device batch: the cheap per-element work done on the device, inside the jitted functions.

The loader ships the host batch (CONTRIBUTING.md): grey uint8 images [B, H, W] and float16 events
[B, E, D] (what the records store; `parallel.to_global` sends only the rows before `event_rows`). The
objectives and networks receive the device batch: float32 images in [-1, 1] replicated to 3 channels
[B, H, W, 3] and float32 events. `to_device` is that conversion; the trainer's jitted step, its eval step and
prediction functions and the sampler's jitted `generate` call it first thing:

    def step(state, batch):
      batch = batch_format.to_device(batch)
      ...

It converts only entries in the host format (uint8 images, float16 events) and passes the others through,
so a batch already in the device format (models.dummy_batch, cached-latent tests) is left as it is.
Host bytes per paper-scale sample: 2 x 64 kB images + 713 x 1536 x 2 B events = 2.32 MB instead of
2 x 786 kB + 1024 x 1536 x 4 B = 7.9 MB.

Images go through a 256-entry table computed in numpy (`IMAGE_TABLE`), so the device values equal the
former host conversion `u8.astype(float32) * float32(2/255) - 1` bit for bit on every backend (an XLA
multiply-add may be fused into an FMA and round differently).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

IMAGE_KEYS = ("prev_image", "target_image")
EVENT_KEYS = ("events",)
IMAGE_CHANNELS = 3
IMAGE_TABLE = np.arange(256, dtype=np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def images_to_float(u8):
  """uint8 grey [..., H, W] -> float32 [..., H, W] in [-1, 1] (traceable; the table lookup above)."""
  return jnp.asarray(IMAGE_TABLE)[jnp.asarray(u8).astype(jnp.int32)]


def device_images(images):
  """Host images (uint8 grey [..., H, W]) -> device images (float32 [..., H, W, 3] in [-1, 1]); images
  already in the device format are returned as they are."""
  if images.dtype != jnp.uint8:
    return images
  x = images_to_float(images)
  return jnp.broadcast_to(x[..., None], x.shape + (IMAGE_CHANNELS,))


def to_device(batch: dict) -> dict:
  """The device batch of a host batch (see the module docstring); other entries are passed through."""
  out = dict(batch)
  for k in IMAGE_KEYS:
    if k in out:
      out[k] = device_images(out[k])
  for k in EVENT_KEYS:
    if k in out and out[k].dtype == jnp.float16:
      out[k] = out[k].astype(jnp.float32)
  return out


def host_template(batch: dict) -> dict:
  """A device-format batch template (e.g. an objective's `dummy_batch`) -> zeros in the host format: the
  arrays the jitted functions are compiled for."""
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if k in IMAGE_KEYS and v.dtype == np.float32 and v.ndim == 4 and v.shape[-1] == IMAGE_CHANNELS:
      out[k] = np.zeros(v.shape[:-1], np.uint8)
    elif k in EVENT_KEYS and v.dtype == np.float32:
      out[k] = np.zeros(v.shape, np.float16)
    else:
      out[k] = v
  return out
