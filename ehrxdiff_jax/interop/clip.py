"""PyTorch state dicts of the CLIP towers and the reference conditioner -> our parameter trees.

  convert_hf_clip_vision(sd)          transformers CLIPVisionModel / CLIPModel (vision_model.*) -> image tower
  convert_openai_clip_visual(sd)      OpenAI CLIP `visual.*` (and the reference's VisualTransformer) -> image tower
  convert_torch_table_tower(sd)       the reference's TabTransformerEmbedder (transformer.layers.N.*, fc) -> table tower
  convert_reference_conditioner(sd)   EHRXDiff LDM checkpoint `cond_stage_model.*` -> conditioner
  convert_reference_clip(sd)          EHRXDiff CLIP-pretraining checkpoint `model.visual.*`, `model.transformer.*`
  adapt_position_embedding(pos, g)    7x7+1 (224 px, patch 32) -> 8x8+1 (256 px) positional embedding

Every converter consumes the keys under its prefix through `StateDict` (a left-over key is an error),
then checks the result against the shapes of our modules (`check_against`): by default a tower built from
the dimensions read off the state dict, or the `expected` tree you pass (e.g. `jax.eval_shape` of your
model's init, boxed or not). Errors are `ConversionError`s that name the torch key.

Our names (see nn/vit.py, nn/table.py, nn/conditioner.py):
  image tower: patch_embed/kernel, class_embedding, positional_embedding, ln_pre, blocks_{i}/{ln_1,
    attn/{q,k,v,out}, ln_2, fc1, fc2}, ln_post (only with include_ln_post)
  table tower: layer_{i}/{self_attn/{q,k,v,out}, linear1, linear2, norm1, norm2}, fc
  conditioner: image_tower, table_tower, vae_proj, adapter, projector (when present)
"""
from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ehrxdiff_jax.interop.common import ConversionError, StateDict, check_against

__all__ = [
    "adapt_position_embedding", "convert_hf_clip_vision", "convert_openai_clip_visual",
    "convert_torch_table_tower", "convert_reference_conditioner", "convert_reference_clip",
]


# ----------------------------------------------------------------------------- helpers

def _count_layers(sd: StateDict, pattern: str) -> int:
  """Number of distinct N in keys matching prefix + pattern (pattern has one (\\d+) group)."""
  rx = re.compile(re.escape(sd.prefix) + pattern)
  found = {int(m.group(1)) for k in sd._sd if (m := rx.match(k))}
  if not found:
    return 0
  if found != set(range(len(found))):
    raise ConversionError(f"layer indices under {sd.prefix!r} are not contiguous from 0: {sorted(found)}")
  return len(found)


def _split_in_proj(sd: StateDict, key: str) -> dict:
  """torch MultiheadAttention in_proj_weight [3W, W] / in_proj_bias [3W] -> our q, k, v Dense params."""
  w = sd.take(f"{key}.in_proj_weight")
  b = sd.take(f"{key}.in_proj_bias")
  if w.ndim != 2 or w.shape[0] != 3 * w.shape[1] or b.shape != (w.shape[0],):
    raise ConversionError(f"{sd.prefix}{key}.in_proj_weight/bias have shapes {w.shape}/{b.shape}; "
                          "expected [3W, W] and [3W]")
  width = w.shape[1]
  out = {}
  for i, name in enumerate("qkv"):
    kernel = w[i * width:(i + 1) * width].T.copy()
    bias = b[i * width:(i + 1) * width].copy()
    sd.origin[id(kernel)] = f"{sd.prefix}{key}.in_proj_weight"
    sd.origin[id(bias)] = f"{sd.prefix}{key}.in_proj_bias"
    out[name] = {"kernel": kernel, "bias": bias}
  out["out"] = sd.linear(f"{key}.out_proj")
  return out


def _vit_expected(width: int, patch: int, layers: int, mlp_dim: int, num_tokens: int, include_ln_post: bool):
  from ehrxdiff_jax.nn.vit import VisionTransformer
  grid = int(round((num_tokens - 1) ** 0.5))
  if grid * grid + 1 != num_tokens:
    raise ConversionError(f"positional embedding has {num_tokens} rows, not 1 + a square number of patches")
  heads = width // 64 if width % 64 == 0 else 1  # heads do not change any parameter shape
  vit = VisionTransformer(image_size=grid * patch, patch_size=patch, width=width, layers=layers, heads=heads,
                          mlp_dim=mlp_dim)
  images = jax.ShapeDtypeStruct((1, grid * patch, grid * patch, 3), jnp.float32)
  init = functools.partial(vit.init, method=VisionTransformer.pooled if include_ln_post else None)
  return nn.unbox(jax.eval_shape(init, jax.random.key(0), images)["params"])


def _table_expected(event_dim: int, ff_dim: int, layers: int, out_dim: int):
  from ehrxdiff_jax.nn.table import TableTower
  tower = TableTower(event_dim=event_dim, heads=1, ff_dim=ff_dim, layers=layers, out_dim=out_dim)
  events = jax.ShapeDtypeStruct((1, 2, event_dim), jnp.float32)
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
  return np.concatenate([pos[:1], np.asarray(grid).reshape(new_grid * new_grid, pos.shape[1])], axis=0)


def _maybe_adapt(pos: np.ndarray, grid: int | None, sd: StateDict, key: str) -> np.ndarray:
  if grid is not None:
    pos = adapt_position_embedding(pos, grid)
    sd.origin[id(pos)] = sd.prefix + key
  return pos


# ----------------------------------------------------------------------------- image tower

def convert_hf_clip_vision(state_dict: Mapping[str, Any], prefix: str | None = None, *,
                           include_ln_post: bool = True, grid: int | None = None, expected=None) -> dict:
  """transformers CLIPVisionModel (or CLIPModel) weights -> VisionTransformer params.

  Keys: {prefix}embeddings.{class_embedding, patch_embedding.weight, position_embedding.weight},
  pre_layrnorm, encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2, layer_norm2},
  post_layernorm (-> ln_post; skipped when include_ln_post=False). The `position_ids` buffer is ignored.
  grid: resize the positional embedding to grid x grid patches (adapt_position_embedding).
  prefix: None picks 'vision_model.' when the dict has such keys (hub checkpoints, CLIPModel,
  transformers < 5) and '' otherwise (a transformers 5 CLIPVisionModel's own state_dict()).
  Keys outside `prefix` (a CLIPModel's text tower, visual_projection) are not looked at.
  """
  if prefix is None:
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in state_dict) else ""
  sd = StateDict(state_dict, prefix)
  sd.skip("embeddings.position_ids")
  pos = _maybe_adapt(sd.take("embeddings.position_embedding.weight"), grid, sd, "embeddings.position_embedding.weight")
  params = {
      "patch_embed": sd.conv("embeddings.patch_embedding", bias=False),
      "class_embedding": sd.take("embeddings.class_embedding"),
      "positional_embedding": pos,
      "ln_pre": sd.norm("pre_layrnorm"),
  }
  layers = _count_layers(sd, r"encoder\.layers\.(\d+)\.")
  for i in range(layers):
    p = f"encoder.layers.{i}."
    params[f"blocks_{i}"] = {
        "ln_1": sd.norm(p + "layer_norm1"),
        "attn": {n: sd.linear(f"{p}self_attn.{n}_proj") for n in ("q", "k", "v")}
                | {"out": sd.linear(p + "self_attn.out_proj")},
        "ln_2": sd.norm(p + "layer_norm2"),
        "fc1": sd.linear(p + "mlp.fc1"),
        "fc2": sd.linear(p + "mlp.fc2"),
    }
  if include_ln_post:
    params["ln_post"] = sd.norm("post_layernorm")
  else:
    sd.skip("post_layernorm.weight")
    sd.skip("post_layernorm.bias")
  sd.finish()
  if expected is None:
    expected = _vit_expected_from(params, include_ln_post)
  return _check(params, expected, sd)


def _openai_visual(sd: StateDict, include_ln_post: bool, grid: int | None) -> dict:
  """Consumes OpenAI-CLIP VisualTransformer keys (relative to sd.prefix) and returns our params."""
  pos = _maybe_adapt(sd.take("positional_embedding"), grid, sd, "positional_embedding")
  params = {
      "patch_embed": sd.conv("conv1", bias=False),
      "class_embedding": sd.take("class_embedding"),
      "positional_embedding": pos,
      "ln_pre": sd.norm("ln_pre"),
  }
  layers = _count_layers(sd, r"transformer\.resblocks\.(\d+)\.")
  for i in range(layers):
    p = f"transformer.resblocks.{i}."
    params[f"blocks_{i}"] = {
        "ln_1": sd.norm(p + "ln_1"),
        "attn": _split_in_proj(sd, p + "attn"),
        "ln_2": sd.norm(p + "ln_2"),
        "fc1": sd.linear(p + "mlp.c_fc"),
        "fc2": sd.linear(p + "mlp.c_proj"),
    }
  if include_ln_post:
    params["ln_post"] = sd.norm("ln_post")
  else:
    sd.skip("ln_post.weight")
    sd.skip("ln_post.bias")
  sd.skip("proj")  # the CLIP projection: not used (the reference sets it to None)
  return params


def _vit_expected_from(params: dict, include_ln_post: bool):
  k = params["patch_embed"]["kernel"]
  layers = sum(1 for n in params if n.startswith("blocks_"))
  mlp = params["blocks_0"]["fc1"]["kernel"].shape[1] if layers else 4 * k.shape[3]
  return _vit_expected(k.shape[3], k.shape[0], layers, mlp, params["positional_embedding"].shape[0],
                       include_ln_post)


def convert_openai_clip_visual(state_dict: Mapping[str, Any], prefix: str = "visual.", *,
                               include_ln_post: bool = True, grid: int | None = None, expected=None) -> dict:
  """OpenAI CLIP visual weights -> VisionTransformer params.

  Keys: {prefix}conv1.weight, class_embedding, positional_embedding, ln_pre, transformer.resblocks.N.{
  attn.in_proj_weight/in_proj_bias (split into q, k, v), attn.out_proj, ln_1, mlp.c_fc, mlp.c_proj, ln_2},
  ln_post, proj (skipped). grid: e.g. 8 to adapt OpenAI's 224 px ViT-B/32 (7x7+1) to 256 px (8x8+1).
  The same names serve the reference's `VisualTransformer` (cheff/ldm/modules/encoders/modules.py).
  """
  sd = StateDict(state_dict, prefix)
  params = _openai_visual(sd, include_ln_post, grid)
  sd.finish()
  if expected is None:
    expected = _vit_expected_from(params, include_ln_post)
  return _check(params, expected, sd)


# ----------------------------------------------------------------------------- table tower

def _table(sd: StateDict, encoder: str, fc: str) -> dict:
  layers = _count_layers(sd, re.escape(encoder) + r"layers\.(\d+)\.")
  if not layers:
    raise ConversionError(f"no key {sd.prefix}{encoder}layers.N.* in the state dict")
  params = {}
  for i in range(layers):
    p = f"{encoder}layers.{i}."
    params[f"layer_{i}"] = {
        "self_attn": _split_in_proj(sd, p + "self_attn"),
        "linear1": sd.linear(p + "linear1"),
        "linear2": sd.linear(p + "linear2"),
        "norm1": sd.norm(p + "norm1"),
        "norm2": sd.norm(p + "norm2"),
    }
  params["fc"] = sd.linear(fc)
  return params


def _table_expected_from(params: dict):
  layers = sum(1 for n in params if n.startswith("layer_"))
  l1 = params["layer_0"]["linear1"]["kernel"]
  return _table_expected(l1.shape[0], l1.shape[1], layers, params["fc"]["kernel"].shape[1])


def convert_torch_table_tower(state_dict: Mapping[str, Any], prefix: str = "", *, encoder: str = "transformer.",
                              fc: str = "fc", expected=None) -> dict:
  """The reference's TabTransformerEmbedder -> TableTower params.

  Keys: {prefix}{encoder}layers.N.{self_attn.in_proj_weight, self_attn.in_proj_bias, self_attn.out_proj,
  linear1, linear2, norm1, norm2} (torch.nn.TransformerEncoder) and {prefix}{fc} (the Linear
  event_dim -> out_dim). For a bare nn.TransformerEncoder dict pass encoder='' and name its Linear in fc.
  """
  sd = StateDict(state_dict, prefix)
  params = _table(sd, encoder, fc)
  sd.finish()
  return _check(params, _table_expected_from(params) if expected is None else expected, sd)


# ----------------------------------------------------------------------------- reference checkpoints

def convert_reference_conditioner(state_dict: Mapping[str, Any], prefix: str = "cond_stage_model.", *,
                                  expected=None) -> dict:
  """EHRXDiff LDM checkpoint (`cond_stage_model.*`) -> Conditioner params.

  Reference module: cheff.ldm.modules.encoders.modules.MultiModalTransformerAdaptor (and its ablation
  siblings; the streams present are read off the keys):
    clip_img_encoder.*           VisualTransformer, OpenAI names, no `proj`   -> image_tower (its unused
                                                                                 ln_post is skipped)
    clip_tab_encoder.transformer.layers.N.*, clip_tab_encoder.fc              -> table_tower
    vae_projector                Linear(h*w, 768)                             -> vae_proj
    adaptor                      Linear(n_tokens, condition_feat_dim) on the token axis -> adapter
    projector                    Linear(768, context_dim), only when context_dim != 768 -> projector
    autoencoder.*                the frozen VAE inside the conditioner: skipped here; convert it with
                                 interop.vae (it is the same network as first_stage_model).
  Assumption: the checkpoint's top-level module is LatentDiffusion with the conditioner as
  `cond_stage_model` (Lightning `state_dict`); for a bare adaptor state dict pass prefix=''.
  """
  sd = StateDict(state_dict, prefix)
  for key in list(sd._sd):
    if key.startswith(prefix + "autoencoder."):
      sd.skip(key[len(prefix):])
  params: dict = {}
  if any(k.startswith(prefix + "clip_tab_encoder.") for k in sd._sd):
    sub = _SubDict(sd, "clip_tab_encoder.")
    params["table_tower"] = _table(sub, "transformer.", "fc")
  if any(k.startswith(prefix + "clip_img_encoder.") for k in sd._sd):
    sub = _SubDict(sd, "clip_img_encoder.")
    params["image_tower"] = _openai_visual(sub, include_ln_post=False, grid=None)
  if sd.has("vae_projector.weight"):
    params["vae_proj"] = sd.linear("vae_projector")
  if sd.has("adaptor.weight"):
    params["adapter"] = sd.linear("adaptor")
  if sd.has("projector.weight"):
    params["projector"] = sd.linear("projector")
  if not params:
    raise ConversionError(f"no conditioner weights under {prefix!r} (only the VAE?)")
  sd.finish()
  if expected is None:
    expected = dict(params)
    if "image_tower" in params:
      expected["image_tower"] = _vit_expected_from(params["image_tower"], include_ln_post=False)
    if "table_tower" in params:
      expected["table_tower"] = _table_expected_from(params["table_tower"])
    expected = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), expected)
  return _check(params, expected, sd)


def convert_reference_clip(state_dict: Mapping[str, Any], prefix: str = "model.", *, grid: int | None = None,
                           expected=None) -> dict:
  """EHRXDiff CLIP-pretraining checkpoint (CLIP_pretrain CustomTabViTCLIPWrapper) -> tower params.

  Returns {'image_tower': ..., 'table_tower': ..., 'logit_scale': float32 scalar}. The image tower keeps
  ln_post (CLIP pretraining pools ln_post(CLS)); drop it to initialise a conditioner's image tower.
    model.visual.*         VisualTransformer (OpenAI names; proj was set to None there, skipped if present)
    model.transformer.*    TabTransformerEmbedder (transformer.layers.N.*, fc) -> table_tower
    model.logit_scale      -> logit_scale
    model.token_embedding, model.positional_embedding, model.ln_final, model.text_projection: the unused
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
  exp.setdefault("image_tower", _vit_expected_from(image, include_ln_post=True))
  exp.setdefault("table_tower", _table_expected_from(table))
  params = {"image_tower": _check(image, exp["image_tower"], sd), "table_tower": _check(table, exp["table_tower"], sd)}
  params["logit_scale"] = np.asarray(logit_scale, np.float32)
  return params


class _SubDict(StateDict):
  """A view of a StateDict under a longer prefix that marks keys as used in its parent."""

  def __init__(self, parent: StateDict, sub: str):  # pylint: disable=super-init-not-called
    self.prefix = parent.prefix + sub
    self._sd = {k: v for k, v in parent._sd.items() if k.startswith(self.prefix)}
    if not self._sd:
      raise ConversionError(f"no key starts with {self.prefix!r}")
    self._used = parent._used
    self.origin = parent.origin
