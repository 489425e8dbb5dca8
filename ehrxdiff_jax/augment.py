"""On-device image augmentation, jittable, with one random key per sample.

`random_resized_crop` is torchvision's `RandomResizedCrop(size, scale, ratio)` as the CLIP pretraining
of the reference uses it (size 256, scale (0.75, 1), ratio (1, 1)): per sample an area fraction
u ~ U(scale) and a log-uniform aspect ratio r give a crop of w = round(sqrt(u*H*W*r)) by
h = round(sqrt(u*H*W/r)) pixels (clipped to the image) at a uniformly drawn integer offset; the crop is
resized to size x size with bilinear interpolation (half-pixel centres, as torch's align_corners=False).

Differences to torchvision, all small: torchvision retries up to 10 draws when a crop does not fit and
falls back to a centre crop; here the crop is clipped instead (with ratio (1, 1) on square images every
draw fits, so nothing differs there). torchvision crops first and then resizes, so border samples clamp
to the crop; `jax.image.scale_and_translate` may blend the outermost output pixels with the one pixel
just outside the crop (inside the image). It runs on the device inside the jitted step, on the global
batch, so it costs no host time and no data-loader change.

The host-side pipeline (`pipeline.random_affine`) is a different transform (the w_null target affine,
numpy/PIL in the loader); nothing is shared or duplicated.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp


def crop_boxes(rng: jax.Array, batch: int, height: int, width: int, scale: Sequence[float] = (0.75, 1.0),
               ratio: Sequence[float] = (1.0, 1.0)) -> jax.Array:
  """Per-sample integer crop boxes [B, 4] = (top, left, h, w), drawn as torchvision's RandomResizedCrop."""
  keys = jax.random.split(rng, batch)

  def one(key):
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    area = height * width * jax.random.uniform(k_area, (), jnp.float32, scale[0], scale[1])
    log_r = jax.random.uniform(k_ratio, (), jnp.float32, math.log(ratio[0]), math.log(ratio[1]))
    r = jnp.exp(log_r)
    w = jnp.clip(jnp.round(jnp.sqrt(area * r)), 1, width).astype(jnp.int32)
    h = jnp.clip(jnp.round(jnp.sqrt(area / r)), 1, height).astype(jnp.int32)
    top = jax.random.randint(k_top, (), 0, height - h + 1)
    left = jax.random.randint(k_left, (), 0, width - w + 1)
    return jnp.stack([top, left, h, w])

  return jax.vmap(one)(keys)


def resize_crops(images: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
  """images [B, H, W, C], boxes [B, 4] (top, left, h, w) -> [B, size, size, C], bilinear."""

  def one(img, box):
    top, left, h, w = [box[i].astype(jnp.float32) for i in range(4)]
    sy, sx = size / h, size / w
    out = jax.image.scale_and_translate(
        img.astype(jnp.float32), (size, size, img.shape[-1]), (0, 1), jnp.stack([sy, sx]),
        jnp.stack([-top * sy, -left * sx]), method="linear", antialias=True)
    return out.astype(img.dtype)

  return jax.vmap(one)(images, boxes)


def random_resized_crop(images: jax.Array, rng: jax.Array, size: int | None = None,
                        scale: Sequence[float] = (0.75, 1.0), ratio: Sequence[float] = (1.0, 1.0)) -> jax.Array:
  """torchvision RandomResizedCrop on a batch [B, H, W, C] (NHWC, any range), one crop per sample.

  `size` defaults to the input size (the reference crops 256 px images back to 256 px)."""
  b, h, w, _ = images.shape
  size = h if size is None else int(size)
  boxes = crop_boxes(rng, b, h, w, scale, ratio)
  return resize_crops(images, boxes, size)
