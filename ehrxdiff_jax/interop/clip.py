"""PyTorch state dicts of the CLIP towers and the reference conditioner <-> our parameter trees.

  convert_hf_clip_vision(sd)          transformers CLIPVisionModel / CLIPModel -> image tower
  convert_openai_clip_visual(sd)      OpenAI CLIP `visual.*` (the reference's VisualTransformer)
                                      -> image tower; export_openai_visual the inverse
  convert_torch_table_tower(sd)       the reference's TabTransformerEmbedder -> table tower;
                                      export_table_tower the inverse
  convert_reference_conditioner(sd)   EHRXDiff LDM checkpoint `cond_stage_model.*` -> conditioner;
                                      export_reference_conditioner the inverse
  convert_reference_clip(sd)          EHRXDiff CLIP pretraining (model.visual.*, .transformer.*)
  adapt_position_embedding(pos, g)    positional embedding 7x7+1 (224 px, patch 32) -> 8x8+1 (256)

Every converter consumes the keys under its prefix through `StateDict` (a left-over key is an
error), then checks the result against the shapes of our modules (`check_against`): a tower built
from the dimensions read off the state dict, or the `expected` tree you pass (boxed or not).
Errors are `ConversionError`s that name the torch key. Import and export walk the same name tables.

Our names (see nn/vit.py, nn/table.py, nn/conditioner.py):
  image tower: patch_embed/kernel, class_embedding, positional_embedding, ln_pre, blocks_{i}/{ln_1,
    attn/{q,k,v,out}, ln_2, fc1, fc2}, ln_post (only with include_ln_post)
  table tower: layer_{i}/{self_attn/{q,k,v,out}, linear1, linear2, norm1, norm2}, fc
  conditioner: image_tower, table_tower, vae_proj, adapter, projector (when present)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ehrxdiff_jax.interop.common import (ConversionError, IfPresent, StateDict, check_against,
                                         export_block, export_blocks, put_conv, put_linear,
                                         put_norm, split_in_proj)

__all__ = [
    "adapt_position_embedding", "convert_hf_clip_vision", "convert_openai_clip_visual",
    "convert_torch_table_tower", "convert_reference_conditioner", "convert_reference_clip",
    "export_openai_visual", "export_reference_conditioner", "export_table_tower",
    "infer_table_fields", "infer_vit_fields",
]


# Name tables (StateDict.block) of one block: a pre-LN ViT block from transformers' CLIPEncoderLayer
# and OpenAI's ResidualAttentionBlock; a torch.nn.TransformerEncoderLayer of the table tower.
_HF_BLOCK = {
    "ln_1": (StateDict.norm, "layer_norm1"),
    "attn": {n: (StateDict.linear, f"self_attn.{n}_proj") for n in ("q", "k", "v", "out")},
    "ln_2": (StateDict.norm, "layer_norm2"),
    "fc1": (StateDict.linear, "mlp.fc1"),
    "fc2": (StateDict.linear, "mlp.fc2"),
}
OPENAI_BLOCK = {
    "ln_1": (StateDict.norm, "ln_1"),
    "attn": (split_in_proj, "attn"),
    "ln_2": (StateDict.norm, "ln_2"),
    "fc1": (StateDict.linear, "mlp.c_fc"),
    "fc2": (StateDict.linear, "mlp.c_proj"),
}
TABLE_LAYER = {
    "self_attn": (split_in_proj, "self_attn"),
    "linear1": (StateDict.linear, "linear1"),
    "linear2": (StateDict.linear, "linear2"),
    "norm1": (StateDict.norm, "norm1"),
    "norm2": (StateDict.norm, "norm2"),
}



@dataclasses.dataclass(frozen=True)
class _ViTNaming:
  """Where a checkpoint keeps each part of our VisionTransformer (keys relative to the prefix)."""
  patch_embed: str
  class_embedding: str
  positional_embedding: str
  ln_pre: str
  blocks: str                  # the ModuleList of blocks
  block: Mapping[str, Any]     # name table of one block (StateDict.block)
  ln_post: str


_HF_VIT = _ViTNaming("embeddings.patch_embedding", "embeddings.class_embedding",
                     "embeddings.position_embedding.weight", "pre_layrnorm", "encoder.layers",
                     _HF_BLOCK, "post_layernorm")
_OPENAI_VIT = _ViTNaming("conv1", "class_embedding", "positional_embedding", "ln_pre",
                         "transformer.resblocks", OPENAI_BLOCK, "ln_post")

# Head dim of the reference's towers (OpenAI's ViT: heads = width / 64; the table tower: 24 heads on
# 1536): the weights do not show the head count, so imports check the config against this.
REFERENCE_HEAD_DIM = 64


def infer_vit_fields(params: Mapping[str, Any]) -> dict:
  """`model.image_tower` fields (heads excepted: no shape shows them) of a converted image tower."""
  k = params["patch_embed"]["kernel"]
  tokens = int(params["positional_embedding"].shape[0])
  grid = int(round((tokens - 1) ** 0.5))
  if grid * grid + 1 != tokens:
    raise ConversionError(f"positional embedding has {tokens} rows, not 1 + a square number of "
                          "patches")
  layers = sum(1 for n in params if n.startswith("blocks_"))
  mlp_dim = int(params["blocks_0"]["fc1"]["kernel"].shape[1]) if layers else 4 * int(k.shape[3])
  return dict(image_size=grid * int(k.shape[0]), patch_size=int(k.shape[0]), width=int(k.shape[3]),
              layers=layers, mlp_dim=mlp_dim)


def infer_table_fields(params: Mapping[str, Any]) -> dict:
  """`model.table_tower` fields (heads and dropout excepted) of a converted table tower."""
  l1 = params["layer_0"]["linear1"]["kernel"]
  return dict(event_dim=int(l1.shape[0]), ff_dim=int(l1.shape[1]),
              layers=sum(1 for n in params if n.startswith("layer_")),
              out_dim=int(params["fc"]["kernel"].shape[1]))


def _vit_expected(params: Mapping[str, Any], include_ln_post: bool):
  """Parameter shapes of the VisionTransformer that `params` describes (heads change no shape)."""
  from ehrxdiff_jax.nn.vit import VisionTransformer
  vit = VisionTransformer(**infer_vit_fields(params), heads=1)
  images = jax.ShapeDtypeStruct((1, vit.image_size, vit.image_size, 3), jnp.float32)
  init = functools.partial(vit.init, method=VisionTransformer.pooled if include_ln_post else None)
  return nn.unbox(jax.eval_shape(init, jax.random.key(0), images)["params"])


def _table_expected(params: Mapping[str, Any]):
  """Parameter shapes of the TableTower that `params`' shapes describe."""
  from ehrxdiff_jax.nn.table import TableTower
  tower = TableTower(**infer_table_fields(params), heads=1)
  events = jax.ShapeDtypeStruct((1, 2, tower.event_dim), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, 2), jnp.bool_)
  return nn.unbox(jax.eval_shape(tower.init, jax.random.key(0), events, mask)["params"])


def _check(params: dict, expected, sd: StateDict) -> dict:
  return check_against(params, nn.unbox(expected), sd)


# ----------------------------------------------------------------------------- positional embedding

def adapt_position_embedding(pos, new_grid: int, method: str = "bicubic") -> np.ndarray:
  """Resizes a ViT positional embedding [1 + n*n, W] to [1 + new_grid^2, W].

  The CLS row is kept; the n x n grid part is resized with `jax.image.resize` (default 'bicubic', or
  'bilinear' / 'nearest'; jax's bicubic is Keys' a=-0.5 and differs slightly from torch's a=-0.75).
  Identity (a copy) when the grid already has the size. E.g. OpenAI ViT-B/32 at 224 px (7x7+1 = 50)
  -> 256 px (8x8+1 = 65). (The reference instead drops OpenAI's positional embedding and trains a
  fresh random one.)
  """
  pos = np.asarray(pos, np.float32)
  if pos.ndim != 2:
    raise ValueError(f"positional embedding must be [1 + n*n, W], got {pos.shape}")
  n = int(round((pos.shape[0] - 1) ** 0.5))
  if n * n + 1 != pos.shape[0]:
    raise ValueError(f"positional embedding has {pos.shape[0]} rows, not 1 + a square number")
  if new_grid == n:
    return pos.copy()
  grid = pos[1:].reshape(n, n, pos.shape[1])
  grid = jax.image.resize(jnp.asarray(grid), (new_grid, new_grid, pos.shape[1]), method=method)
  grid = np.asarray(grid).reshape(new_grid * new_grid, pos.shape[1])
  return np.concatenate([pos[:1], grid], axis=0)


def _maybe_adapt(pos: np.ndarray, grid: int | None, sd: StateDict, key: str) -> np.ndarray:
  if grid is not None:
    pos = adapt_position_embedding(pos, grid)
    sd.origin[id(pos)] = sd.prefix + key
  return pos


# ----------------------------------------------------------------------------- image tower

def _vit(sd: StateDict, names: _ViTNaming, include_ln_post: bool, grid: int | None) -> dict:
  """Consumes the ViT keys of one naming scheme (relative to sd.prefix) and returns our params."""
  pos = _maybe_adapt(sd.take(names.positional_embedding), grid, sd, names.positional_embedding)
  params = {
      "patch_embed": sd.conv(names.patch_embed, bias=False),
      "class_embedding": sd.take(names.class_embedding),
      "positional_embedding": pos,
      "ln_pre": sd.norm(names.ln_pre),
  }
  params.update(sd.blocks(names.blocks, "blocks_{}", names.block))
  if include_ln_post:
    params["ln_post"] = sd.norm(names.ln_post)
  else:
    sd.skip_under(names.ln_post)
  return params


def convert_hf_clip_vision(state_dict: Mapping[str, Any], prefix: str | None = None, *,
                           include_ln_post: bool = True, grid: int | None = None,
                           expected=None) -> dict:
  """transformers CLIPVisionModel (or CLIPModel) weights -> VisionTransformer params.

  Keys: {prefix}embeddings.{class_embedding, patch_embedding.weight, position_embedding.weight},
  pre_layrnorm, encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2,
  layer_norm2}, post_layernorm (-> ln_post; skipped when include_ln_post=False); the `position_ids`
  buffer is ignored.
  grid: resize the positional embedding to grid x grid patches (adapt_position_embedding).
  prefix: None picks 'vision_model.' when the dict has such keys (hub checkpoints, CLIPModel,
  transformers < 5) and '' otherwise (a transformers 5 CLIPVisionModel's own state_dict()).
  Keys outside `prefix` (a CLIPModel's text tower, visual_projection) are not looked at.
  """
  if prefix is None:
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in state_dict) else ""
  sd = StateDict(state_dict, prefix)
  sd.skip("embeddings.position_ids")
  params = _vit(sd, _HF_VIT, include_ln_post, grid)
  sd.finish()
  if expected is None:
    expected = _vit_expected(params, include_ln_post)
  return _check(params, expected, sd)


def _openai_visual(sd: StateDict, include_ln_post: bool, grid: int | None) -> dict:
  """Consumes OpenAI-CLIP VisualTransformer keys (relative to sd.prefix) and returns our params."""
  params = _vit(sd, _OPENAI_VIT, include_ln_post, grid)
  sd.skip("proj")  # the CLIP projection: not used (the reference sets it to None)
  return params


def convert_openai_clip_visual(state_dict: Mapping[str, Any], prefix: str = "visual.", *,
                               include_ln_post: bool = True, grid: int | None = None,
                               expected=None) -> dict:
  """OpenAI CLIP visual weights -> VisionTransformer params.

  Keys: {prefix}conv1.weight, class_embedding, positional_embedding, ln_pre,
  transformer.resblocks.N.{attn.in_proj_weight/in_proj_bias (split into q, k, v), attn.out_proj,
  ln_1, mlp.c_fc, mlp.c_proj, ln_2}, ln_post, proj (skipped). grid: e.g. 8 to adapt OpenAI's 224 px
  ViT-B/32 (7x7+1) to 256 px (8x8+1). The same names serve the reference's `VisualTransformer`
  (cheff/ldm/modules/encoders/modules.py).
  """
  sd = StateDict(state_dict, prefix)
  params = _openai_visual(sd, include_ln_post, grid)
  sd.finish()
  if expected is None:
    expected = _vit_expected(params, include_ln_post)
  return _check(params, expected, sd)


# ----------------------------------------------------------------------------- table tower

def _table(sd: StateDict, encoder: str, fc: str) -> dict:
  params = sd.blocks(f"{encoder}layers", "layer_{}", TABLE_LAYER)
  if not params:
    raise ConversionError(f"no key {sd.prefix}{encoder}layers.N.* in the state dict")
  params["fc"] = sd.linear(fc)
  return params


def convert_torch_table_tower(state_dict: Mapping[str, Any], prefix: str = "", *,
                              encoder: str = "transformer.", fc: str = "fc", expected=None) -> dict:
  """The reference's TabTransformerEmbedder -> TableTower params.

  Keys: {prefix}{encoder}layers.N.{self_attn.in_proj_weight, self_attn.in_proj_bias,
  self_attn.out_proj, linear1, linear2, norm1, norm2} (torch.nn.TransformerEncoder) and {prefix}{fc}
  (the Linear event_dim -> out_dim). For a bare nn.TransformerEncoder dict pass encoder='' and name
  its Linear in fc.
  """
  sd = StateDict(state_dict, prefix)
  params = _table(sd, encoder, fc)
  sd.finish()
  return _check(params, _table_expected(params) if expected is None else expected, sd)


# ---------------------------------------------------------------------------- reference checkpoints

# The reference conditioner's own layers (the towers sit under clip_img_encoder / clip_tab_encoder).
_CONDITIONER_LINEARS = {"vae_proj": IfPresent(StateDict.linear, "vae_projector"),
                        "adapter": IfPresent(StateDict.linear, "adaptor"),
                        "projector": IfPresent(StateDict.linear, "projector")}


def convert_reference_conditioner(state_dict: Mapping[str, Any], prefix: str = "cond_stage_model.",
                                  *, expected=None) -> dict:
  """EHRXDiff LDM checkpoint (`cond_stage_model.*`) -> Conditioner params.

  Reference module: cheff.ldm.modules.encoders.modules.MultiModalTransformerAdaptor (and its
  ablation siblings; the streams present are read off the keys):
    clip_img_encoder.*      VisualTransformer, OpenAI names, no `proj` -> image_tower (its unused
                            ln_post is skipped)
    clip_tab_encoder.transformer.layers.N.*, clip_tab_encoder.fc -> table_tower
    vae_projector           Linear(h*w, 768) -> vae_proj
    adaptor                 Linear(n_tokens, condition_feat_dim) on the token axis -> adapter
    projector               Linear(768, context_dim), only when context_dim != 768 -> projector
    autoencoder.*           the conditioner's frozen VAE: skipped here (interop.vae converts it; it
                            is the same network as first_stage_model)
  Assumption: the checkpoint's top-level module is LatentDiffusion with the conditioner as
  `cond_stage_model` (Lightning `state_dict`); for a bare adaptor state dict pass prefix=''.
  """
  sd = StateDict(state_dict, prefix)
  sd.skip_under("autoencoder")
  params: dict = {}
  if sd.keys_under("clip_tab_encoder"):
    sub = _SubDict(sd, "clip_tab_encoder.")
    params["table_tower"] = _table(sub, "transformer.", "fc")
  if sd.keys_under("clip_img_encoder"):
    sub = _SubDict(sd, "clip_img_encoder.")
    params["image_tower"] = _openai_visual(sub, include_ln_post=False, grid=None)
  params.update(sd.block("", _CONDITIONER_LINEARS))
  if not params:
    raise ConversionError(f"no conditioner weights under {prefix!r} (only the VAE?)")
  sd.finish()
  if expected is None:
    expected = dict(params)
    if "image_tower" in params:
      expected["image_tower"] = _vit_expected(params["image_tower"], include_ln_post=False)
    if "table_tower" in params:
      expected["table_tower"] = _table_expected(params["table_tower"])
    expected = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32),
                                      expected)
  return _check(params, expected, sd)


def convert_reference_clip(state_dict: Mapping[str, Any], prefix: str = "model.", *,
                           grid: int | None = None, expected=None) -> dict:
  """EHRXDiff CLIP-pretraining checkpoint (CLIP_pretrain CustomTabViTCLIPWrapper) -> tower params.

  Returns {'image_tower', 'table_tower', 'logit_scale' (float32 scalar)}. The image tower keeps
  ln_post (CLIP pretraining pools ln_post(CLS)); drop it to initialise a conditioner's image tower.
    model.visual.*         VisualTransformer (OpenAI names; proj, None there, skipped if present)
    model.transformer.*    TabTransformerEmbedder (transformer.layers.N.*, fc) -> table_tower
    model.logit_scale      -> logit_scale
    model.token_embedding, model.positional_embedding, model.ln_final, model.text_projection: unused
    remnants of OpenAI's text tower in that wrapper; skipped.
  expected: optional {'image_tower': tree, 'table_tower': tree} to check against.
  """
  sd = StateDict(state_dict, prefix)
  for key in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
              "text_projection"):
    sd.skip(key)
  image = _openai_visual(_SubDict(sd, "visual."), include_ln_post=True, grid=grid)
  table = _table(_SubDict(sd, "transformer."), "transformer.", "fc")
  logit_scale = sd.take("logit_scale").reshape(())
  sd.finish()
  exp = dict(expected or {})
  exp.setdefault("image_tower", _vit_expected(image, include_ln_post=True))
  exp.setdefault("table_tower", _table_expected(table))
  params = {"image_tower": _check(image, exp["image_tower"], sd),
            "table_tower": _check(table, exp["table_tower"], sd)}
  params["logit_scale"] = np.asarray(logit_scale, np.float32)
  return params


# ----------------------------------------------------------------------------- export (the inverse)

def _export_vit(im: Mapping[str, Any], names: _ViTNaming, ln_post: bool) -> dict:
  """Inverse of `_vit`. ln_post=True writes `ln_post` (ones / zeros when our tree has none, as the
  reference conditioner's unused copy)."""
  out: dict = {names.class_embedding: np.asarray(im["class_embedding"], np.float32),
               names.positional_embedding: np.asarray(im["positional_embedding"], np.float32)}
  put_conv(out, names.patch_embed, im["patch_embed"])
  put_norm(out, names.ln_pre, im["ln_pre"])
  export_blocks(out, im, "blocks_{}", names.blocks, names.block)
  if ln_post:
    width = im["class_embedding"].shape[-1]
    unused = {"scale": np.ones(width, np.float32), "bias": np.zeros(width, np.float32)}
    put_norm(out, names.ln_post, im.get("ln_post") or unused)
  return out


def export_openai_visual(im: Mapping[str, Any], ln_post: bool = True) -> dict:
  """VisionTransformer -> OpenAI CLIP VisualTransformer names (conv1 without bias, no proj)."""
  return _export_vit(im, _OPENAI_VIT, ln_post)


def export_table_tower(t: Mapping[str, Any], encoder: str = "transformer.", fc: str = "fc") -> dict:
  """TableTower -> the reference's TabTransformerEmbedder names (inverse of the table import)."""
  out: dict = {}
  export_blocks(out, t, "layer_{}", f"{encoder}layers", TABLE_LAYER)
  put_linear(out, fc, t["fc"])
  return out


def export_reference_conditioner(cond: Mapping[str, Any]) -> dict:
  """Conditioner -> MultiModalTransformerAdaptor names (no prefix, without the autoencoder copy)."""
  out: dict = {}
  if "image_tower" in cond:
    image = export_openai_visual(cond["image_tower"])
    out.update({f"clip_img_encoder.{k}": v for k, v in image.items()})
  if "table_tower" in cond:
    table = export_table_tower(cond["table_tower"])
    out.update({f"clip_tab_encoder.{k}": v for k, v in table.items()})
  export_block(out, "", cond, _CONDITIONER_LINEARS)
  return out


class _SubDict(StateDict):
  """A view of a StateDict under a longer prefix that marks keys as used in its parent."""

  def __init__(self, parent: StateDict, sub: str):  # pylint: disable=super-init-not-called
    self.prefix = parent.prefix + sub
    self._sd = {k: v for k, v in parent._sd.items() if k.startswith(self.prefix)}
    if not self._sd:
      raise ConversionError(f"no key starts with {self.prefix!r}")
    self._used = parent._used
    self.origin = parent.origin
