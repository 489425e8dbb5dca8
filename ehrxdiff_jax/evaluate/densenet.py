"""DenseNet-121 as in torchxrayvision (`xrv.models.DenseNet`), NHWC Flax, inference only.

The paper uses it twice: its 1024-d pooled features for the FID, and its 18 outputs (CheXpert-style
pathologies) for Table 3. Architecture (torchvision DenseNet layout, grey input):
  conv0 7x7/2 (no bias) -> norm0 -> relu -> maxpool 3x3/2 pad 1
  4 dense blocks of (6, 12, 24, 16) layers [norm1-relu-conv1 1x1 (4*32) -norm2-relu-conv2 3x3 (32), concat],
  transitions between them [norm-relu-conv 1x1 (half the channels)-avgpool 2x2/2]
  norm5 -> relu -> global average pool (1024) -> classifier Linear 1024 -> 18.
BatchNorm runs in inference mode from `batch_stats` (running mean / var, eps 1e-5).

Input: [B, H, W, 1] grey in torchxrayvision's scale [-1024, 1024] at 224x224 (`xrv_preprocess` turns our
[-1, 1] images into that). Output of `__call__`: the 18 classifier logits; with `op_threshs` set, sigmoid
then xrv's operating-point normalisation (a threshold maps to 0.5; NaN thresholds give 0.5); else with
`apply_sigmoid`, the sigmoid. (As in xrv, op_threshs takes precedence over apply_sigmoid.)
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ehrxdiff_jax.nn.layers import Conv, Dense, maybe_remat, partitioned

# torchxrayvision's default pathology order (xrv.datasets.default_pathologies / DenseNet.targets).
XRV_PATHOLOGIES = (
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis",
    "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia",
    "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
)
# The paper's Table 3 (CheXpert 4) columns and the xrv output each is read from.
CHEXPERT4 = {"Cardiomegaly": "Cardiomegaly", "Consolidation": "Consolidation", "Edema": "Edema",
             "Pleural Effusion": "Effusion"}


def BatchNorm(*, dtype: Any = jnp.float32, name: str | None = None) -> nn.BatchNorm:
  """Inference BatchNorm (torch BatchNorm2d eps 1e-5) whose scale / bias carry the 'norm' axis."""
  return nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      param_dtype=jnp.float32,
                      scale_init=partitioned(nn.initializers.ones_init(), ("norm",)),
                      bias_init=partitioned(nn.initializers.zeros_init(), ("norm",)), name=name)


class _DenseLayer(nn.Module):
  growth_rate: int
  bn_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.relu(BatchNorm(dtype=self.dtype, name="norm1")(x))
    h = Conv(self.bn_size * self.growth_rate, 1, padding=0, use_bias=False, dtype=self.dtype, name="conv1")(h)
    h = nn.relu(BatchNorm(dtype=self.dtype, name="norm2")(h))
    h = Conv(self.growth_rate, 3, padding=1, use_bias=False, dtype=self.dtype, name="conv2")(h)
    return jnp.concatenate([x, h.astype(x.dtype)], axis=-1)


class _DenseBlock(nn.Module):
  num_layers: int
  growth_rate: int
  bn_size: int
  dtype: Any = jnp.float32
  remat: str = "none"

  @nn.compact
  def __call__(self, x):
    layer_cls = maybe_remat(_DenseLayer, self.remat)
    for j in range(self.num_layers):
      x = layer_cls(self.growth_rate, self.bn_size, dtype=self.dtype, name=f"denselayer{j + 1}")(x)
    return x


class _Transition(nn.Module):
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.relu(BatchNorm(dtype=self.dtype, name="norm")(x))
    h = Conv(self.features, 1, padding=0, use_bias=False, dtype=self.dtype, name="conv")(h)
    return nn.avg_pool(h, (2, 2), strides=(2, 2))


class XRVDenseNet(nn.Module):
  """torchxrayvision DenseNet (default: DenseNet-121, 18 outputs, 1 input channel).

  Submodule names follow the torch state dict (conv0, norm0, denseblockI/denselayerJ/{norm1, conv1,
  norm2, conv2}, transitionI/{norm, conv}, norm5, classifier) so that `interop.densenet` maps 1:1.
  `model.apply(variables, x)` gives the outputs, `model.apply(variables, x, method='features')` the
  1024-d features, `return_features=True` both.
  """
  growth_rate: int = 32
  block_config: Sequence[int] = (6, 12, 24, 16)
  num_init_features: int = 64
  bn_size: int = 4
  num_classes: int = 18
  op_threshs: Sequence[float] | None = None
  apply_sigmoid: bool = False
  dtype: Any = jnp.float32
  remat: str = "none"

  def features(self, x):
    """Pooled features [B, 1024]: relu(norm5(features(x))) averaged over space (xrv `features2`)."""
    return self(x, features_only=True)

  @nn.compact
  def __call__(self, x, *, return_features: bool = False, features_only: bool = False):
    x = jnp.asarray(x, self.dtype)
    if x.ndim != 4:
      raise ValueError(f"XRVDenseNet expects [B, H, W, C] NHWC images, got shape {x.shape}")
    h = Conv(self.num_init_features, 7, strides=2, padding=3, use_bias=False, dtype=self.dtype, name="conv0")(x)
    h = nn.relu(BatchNorm(dtype=self.dtype, name="norm0")(h))
    h = nn.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    channels = self.num_init_features
    for i, n_layers in enumerate(self.block_config):
      h = _DenseBlock(n_layers, self.growth_rate, self.bn_size, dtype=self.dtype, remat=self.remat,
                      name=f"denseblock{i + 1}")(h)
      channels += n_layers * self.growth_rate
      if i != len(self.block_config) - 1:
        channels //= 2
        h = _Transition(channels, dtype=self.dtype, name=f"transition{i + 1}")(h)
    h = nn.relu(BatchNorm(dtype=self.dtype, name="norm5")(h))
    feats = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
    if features_only:
      return feats
    out = Dense(self.num_classes, ("embed", None), dtype=jnp.float32, name="classifier")(feats)
    if self.op_threshs is not None:
      out = op_norm(jax.nn.sigmoid(out), jnp.asarray(self.op_threshs, jnp.float32))
    elif self.apply_sigmoid:
      out = jax.nn.sigmoid(out)
    return (out, feats) if return_features else out


def op_norm(probs, op_threshs):
  """xrv's operating-point normalisation of sigmoid outputs: p < t -> p / (2t); else
  1 - (1 - p) / (2 (1 - t)); 0.5 where the threshold is NaN."""
  t = jnp.broadcast_to(op_threshs, probs.shape)
  known = ~jnp.isnan(t)
  safe_t = jnp.where(known, t, 0.5)
  low = probs / (safe_t * 2)
  high = 1.0 - (1.0 - probs) / ((1.0 - safe_t) * 2)
  return jnp.where(known, jnp.where(probs < safe_t, low, high), 0.5)


def chexpert4_indices(targets: Sequence[str] = XRV_PATHOLOGIES) -> list[int]:
  """Columns of the xrv outputs that give the paper's CheXpert-4 labels, in CHEXPERT4 order."""
  return [list(targets).index(v) for v in CHEXPERT4.values()]


def init_variables(model: XRVDenseNet, image_size: int = 224, in_channels: int = 1, seed: int = 0):
  """Randomly initialised {'params', 'batch_stats'} (jitted initialiser; for tests and shape checks)."""
  x = jnp.zeros((1, image_size, image_size, in_channels), jnp.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(seed), x)
  return nn.meta.unbox(variables)


# --------------------------------------------------------------------------- preprocessing
def xrv_preprocess(images, size: int = 224) -> np.ndarray:
  """Our images [B, H, W, C] (or [B, H, W]) in [-1, 1] -> [B, size, size, 1] float32 in [-1024, 1024].

  Follows the reference pipeline on 8-bit PNGs: xrv.datasets.normalize(img, 255) maps [0, 255] to
  [-1024, 1024] (our [-1, 1] times 1024), channels are averaged to grey, XRayCenterCrop crops the long
  side, and XRayResizer (skimage.transform.resize: bilinear, 'constant' borders, gaussian anti-aliasing
  with sigma (scale - 1) / 2 when shrinking) brings it to `size` x `size`. Host-side numpy/scipy.
  """
  from scipy import ndimage
  x = np.asarray(images, np.float32)
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise ValueError(f"expected images [B, H, W(, C)], got {x.shape}")
  x = x.mean(axis=-1) * 1024.0
  b, h, w = x.shape
  side = min(h, w)
  top, left = h // 2 - side // 2, w // 2 - side // 2
  x = x[:, top:top + side, left:left + side]
  if side == size:
    return x[..., None].astype(np.float32)
  scale = side / size
  out = np.empty((b, size, size), np.float32)
  for i in range(b):
    img = x[i].astype(np.float64)
    if scale > 1:
      img = ndimage.gaussian_filter(img, max(0.0, (scale - 1) / 2), cval=0.0,
                                    mode="grid-constant")
    img = ndimage.zoom(img, (size / side, size / side), order=1, mode="grid-constant", cval=0.0,
                       grid_mode=True)
    lo, hi = float(x[i].min()), float(x[i].max())
    zero = (img == 0.0) if not lo <= 0.0 <= hi else None  # skimage keeps cval pixels out of range
    img = np.clip(img, lo, hi)
    if zero is not None:
      img[zero] = 0.0
    out[i] = img
  return out[..., None]
