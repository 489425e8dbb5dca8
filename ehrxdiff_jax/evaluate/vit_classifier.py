"""The paper's Chest ImaGenome finding classifier: a DINO-style ViT-S/16 with one MLP head per finding.

Reference (EHRXDiff evaluation/diagnosis_classification/chestimagenome_cls): timm/DINO VisionTransformer
vit_small (patch 16, width 384, 12 pre-LN blocks, 6 heads, MLP x4 with exact GELU, LayerNorm eps 1e-6,
qkv bias, learned CLS token and positional embedding, 224 px RGB input normalised with the ImageNet
mean / std). The embedding is the concatenated CLS token of the last `n_last_blocks` = 4 blocks, each
passed through the final LayerNorm (DINO `get_intermediate_layers`), 4 x 384 = 1536-d. Each finding has
its own head Linear(1536, 768)-ReLU-Linear(768, 768)-ReLU-Linear(768, 2) trained with 2-class cross
entropy; the score is softmax(.)[1].

Here `__call__` returns one logit per finding, logit_1 - logit_0, so sigmoid(logit) == softmax[1] and
`multilabel_bce` on it equals the reference's 2-class cross entropy; `return_two_class=True` gives the
raw [B, F, 2] head outputs (the layout of the reference heads, for weight import).
Training it is the job of the training machinery; this module is the network and its loss.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ehrxdiff_jax.nn.attention import MultiHeadAttention
from ehrxdiff_jax.nn.layers import Conv, Dense, LayerNorm, maybe_remat, partitioned

IMAGENOME_FINDINGS = (
    "consolidation", "enlarged cardiac silhouette", "enlarged hilum", "lung opacity", "mediastinal widening",
    "pleural effusion", "pneumonia", "pneumothorax", "pulmonary edema/hazy opacity", "vascular congestion",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenome_preprocess(images, size: int = 224):
  """Our images [B, H, W, 3] in [-1, 1] -> [B, size, size, 3] as the reference feeds its ViT: resized
  (bilinear, antialiased), scaled to [0, 1], normalised with the ImageNet mean / std. jit-friendly."""
  x = (jnp.asarray(images, jnp.float32) + 1.0) / 2.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), method="linear", antialias=True)
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


class ViTBlock(nn.Module):
  width: int
  heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x):
    h = LayerNorm(1e-6, dtype=self.dtype, name="norm1")(x)
    x = x + MultiHeadAttention(self.heads, self.width // self.heads, self.width, dtype=self.dtype,
                               implementation=self.attention, name="attn")(h)
    h = LayerNorm(1e-6, dtype=self.dtype, name="norm2")(x)
    h = Dense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype, name="fc1")(h)
    h = nn.gelu(h, approximate=False)
    return x + Dense(self.width, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


class FindingHead(nn.Module):
  """Linear(d, d/2)-ReLU-Linear(d/2, d/2)-ReLU-Linear(d/2, 2) (reference FeatureClassifier)."""
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(Dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x))
    x = nn.relu(Dense(self.hidden, ("mlp", "mlp"), dtype=self.dtype, name="fc2")(x))
    return Dense(2, ("mlp", None), dtype=jnp.float32, name="fc3")(x)


class ViTFindingClassifier(nn.Module):
  """ViT backbone + one 2-class MLP head per finding. Input [B, image_size, image_size, in_channels]
  already normalised (see `imagenome_preprocess`); output [B, num_findings] logits."""
  image_size: int = 224
  patch_size: int = 16
  in_channels: int = 3
  width: int = 384
  layers: int = 12
  heads: int = 6
  mlp_ratio: float = 4.0
  num_findings: int = 10
  n_last_blocks: int = 4
  avgpool_patchtokens: bool = False
  dtype: Any = jnp.float32
  attention: str = "auto"
  remat: str = "none"

  def embed(self, x):
    """The reference embedding [B, n_last_blocks * width] (x2 with avgpool_patchtokens)."""
    return self(x, embedding_only=True)

  @nn.compact
  def __call__(self, x, *, return_two_class: bool = False, embedding_only: bool = False):
    if not 1 <= self.n_last_blocks <= self.layers:
      raise ValueError(f"n_last_blocks must be in [1, {self.layers}], got {self.n_last_blocks}")
    if self.avgpool_patchtokens and self.n_last_blocks != 1:
      raise ValueError("avgpool_patchtokens needs n_last_blocks == 1 (as in the reference)")
    b, hgt, wid, _ = x.shape
    if (hgt, wid) != (self.image_size, self.image_size):
      raise ValueError(f"expected {self.image_size}x{self.image_size} input, got {hgt}x{wid}")
    x = Conv(self.width, self.patch_size, strides=self.patch_size, padding="VALID", dtype=self.dtype,
             name="patch_embed")(jnp.asarray(x, self.dtype))
    x = x.reshape(b, -1, self.width)
    init = nn.initializers.truncated_normal(0.02)
    cls = self.param("cls_token", partitioned(init, (None, None, "embed")), (1, 1, self.width), jnp.float32)
    pos = self.param("pos_embed", partitioned(init, (None, "tokens", "embed")),
                     (1, x.shape[1] + 1, self.width), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)).astype(x.dtype), x], axis=1)
    x = x + pos.astype(x.dtype)
    block_cls = maybe_remat(ViTBlock, self.remat)
    norm = LayerNorm(1e-6, dtype=self.dtype, name="norm")
    outputs = []
    for i in range(self.layers):
      x = block_cls(self.width, self.heads, int(self.width * self.mlp_ratio), dtype=self.dtype,
                    attention=self.attention, name=f"blocks_{i}")(x)
      if self.layers - i <= self.n_last_blocks:
        outputs.append(norm(x))
    emb = jnp.concatenate([o[:, 0] for o in outputs], axis=-1).astype(jnp.float32)
    if self.avgpool_patchtokens:
      emb = jnp.stack([emb, jnp.mean(outputs[-1][:, 1:], axis=1).astype(jnp.float32)], axis=-1).reshape(b, -1)
    if embedding_only:
      return emb
    two = jnp.stack([FindingHead(emb.shape[-1] // 2, dtype=self.dtype, name=f"head_{k}")(emb)
                     for k in range(self.num_findings)], axis=1)
    if return_two_class:
      return two
    return two[..., 1] - two[..., 0]


def multilabel_bce(logits, labels, mask=None):
  """Mean binary cross entropy over the known (label not NaN, mask True) entries of [B, F] logits;
  0 when no entry is known. Numerically stable (softplus form)."""
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels, jnp.float32)
  valid = ~jnp.isnan(labels)
  if mask is not None:
    valid = valid & jnp.asarray(mask, bool)
  y = jnp.where(valid, labels, 0.0)
  loss = jnp.maximum(logits, 0.0) - logits * y + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  count = jnp.sum(valid)
  return jnp.sum(jnp.where(valid, loss, 0.0)) / jnp.maximum(count, 1)


def finding_probabilities(logits):
  """P(finding present) = sigmoid(logit) (== the reference's softmax(two-class)[1])."""
  return jax.nn.sigmoid(logits)


def convert_reference_classifier(model_state_dict, mlps_state_dict, finding_names, layers: int = 12) -> dict:
  """The reference checkpoint (`state_dict['model']`: DINO VisionTransformer; `state_dict['mlps']`:
  ModuleDict {finding: FeatureClassifier}) -> our parameter tree. `finding_names` fixes the head order
  (head_k = finding_names[k]); the fused qkv projection is split into q, k, v.
  Users read the checkpoint with interop.common.load_state_dict-style `torch.load(weights_only=True)`."""
  import numpy as np

  from ehrxdiff_jax.interop.common import StateDict

  sd = StateDict(model_state_dict)
  params = {"patch_embed": sd.conv("patch_embed.proj"), "cls_token": sd.take("cls_token"),
            "pos_embed": sd.take("pos_embed"), "norm": sd.norm("norm")}
  for i in range(layers):
    p = f"blocks.{i}."
    w, b = sd.take(p + "attn.qkv.weight"), sd.take(p + "attn.qkv.bias")
    c = w.shape[1]
    attn = {name: {"kernel": np.ascontiguousarray(w[j * c:(j + 1) * c].T), "bias": b[j * c:(j + 1) * c]}
            for j, name in enumerate(("q", "k", "v"))}
    attn["out"] = sd.linear(p + "attn.proj")
    params[f"blocks_{i}"] = {"norm1": sd.norm(p + "norm1"), "attn": attn, "norm2": sd.norm(p + "norm2"),
                             "fc1": sd.linear(p + "mlp.fc1"), "fc2": sd.linear(p + "mlp.fc2")}
  sd.skip("head.weight")
  sd.skip("head.bias")
  sd.finish()
  hd = StateDict(mlps_state_dict)
  for k, name in enumerate(finding_names):
    params[f"head_{k}"] = {f"fc{j + 1}": hd.linear(f"{name}.mlp.{j}.linear_block.0") for j in range(3)}
  hd.finish()
  return params
