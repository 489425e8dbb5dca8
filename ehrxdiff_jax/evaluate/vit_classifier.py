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
The backbone is nn/vit.VisionTransformer in its timm / DINO form (`dino_vit`); `ViTEmbeddingModel` holds
the embedding that the demographic classifier (evaluate/demographics.py) shares. Parameters:
{'vit': {patch_embed, class_embedding, positional_embedding, blocks_i/{ln_1, attn, ln_2, fc1, fc2}},
'norm', 'head_k/{fc1, fc2, fc3}'}.
Training it is the job of the training machinery; this module is the network and its loss.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ehrxdiff_jax.evaluate.demographics import RACE_GROUPS
from ehrxdiff_jax.nn.layers import Dense, LayerNorm
from ehrxdiff_jax.nn.vit import VisionTransformer

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


def dino_vit(image_size: int, patch_size: int, width: int, layers: int, heads: int, mlp_ratio: float, *,
             dtype=jnp.float32, attention: str = "auto", remat: str = "none",
             name: str | None = None) -> VisionTransformer:
  """timm / DINO ViT as nn/vit.VisionTransformer: exact GELU, LayerNorm eps 1e-6, patch conv with bias, no
  ln_pre (the one ViT encoder of the project, see nn/vit.py)."""
  return VisionTransformer(image_size=image_size, patch_size=patch_size, width=width, layers=layers, heads=heads,
                           mlp_dim=int(width * mlp_ratio), dtype=dtype, attention=attention, remat=remat,
                           ln_eps=1e-6, activation="gelu", patch_bias=True, pre_norm=False, name=name)


class MLPHead(nn.Module):
  """Linear(d, hidden)-ReLU-Linear(hidden, hidden)-ReLU-Linear(hidden, out) (reference FeatureClassifier:
  hidden = d/2, out = 2)."""
  hidden: int
  out: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.relu(Dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x))
    x = nn.relu(Dense(self.hidden, ("mlp", "mlp"), dtype=self.dtype, name="fc2")(x))
    return Dense(self.out, ("mlp", None), dtype=jnp.float32, name="fc3")(x)


class ViTEmbeddingModel(nn.Module):
  """The DINO embedding shared by the classifiers: the ViT backbone (`vit`) and the final LayerNorm
  (`norm`) applied to the CLS token of each of the last `n_last_blocks` blocks, concatenated
  ([B, n_last_blocks * width]; x2 with avgpool_patchtokens). Subclasses add heads in `__call__`."""
  image_size: int = 224
  patch_size: int = 16
  in_channels: int = 3
  width: int = 384
  layers: int = 12
  heads: int = 6
  mlp_ratio: float = 4.0
  n_last_blocks: int = 4
  avgpool_patchtokens: bool = False
  dtype: Any = jnp.float32
  attention: str = "auto"
  remat: str = "none"

  def embed(self, x):
    """The reference embedding [B, n_last_blocks * width] (x2 with avgpool_patchtokens)."""
    return self(x, embedding_only=True)

  def embedding(self, x):
    """Builds the backbone inline (called from the subclass's compact `__call__`)."""
    if not 1 <= self.n_last_blocks <= self.layers:
      raise ValueError(f"n_last_blocks must be in [1, {self.layers}], got {self.n_last_blocks}")
    if self.avgpool_patchtokens and self.n_last_blocks != 1:
      raise ValueError("avgpool_patchtokens needs n_last_blocks == 1 (as in the reference)")
    b, hgt, wid, _ = x.shape
    if (hgt, wid) != (self.image_size, self.image_size):
      raise ValueError(f"expected {self.image_size}x{self.image_size} input, got {hgt}x{wid}")
    vit = dino_vit(self.image_size, self.patch_size, self.width, self.layers, self.heads, self.mlp_ratio,
                   dtype=self.dtype, attention=self.attention, remat=self.remat, name="vit")
    norm = LayerNorm(1e-6, dtype=self.dtype, name="norm")
    outputs = [norm(o) for o in vit.hidden_states(jnp.asarray(x, self.dtype), self.n_last_blocks)]
    emb = jnp.concatenate([o[:, 0] for o in outputs], axis=-1).astype(jnp.float32)
    if self.avgpool_patchtokens:
      emb = jnp.stack([emb, jnp.mean(outputs[-1][:, 1:], axis=1).astype(jnp.float32)], axis=-1).reshape(b, -1)
    return emb


class ViTFindingClassifier(ViTEmbeddingModel):
  """ViT backbone + one 2-class MLP head per finding. Input [B, image_size, image_size, in_channels]
  already normalised (see `imagenome_preprocess`); output [B, num_findings] logits."""
  num_findings: int = 10

  @nn.compact
  def __call__(self, x, *, return_two_class: bool = False, embedding_only: bool = False):
    emb = self.embedding(x)
    if embedding_only:
      return emb
    two = jnp.stack([MLPHead(emb.shape[-1] // 2, dtype=self.dtype, name=f"head_{k}")(emb)
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


class ViTDemographicsClassifier(ViTEmbeddingModel):
  """The demographic classifier of Table 6 (evaluate/demographics.py): the same DINO ViT embedding with
  MLP heads {'age': [B] standardised age, 'sex': [B] logit of P(male), 'race': [B, num_races] logits}.
  Parameters: vit, norm, head_age, head_sex, head_race."""
  num_races: int = len(RACE_GROUPS)

  @nn.compact
  def __call__(self, x, *, embedding_only: bool = False):
    emb = self.embedding(x)
    if embedding_only:
      return emb
    hidden = emb.shape[-1] // 2
    return {"age": MLPHead(hidden, 1, dtype=self.dtype, name="head_age")(emb)[:, 0],
            "sex": MLPHead(hidden, 1, dtype=self.dtype, name="head_sex")(emb)[:, 0],
            "race": MLPHead(hidden, self.num_races, dtype=self.dtype, name="head_race")(emb)}


def masked_mean(values, valid):
  """Mean of `values` where `valid`; 0 where nothing is valid."""
  return jnp.sum(jnp.where(valid, values, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def demographics_loss(outputs: Mapping[str, jax.Array], age_z, sex, race) -> tuple[jax.Array, dict]:
  """MSE on the standardised age + BCE on sex + softmax cross entropy on race, each the mean over the
  known labels (NaN age / sex, race -1 are ignored; a term without known labels is 0).
  Returns (total, {'age_mse', 'sex_bce', 'race_ce'})."""
  age_z, sex = jnp.asarray(age_z, jnp.float32), jnp.asarray(sex, jnp.float32)
  race = jnp.asarray(race, jnp.int32)
  age_ok, race_ok = ~jnp.isnan(age_z), race >= 0
  age_mse = masked_mean(jnp.square(outputs["age"] - jnp.where(age_ok, age_z, 0.0)), age_ok)
  sex_bce = multilabel_bce(outputs["sex"][:, None], sex[:, None])
  logp = jax.nn.log_softmax(outputs["race"].astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, jnp.maximum(race, 0)[:, None], axis=-1)[:, 0]
  race_ce = masked_mean(-picked, race_ok)
  return age_mse + sex_bce + race_ce, {"age_mse": age_mse, "sex_bce": sex_bce, "race_ce": race_ce}


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
  vit = {"patch_embed": sd.conv("patch_embed.proj"), "class_embedding": sd.take("cls_token").reshape(-1),
         "positional_embedding": sd.take("pos_embed")[0]}
  for i in range(layers):
    p = f"blocks.{i}."
    w, b = sd.take(p + "attn.qkv.weight"), sd.take(p + "attn.qkv.bias")
    c = w.shape[1]
    attn = {name: {"kernel": np.ascontiguousarray(w[j * c:(j + 1) * c].T), "bias": b[j * c:(j + 1) * c]}
            for j, name in enumerate(("q", "k", "v"))}
    attn["out"] = sd.linear(p + "attn.proj")
    vit[f"blocks_{i}"] = {"ln_1": sd.norm(p + "norm1"), "attn": attn, "ln_2": sd.norm(p + "norm2"),
                          "fc1": sd.linear(p + "mlp.fc1"), "fc2": sd.linear(p + "mlp.fc2")}
  params = {"vit": vit, "norm": sd.norm("norm")}
  sd.skip("head.weight")
  sd.skip("head.bias")
  sd.finish()
  hd = StateDict(mlps_state_dict)
  for k, name in enumerate(finding_names):
    params[f"head_{k}"] = {f"fc{j + 1}": hd.linear(f"{name}.mlp.{j}.linear_block.0") for j in range(3)}
  hd.finish()
  return params
