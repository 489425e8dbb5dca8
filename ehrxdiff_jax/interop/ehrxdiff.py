"""Whole-checkpoint import (and export) of the published EHRXDiff PyTorch weights.

    import_ehrxdiff(state_dict, cfg)    EHRXDiff Lightning `.ckpt` (LatentDiffusion) -> ImportedWeights(
                                        params={'unet', 'conditioner', 'vae'}, ema_params={'unet'} or None)
    import_cheff_vae(state_dict, cfg)   Cheff autoencoder `.pt` -> {'vae': ...}
    import_clip(state_dict, cfg)        EHRXDiff CLIP-pretraining `.ckpt` -> {'image_tower', 'table_tower',
                                        'logit_scale'} (the CLIP trainer's parameter layout)
    load_torch_weights(path, kind, cfg) reads the file (`interop.common.load_state_dict`: torch.load with
                                        weights_only=True, never pickle) and calls the importer of `kind`
    export_ehrxdiff_state_dict(params, ema_params, cfg)   the inverse: our trees -> the reference's names and
                                        layouts (NCHW kernels, fused in_proj, LitEma dot-free names, the
                                        schedule buffers), e.g. to feed the PyTorch reference or to build
                                        synthetic checkpoints in tests

The EHRXDiff Lightning state dict has, and every key is accounted for:
  model.diffusion_model.*     the UNet (interop.unet.convert_ldm_unet)
  model_ema.diffusion_model*  its LitEma copy, dot-free names (convert_ldm_unet_ema); model_ema.decay and
                              model_ema.num_updates are LitEma's bookkeeping buffers (reported, not params)
  first_stage_model.*         the KL autoencoder (interop.vae.convert_ldm_vae; its loss.* is skipped)
  cond_stage_model.*          MultiModalTransformerAdaptor (interop.clip.convert_reference_conditioner; the
                              image tower's unused ln_post is skipped); cond_stage_model.autoencoder.* is the
                              conditioner's frozen copy of the autoencoder: converted and compared with
                              first_stage_model (our model has one VAE; a difference is an error by default)
  betas, alphas_cumprod, ...  the DDPM schedule buffers (SCHEDULE_BUFFERS): compared with c.diffusion
  logvar, scale_factor        optional LatentDiffusion buffers (scale_factor is compared with the config)
Anything else is an error naming the keys; a missing weight is an error naming the torch key; then the whole
tree is checked against the shapes of `models.init_ldm(cfg)`, after a field-by-field comparison of the
architecture read off the weights with the config (`ConfigMismatch` names both values).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from typing import Any, Mapping

import numpy as np

from ehrxdiff_jax.interop.common import ConversionError, check_against, load_state_dict, to_numpy

log = logging.getLogger(__name__)

__all__ = [
    "ConfigMismatch", "ImportedWeights", "KINDS", "SCHEDULE_BUFFERS", "detect_kind",
    "export_ehrxdiff_state_dict", "import_cheff_vae", "import_clip", "import_ehrxdiff", "infer_model_fields",
    "load_torch_weights", "check_fields",
]

KINDS = ("ehrxdiff", "cheff-vae", "clip")

# LDM `DDPM.register_schedule` persistent buffers (lvlb_weights is registered with persistent=False).
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
_OPTIONAL_BUFFERS = ("logvar", "scale_factor", "cond_ids")
_PREFIXES = {"unet": "model.diffusion_model.", "ema": "model_ema.", "vae": "first_stage_model.",
             "conditioner": "cond_stage_model."}
_COND_VAE = "cond_stage_model.autoencoder."


class ConfigMismatch(ConversionError):
  """The checkpoint describes another architecture than the config: names each field and both values."""


@dataclasses.dataclass
class ImportedWeights:
  params: dict
  ema_params: dict | None = None
  info: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------- config <-> shapes

def _field_of(cfg, dotted: str):
  node = cfg
  for p in dotted.split("."):
    node = node[p]
  return node


def _norm(v):
  if isinstance(v, (list, tuple)):
    return tuple(_norm(x) for x in v)
  if isinstance(v, (np.integer,)):
    return int(v)
  return v


def _latent_factor_of_vae_fields(vae_fields: Mapping[str, Any]) -> int:
  return 2 ** (len(vae_fields["ch_mult"]) - 1)


def infer_model_fields(params: Mapping[str, Any]) -> dict:
  """Config fields (dotted names under the config root) that a converted LDM tree implies.

  Fields invisible in the shapes (num_heads, norm_groups, dropout...) are not included."""
  from ehrxdiff_jax.interop.unet import infer_config as unet_fields
  from ehrxdiff_jax.interop.vae import infer_vae_fields
  out: dict = {}
  if "unet" in params:
    for k, v in unet_fields(params["unet"]).items():
      if k not in ("num_heads", "norm_groups"):
        out[f"model.unet.{k}"] = _norm(v)
  vae_fields = None
  if "vae" in params:
    vae_fields = infer_vae_fields(params["vae"])
    for k, v in vae_fields.items():
      out[f"model.vae.{k}"] = _norm(v)
  if "conditioner" in params:
    out.update(_conditioner_fields(params["conditioner"], vae_fields))
  return out


def _tower_fields(cond: Mapping[str, Any]) -> dict:
  out = {}
  if "table_tower" in cond:
    t = cond["table_tower"]
    l1 = t["layer_0"]["linear1"]["kernel"]
    out["model.table_tower.event_dim"] = int(l1.shape[0])
    out["model.table_tower.ff_dim"] = int(l1.shape[1])
    out["model.table_tower.layers"] = sum(1 for k in t if k.startswith("layer_"))
    out["model.table_tower.out_dim"] = int(t["fc"]["kernel"].shape[1])
  if "image_tower" in cond:
    im = cond["image_tower"]
    k = im["patch_embed"]["kernel"]
    grid = int(round((im["positional_embedding"].shape[0] - 1) ** 0.5))
    out["model.image_tower.patch_size"] = int(k.shape[0])
    out["model.image_tower.width"] = int(k.shape[3])
    out["model.image_tower.image_size"] = grid * int(k.shape[0])
    out["model.image_tower.layers"] = sum(1 for n in im if n.startswith("blocks_"))
    if "blocks_0" in im:
      out["model.image_tower.mlp_dim"] = int(im["blocks_0"]["fc1"]["kernel"].shape[1])
  return out


def _conditioner_fields(cond: Mapping[str, Any], vae_fields: Mapping[str, Any] | None) -> dict:
  from ehrxdiff_jax.nn.conditioner import STREAMS
  out = _tower_fields(cond)
  present = {"table": "table_tower" in cond, "image": "image_tower" in cond, "vae": "vae_proj" in cond}
  out["model.conditioner.cross_attention"] = tuple(s for s in STREAMS if present[s])
  width = None
  if "table_tower" in cond:
    width = out["model.table_tower.out_dim"]
  elif "image_tower" in cond:
    width = out["model.image_tower.width"]
  if "vae_proj" in cond:
    hw = int(cond["vae_proj"]["kernel"].shape[0])
    side = int(round(hw ** 0.5))
    if vae_fields is not None and side * side == hw:
      out["data.image_size"] = side * _latent_factor_of_vae_fields(vae_fields)
    if width is None:
      width = int(cond["vae_proj"]["kernel"].shape[1])
  if "projector" in cond:
    out["model.conditioner.context_dim"] = int(cond["projector"]["kernel"].shape[1])
  elif width is not None and (len([s for s in present if present[s]]) > 1 or "vae_proj" in cond):
    out["model.conditioner.context_dim"] = width
  if "adapter" in cond:
    n_tokens, context_tokens = (int(s) for s in cond["adapter"]["kernel"].shape)
    out["model.conditioner.context_tokens"] = context_tokens
    if "table_tower" in cond:
      other = 0
      if "image_tower" in cond:
        other += 1 + (out["model.image_tower.image_size"] // out["model.image_tower.patch_size"]) ** 2
      if "vae_proj" in cond:
        if vae_fields is None:
          other = None
        else:
          other += int(vae_fields["embed_dim"])
      if other is not None:
        out["model.conditioner.max_events"] = n_tokens - other
  return out


def check_fields(params: Mapping[str, Any] | None, cfg, what: str = "the checkpoint",
                 fields: Mapping[str, Any] | None = None) -> None:
  """Raises ConfigMismatch listing every config field whose value differs from what `params` implies
  (or from `fields`, {dotted config name: value}, when given)."""
  problems = []
  for name, value in (infer_model_fields(params) if fields is None else fields).items():
    try:
      want = _norm(_field_of(cfg, name))
    except (KeyError, AttributeError):
      continue
    if name == "model.conditioner.cross_attention":
      from ehrxdiff_jax.nn.conditioner import STREAMS
      want = tuple(s for s in STREAMS if s in want)
    if want != value:
      problems.append(f"{name}: {what} has {value!r}, the config has {want!r}")
  if problems:
    raise ConfigMismatch(f"{what} does not match the config ({len(problems)} fields): " + "; ".join(problems))


@functools.lru_cache(maxsize=4)
def _expected_ldm_cached(cfg_json: str):
  import flax.linen as nn
  import jax
  import ml_collections

  from ehrxdiff_jax import models
  from ehrxdiff_jax.config_util import tuplify
  cfg = ml_collections.ConfigDict(tuplify(__import__("json").loads(cfg_json)))
  shapes = jax.eval_shape(functools.partial(models.init_ldm, cfg), jax.random.key(0))
  return nn.unbox(shapes)


def expected_ldm_params(cfg) -> dict:
  """Unboxed ShapeDtypeStructs of {'unet', 'conditioner', 'vae'} for the config (nothing allocated)."""
  return _expected_ldm_cached(cfg.to_json_best_effort(sort_keys=True))


# ----------------------------------------------------------------------------- schedule buffers

def reference_schedule_buffers(diffusion_cfg) -> dict[str, np.ndarray]:
  """The LDM `register_schedule` buffers (float32) for `c.diffusion` (v_posterior = 0)."""
  from ehrxdiff_jax.diffusion import make_betas
  d = diffusion_cfg
  betas = make_betas(d.beta_schedule, d.num_timesteps, d.linear_start, d.linear_end)
  alphas = 1.0 - betas
  acp = np.cumprod(alphas, axis=0)
  acp_prev = np.append(1.0, acp[:-1])
  post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
  out = dict(
      betas=betas, alphas_cumprod=acp, alphas_cumprod_prev=acp_prev, sqrt_alphas_cumprod=np.sqrt(acp),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - acp), log_one_minus_alphas_cumprod=np.log(1.0 - acp),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / acp), sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / acp - 1),
      posterior_variance=post_var, posterior_log_variance_clipped=np.log(np.maximum(post_var, 1e-20)),
      posterior_mean_coef1=betas * np.sqrt(acp_prev) / (1.0 - acp),
      posterior_mean_coef2=(1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp))
  return {k: v.astype(np.float32) for k, v in out.items()}


def _check_schedule(sd: Mapping[str, Any], cfg, info: dict) -> None:
  present = [k for k in SCHEDULE_BUFFERS if k in sd]
  if not present:
    return
  betas = to_numpy(sd["betas"]).astype(np.float64) if "betas" in sd else None
  if betas is not None:
    info["schedule"] = dict(num_timesteps=int(betas.shape[0]), linear_start=float(betas[0]),
                            linear_end=float(betas[-1]))
  if cfg is None:
    return
  ref = reference_schedule_buffers(cfg.diffusion)
  for name in ("betas", "alphas_cumprod"):
    if name not in sd:
      continue
    got = to_numpy(sd[name]).astype(np.float64)
    want = ref[name].astype(np.float64)
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-4, atol=1e-7):
      d = cfg.diffusion
      raise ConfigMismatch(
          f"the checkpoint's noise schedule '{name}' ({got.shape[0]} steps, {got[0]:.6g} .. {got[-1]:.6g}) is not "
          f"the config's (diffusion: {d.beta_schedule}, num_timesteps={d.num_timesteps}, linear_start="
          f"{d.linear_start}, linear_end={d.linear_end} -> {want[0]:.6g} .. {want[-1]:.6g})")
  if "scale_factor" in sd:
    got = float(np.asarray(to_numpy(sd["scale_factor"])).reshape(()))
    if not math.isclose(got, float(cfg.diffusion.scale_factor), rel_tol=1e-5):
      raise ConfigMismatch(f"the checkpoint's scale_factor is {got}, the config's diffusion.scale_factor is "
                           f"{cfg.diffusion.scale_factor}")


# ----------------------------------------------------------------------------- importers

def _leftover_error(keys, what: str):
  keys = sorted(keys)
  shown = ", ".join(keys[:12]) + (f" ... ({len(keys)} in all)" if len(keys) > 12 else "")
  raise ConversionError(f"keys of {what} not used by the conversion: {shown}")


def _max_diff(a, b) -> float:
  import jax
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) if np.size(x) else 0.0 for x, y in zip(la, lb))


def import_ehrxdiff(state_dict: Mapping[str, Any], cfg=None, *, ema: bool = True,
                    vae_mismatch: str = "error") -> ImportedWeights:
  """An EHRXDiff Lightning state dict -> ImportedWeights(params, ema_params, info).

  cfg: the config the weights must match (architecture fields, noise schedule, scale factor); None
    checks the weights against the networks their own shapes describe.
  ema: also convert the LitEma UNet (model_ema.*) when present.
  vae_mismatch: 'error' | 'warn' when cond_stage_model.autoencoder differs from first_stage_model.
  """
  from ehrxdiff_jax.interop.clip import convert_reference_conditioner
  from ehrxdiff_jax.interop.unet import convert_ldm_unet, convert_ldm_unet_ema
  from ehrxdiff_jax.interop.vae import convert_ldm_vae
  sd = dict(state_dict)
  info: dict = {"keys": len(sd)}
  known_prefixes = tuple(_PREFIXES.values())
  top_level = set(SCHEDULE_BUFFERS) | set(_OPTIONAL_BUFFERS)
  stray = [k for k in sd if not k.startswith(known_prefixes) and k not in top_level]
  if stray:
    _leftover_error(stray, "the EHRXDiff checkpoint (outside model., model_ema., first_stage_model., "
                    "cond_stage_model. and the schedule buffers)")
  missing = [p for p in ("unet", "vae", "conditioner") if not any(k.startswith(_PREFIXES[p]) for k in sd)]
  if missing:
    raise ConversionError(f"the checkpoint has no {', '.join(_PREFIXES[p] + '*' for p in missing)} keys: "
                          f"not an EHRXDiff LatentDiffusion state dict (first keys: {list(sd)[:5]})")
  model_other = [k for k in sd if k.startswith("model.") and not k.startswith(_PREFIXES["unet"])]
  if model_other:
    _leftover_error(model_other, "the EHRXDiff checkpoint under model. (outside model.diffusion_model.)")

  _check_schedule(sd, cfg, info)
  # Each part is converted and checked against the network its own shapes describe; then the architecture
  # is compared with the config field by field (a readable ConfigMismatch), then every shape.
  params = {
      "unet": convert_ldm_unet(sd, _PREFIXES["unet"]),
      "vae": convert_ldm_vae(sd, _PREFIXES["vae"]),
  }
  cond_sd = {k: v for k, v in sd.items() if k.startswith(_PREFIXES["conditioner"])}
  params["conditioner"] = convert_reference_conditioner(cond_sd, _PREFIXES["conditioner"])
  if any(k.startswith(_COND_VAE) for k in sd):
    cond_vae = convert_ldm_vae(sd, _COND_VAE)
    try:
      diff = _max_diff(cond_vae, params["vae"]) if _tree_shapes(cond_vae) == _tree_shapes(params["vae"]) else math.inf
    except ValueError:
      diff = math.inf
    info["cond_autoencoder_max_abs_diff"] = diff
    if diff > 0:
      msg = (f"cond_stage_model.autoencoder.* (the conditioner's frozen VAE) differs from first_stage_model.* "
             f"(max |diff| {diff:.3g}); this implementation has one VAE and would use first_stage_model's for "
             "both encoding I_prev and decoding")
      if vae_mismatch == "error":
        raise ConversionError(msg + "; pass vae_mismatch='warn' to accept that")
      log.warning(msg)

  ema_keys = [k for k in sd if k.startswith(_PREFIXES["ema"])]
  ema_params = None
  if ema_keys:
    book = {k for k in ema_keys if k in ("model_ema.decay", "model_ema.num_updates")}
    for k in sorted(book):
      info[k.split(".", 1)[1]] = float(np.asarray(to_numpy(sd[k])).reshape(()))
    other = [k for k in ema_keys if k not in book and not k.startswith("model_ema.diffusion_model")]
    if other:
      _leftover_error(other, "the EHRXDiff checkpoint under model_ema.")
    if ema and any(k.startswith("model_ema.diffusion_model") for k in ema_keys):
      ema_params = {"unet": convert_ldm_unet_ema(sd, _PREFIXES["ema"])}
  info["has_ema"] = ema_params is not None

  if cfg is not None:
    check_fields(params, cfg)
    expected = expected_ldm_params(cfg)
    params = check_against(params, expected)
    if ema_params is not None:
      ema_params = {"unet": check_against(ema_params["unet"], expected["unet"])}
  info["fields"] = {k: list(v) if isinstance(v, tuple) else v for k, v in infer_model_fields(params).items()}
  return ImportedWeights(params=params, ema_params=ema_params, info=info)


def _tree_shapes(tree):
  import jax
  return jax.tree.map(lambda a: tuple(np.shape(a)), tree)


def _detect_vae_prefix(sd: Mapping[str, Any]) -> str:
  for p in ("first_stage_model.", "model.", "vae.", ""):
    if any(k.startswith(p + "encoder.conv_in.") for k in sd):
      return p
  raise ConversionError(f"no autoencoder keys (encoder.conv_in.weight under '', 'first_stage_model.', 'model.' "
                        f"or 'vae.') in the state dict; first keys: {list(sd)[:5]}")


def import_cheff_vae(state_dict: Mapping[str, Any], cfg=None, prefix: str | None = None) -> ImportedWeights:
  """A Cheff autoencoder (.pt: encoder.*, decoder.*, quant_conv, post_quant_conv; loss.* skipped) -> {'vae'}.

  prefix: None detects '', 'first_stage_model.', 'model.' or 'vae.'. Keys outside the prefix are an error."""
  from ehrxdiff_jax.interop.vae import convert_ldm_vae
  sd = dict(state_dict)
  prefix = _detect_vae_prefix(sd) if prefix is None else prefix
  outside = [k for k in sd if not k.startswith(prefix)]
  if outside:
    _leftover_error(outside, f"the autoencoder checkpoint (outside {prefix!r})")
  vae = convert_ldm_vae(sd, prefix)
  params = {"vae": vae}
  if cfg is not None:
    check_fields(params, cfg, "the autoencoder checkpoint")
    params = {"vae": check_against(vae, expected_ldm_params(cfg)["vae"])}
  return ImportedWeights(params=params, info={"keys": len(sd), "prefix": prefix})


def import_clip(state_dict: Mapping[str, Any], cfg=None, prefix: str = "model.") -> ImportedWeights:
  """The EHRXDiff CLIP-pretraining checkpoint -> {'image_tower' (with ln_post), 'table_tower', 'logit_scale'}:
  the CLIP trainer's parameter layout (`train.clip.load_clip_towers` reads it back)."""
  from ehrxdiff_jax.interop.clip import convert_reference_clip
  sd = dict(state_dict)
  outside = [k for k in sd if not k.startswith(prefix)]
  if outside:
    _leftover_error(outside, f"the CLIP checkpoint (outside {prefix!r})")
  params = convert_reference_clip(sd, prefix)
  if cfg is not None:
    check_fields(None, cfg, "the CLIP checkpoint", fields=_tower_fields(params))
  return ImportedWeights(params=params, info={"keys": len(sd), "logit_scale": float(params["logit_scale"])})


def detect_kind(state_dict: Mapping[str, Any]) -> str:
  keys = list(state_dict)
  if any(k.startswith("model.diffusion_model.") for k in keys):
    return "ehrxdiff"
  if any(k.startswith("model.visual.") for k in keys):
    return "clip"
  return "cheff-vae"


def load_torch_weights(path: str, kind: str | None = None, cfg=None, **kwargs) -> ImportedWeights:
  """Reads a PyTorch checkpoint file (torch.load(weights_only=True); never pickle) and imports it.

  kind: 'ehrxdiff' | 'cheff-vae' | 'clip' | None (detected from the key names)."""
  sd = load_state_dict(path)
  kind = kind or detect_kind(sd)
  if kind == "ehrxdiff":
    out = import_ehrxdiff(sd, cfg, **kwargs)
  elif kind == "cheff-vae":
    out = import_cheff_vae(sd, cfg, **kwargs)
  elif kind == "clip":
    out = import_clip(sd, cfg, **kwargs)
  else:
    raise ValueError(f"unknown checkpoint kind {kind!r}; one of {KINDS}")
  out.info.update(kind=kind, source=str(path))
  return out


# ----------------------------------------------------------------------------- export (the inverse)

def _t_conv(k):  # (kh, kw, in, out) -> (out, in, kh, kw)
  return np.ascontiguousarray(np.asarray(k, np.float32).transpose(3, 2, 0, 1))


def _t_lin(k):  # (in, out) -> (out, in)
  return np.ascontiguousarray(np.asarray(k, np.float32).T)


def _put_norm(out, key, p):
  out[f"{key}.weight"] = np.asarray(p["scale"], np.float32)
  out[f"{key}.bias"] = np.asarray(p["bias"], np.float32)


def _put_linear(out, key, p):
  out[f"{key}.weight"] = _t_lin(p["kernel"])
  if "bias" in p:
    out[f"{key}.bias"] = np.asarray(p["bias"], np.float32)


def _put_conv(out, key, p):
  out[f"{key}.weight"] = _t_conv(p["kernel"])
  if "bias" in p:
    out[f"{key}.bias"] = np.asarray(p["bias"], np.float32)


def export_ldm_unet(unet: Mapping[str, Any], unet_cfg: Mapping[str, Any]) -> dict:
  """Our UNet tree -> LDM `openaimodel.UNetModel` names (no prefix); 1x1 proj_in/out as Conv2d."""
  from ehrxdiff_jax.interop.unet import ldm_plan
  levels = len(unet_cfg["channel_mult"])
  structure = (levels, int(unet_cfg["num_res_blocks"]), tuple(unet_cfg["attention_levels"]),
               int(unet_cfg["transformer_depth"]))
  out: dict = {}
  for path, key, kind, optional in ldm_plan(structure):
    node = unet
    try:
      for p in path:
        node = node[p]
    except KeyError:
      if optional:
        continue
      raise
    if kind in ("conv", "conv1x1"):
      k = np.asarray(node["kernel"])
      if kind == "conv1x1" and k.ndim == 2:
        k = k[None, None]
      _put_conv(out, key, {**node, "kernel": k})
    elif kind in ("linear", "linear_nobias"):
      _put_linear(out, key, node)
    else:
      _put_norm(out, key, node)
  return out


def export_ldm_vae(vae: Mapping[str, Any]) -> dict:
  """Our AutoencoderKL tree -> CompVis LDM / Cheff names (no prefix)."""
  out: dict = {}

  def resnet(key, p):
    _put_norm(out, f"{key}.norm1", p["norm1"])
    _put_conv(out, f"{key}.conv1", p["conv1"])
    _put_norm(out, f"{key}.norm2", p["norm2"])
    _put_conv(out, f"{key}.conv2", p["conv2"])
    if "nin_shortcut" in p:
      _put_conv(out, f"{key}.nin_shortcut", p["nin_shortcut"])

  for part in ("encoder", "decoder"):
    t = vae[part]
    _put_conv(out, f"{part}.conv_in", t["conv_in"])
    resnet(f"{part}.mid.block_1", t["mid_block_1"])
    a = t["mid_attn_1"]
    _put_norm(out, f"{part}.mid.attn_1.norm", a["norm"])
    for n in ("q", "k", "v", "proj_out"):
      _put_conv(out, f"{part}.mid.attn_1.{n}", {"kernel": np.asarray(a[n]["kernel"])[None, None], "bias": a[n]["bias"]})
    resnet(f"{part}.mid.block_2", t["mid_block_2"])
    _put_norm(out, f"{part}.norm_out", t["norm_out"])
    _put_conv(out, f"{part}.conv_out", t["conv_out"])
    ours, resample = ("down", "downsample") if part == "encoder" else ("up", "upsample")
    for name, p in t.items():
      m = re.fullmatch(rf"{ours}_(\d+)_block_(\d+)", name)
      if m:
        resnet(f"{part}.{ours}.{m.group(1)}.block.{m.group(2)}", p)
      m = re.fullmatch(rf"{ours}_(\d+)_{resample}", name)
      if m:
        _put_conv(out, f"{part}.{ours}.{m.group(1)}.{resample}.conv", p)
  _put_conv(out, "quant_conv", vae["quant_conv"])
  _put_conv(out, "post_quant_conv", vae["post_quant_conv"])
  return out


def _put_mha(out, key, p):
  out[f"{key}.in_proj_weight"] = np.concatenate([_t_lin(p[n]["kernel"]) for n in "qkv"], axis=0)
  out[f"{key}.in_proj_bias"] = np.concatenate([np.asarray(p[n]["bias"], np.float32) for n in "qkv"], axis=0)
  _put_linear(out, f"{key}.out_proj", p["out"])


def _export_block(out: dict, key: str, params: Mapping[str, Any], table: Mapping[str, Any]) -> None:
  """One block into `out` by the import name table of interop/clip.py (StateDict.block's format), each
  converter replaced by its inverse; of alternative names the first (the current one) is written."""
  from ehrxdiff_jax.interop.clip import split_in_proj
  from ehrxdiff_jax.interop.common import StateDict
  inverse = {StateDict.norm: _put_norm, StateDict.linear: _put_linear, StateDict.conv: _put_conv,
             split_in_proj: _put_mha}
  for ours, entry in table.items():
    if isinstance(entry, Mapping):
      _export_block(out, key, params[ours], entry)
      continue
    convert, theirs = entry
    inverse[convert](out, f"{key}.{theirs if isinstance(theirs, str) else theirs[0]}", params[ours])


def _export_blocks(out: dict, tree: Mapping[str, Any], ours: str, theirs: str, table: Mapping[str, Any]) -> None:
  """Every `{ours}_{i}` sub-tree of `tree` as block `{theirs}.{i}`."""
  for name, p in tree.items():
    m = re.fullmatch(rf"{ours}_(\d+)", name)
    if m:
      _export_block(out, f"{theirs}.{m.group(1)}", p, table)


def export_table_tower(t: Mapping[str, Any]) -> dict:
  """TableTower -> the reference TabTransformerEmbedder names (transformer.layers.N.*, fc)."""
  from ehrxdiff_jax.interop.clip import TABLE_LAYER
  out: dict = {}
  _export_blocks(out, t, "layer", "transformer.layers", TABLE_LAYER)
  _put_linear(out, "fc", t["fc"])
  return out


def export_openai_visual(im: Mapping[str, Any], ln_post: bool = True) -> dict:
  """VisionTransformer -> OpenAI CLIP VisualTransformer names (conv1 without bias, no proj).

  ln_post=True writes `ln_post` (ones / zeros when our tree has none, as the reference conditioner's
  unused copy)."""
  from ehrxdiff_jax.interop.clip import OPENAI_BLOCK
  out: dict = {"conv1.weight": _t_conv(im["patch_embed"]["kernel"]),
               "class_embedding": np.asarray(im["class_embedding"], np.float32),
               "positional_embedding": np.asarray(im["positional_embedding"], np.float32)}
  _put_norm(out, "ln_pre", im["ln_pre"])
  _export_blocks(out, im, "blocks", "transformer.resblocks", OPENAI_BLOCK)
  if ln_post:
    width = out["class_embedding"].shape[-1]
    post = im.get("ln_post") or {"scale": np.ones(width, np.float32), "bias": np.zeros(width, np.float32)}
    _put_norm(out, "ln_post", post)
  return out


def export_reference_conditioner(cond: Mapping[str, Any]) -> dict:
  """Conditioner -> MultiModalTransformerAdaptor names (no prefix, without the autoencoder copy)."""
  out: dict = {}
  if "image_tower" in cond:
    out.update({f"clip_img_encoder.{k}": v for k, v in export_openai_visual(cond["image_tower"]).items()})
  if "table_tower" in cond:
    out.update({f"clip_tab_encoder.{k}": v for k, v in export_table_tower(cond["table_tower"]).items()})
  for ours, theirs in (("vae_proj", "vae_projector"), ("adapter", "adaptor"), ("projector", "projector")):
    if ours in cond:
      _put_linear(out, theirs, cond[ours])
  return out


def export_ehrxdiff_state_dict(params: Mapping[str, Any], ema_params: Mapping[str, Any] | None, cfg, *,
                               cond_autoencoder: bool = True, schedule: bool = True,
                               ema_decay: float | None = None, ema_num_updates: int = 0) -> dict:
  """{'unet', 'conditioner', 'vae'} (+ EMA {'unet'}) -> the EHRXDiff Lightning state dict (numpy float32
  arrays; torch.from_numpy them to save): model.diffusion_model.*, model_ema.diffusion_model* (dot-free) +
  model_ema.decay / model_ema.num_updates, first_stage_model.*, cond_stage_model.* (with the unused
  clip_img_encoder.ln_post and, with cond_autoencoder, the autoencoder copy), and the schedule buffers."""
  out: dict = {}
  unet = export_ldm_unet(params["unet"], cfg.model.unet)
  out.update({"model.diffusion_model." + k: v for k, v in unet.items()})
  if ema_params is not None and "unet" in ema_params:
    ema = export_ldm_unet(ema_params["unet"], cfg.model.unet)
    out.update({"model_ema." + ("diffusion_model." + k).replace(".", ""): v for k, v in ema.items()})
    decay = float(cfg.train.ema_decay if ema_decay is None else ema_decay)
    out["model_ema.decay"] = np.asarray(decay, np.float32)
    out["model_ema.num_updates"] = np.asarray(int(ema_num_updates), np.int32)
  vae = export_ldm_vae(params["vae"])
  out.update({"first_stage_model." + k: v for k, v in vae.items()})
  out.update({"cond_stage_model." + k: v for k, v in export_reference_conditioner(params["conditioner"]).items()})
  if cond_autoencoder:
    out.update({_COND_VAE + k: v.copy() for k, v in vae.items()})
  if schedule:
    out.update(reference_schedule_buffers(cfg.diffusion))
  return out
