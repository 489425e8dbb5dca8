"""Whole-checkpoint import and export of the published EHRXDiff PyTorch weights.

    import_ehrxdiff(sd, cfg)      EHRXDiff Lightning `.ckpt` (LatentDiffusion) -> ImportedWeights(
                                  params={'unet', 'conditioner', 'vae'}, ema_params={'unet'} | None)
    import_cheff_vae(sd, cfg)     Cheff autoencoder `.pt` -> {'vae'}
    import_clip(sd, cfg)          EHRXDiff CLIP-pretraining `.ckpt` -> {'image_tower',
                                  'table_tower', 'logit_scale'} (the CLIP trainer's layout)
    import_state_dict(sd, kind)   one of the three by kind; load_torch_weights(path, ...) reads the
                                  file first (torch.load(weights_only=True), never pickle)
    export_ehrxdiff_state_dict    the inverse (tests; feeding the PyTorch reference)

The parts are converted by interop/{unet,vae,clip}.py (each exporter beside its importer); this
module accounts for every key of the Lightning state dict:
  model.diffusion_model.*     the UNet; model_ema.diffusion_model* its LitEma copy (dot-free names);
                              model_ema.decay / num_updates: LitEma's bookkeeping (in info)
  first_stage_model.*         the KL autoencoder (its loss.* is skipped)
  cond_stage_model.*          the conditioner; cond_stage_model.autoencoder.* is its frozen VAE
                              copy, compared with first_stage_model (our model has one VAE)
  betas, alphas_cumprod, ...  the DDPM schedule buffers (SCHEDULE_BUFFERS), compared with
                              c.diffusion
  logvar, scale_factor        optional buffers (scale_factor is compared with the config)
Anything else, or a missing weight, is an error naming the torch keys. With a config, the
architecture read off the weights is compared with it field by field (`ConfigMismatch` names both
values), including the fields no weight shows: GroupNorm groups (the reference hard-codes 32) and
head counts (the reference's layout, or stated with `heads`): a wrong value there imported silently
and gave eps errors of order 1. Then every shape is checked.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Mapping, Union

import numpy as np

from ehrxdiff_jax.interop.common import ConversionError, check_against, load_state_dict, to_numpy

log = logging.getLogger(__name__)

__all__ = [
    "ConfigMismatch", "HEAD_FIELDS", "ImportedWeights", "KINDS", "SCHEDULE_BUFFERS",
    "check_fields", "detect_kind", "export_ehrxdiff_state_dict", "import_cheff_vae", "import_clip",
    "import_ehrxdiff", "import_state_dict", "infer_model_fields", "load_torch_weights",
    "unseen_fields",
]

KINDS = ("ehrxdiff", "cheff-vae", "clip")

# LDM `DDPM.register_schedule` persistent buffers (lvlb_weights is not persistent).
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2",
)
_OPTIONAL_BUFFERS = ("logvar", "scale_factor", "cond_ids")
_PREFIXES = {"unet": "model.diffusion_model.", "ema": "model_ema.", "vae": "first_stage_model.",
             "conditioner": "cond_stage_model."}
_COND_VAE = "cond_stage_model.autoencoder."

# Fields no weight shape shows, as the reference's code fixes them.
REFERENCE_NORM_GROUPS = 32  # GroupNorm(32): LDM's `normalization` and the autoencoder's `Normalize`
REFERENCE_UNET_HEADS = 8    # the EHRXDiff UNet config: 8 heads, head dim = channels / 8
HEAD_FIELDS = ("model.unet.num_heads", "model.image_tower.heads", "model.table_tower.heads")


class ConfigMismatch(ConversionError):
  """The checkpoint describes another architecture than the config (names fields and values)."""


@dataclasses.dataclass
class ImportedWeights:
  params: dict
  ema_params: dict | None = None
  info: dict = dataclasses.field(default_factory=dict)


# ---------------------------------------------------------------------------- config <-> shapes

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


def _prefixed(prefix: str, fields: Mapping[str, Any]) -> dict:
  return {f"{prefix}.{k}": _norm(v) for k, v in fields.items()}


def infer_model_fields(params: Mapping[str, Any]) -> dict:
  """Config fields (dotted names under the config root) that a converted LDM tree's shapes imply.

  Fields no shape shows (num_heads, norm_groups, dropout...) are left out: see `unseen_fields`."""
  from ehrxdiff_jax.interop.unet import infer_config as unet_fields
  from ehrxdiff_jax.interop.vae import infer_vae_fields
  out: dict = {}
  if "unet" in params:
    out.update(_prefixed("model.unet", {k: v for k, v in unet_fields(params["unet"]).items()
                                        if k not in ("num_heads", "norm_groups")}))
  vae_fields = None
  if "vae" in params:
    vae_fields = infer_vae_fields(params["vae"])
    out.update(_prefixed("model.vae", vae_fields))
  if "conditioner" in params:
    out.update(_conditioner_fields(params["conditioner"], vae_fields))
  return out


def _tower_fields(towers: Mapping[str, Any]) -> dict:
  from ehrxdiff_jax.interop.clip import infer_table_fields, infer_vit_fields
  out = {}
  if "table_tower" in towers:
    out.update(_prefixed("model.table_tower", infer_table_fields(towers["table_tower"])))
  if "image_tower" in towers:
    out.update(_prefixed("model.image_tower", infer_vit_fields(towers["image_tower"])))
  return out


def _conditioner_fields(cond: Mapping[str, Any], vae_fields: Mapping[str, Any] | None) -> dict:
  from ehrxdiff_jax.nn.conditioner import STREAMS
  from ehrxdiff_jax.nn.vae import downsample_factor
  out = _tower_fields(cond)
  present = {"table": "table_tower" in cond, "image": "image_tower" in cond,
             "vae": "vae_proj" in cond}
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
      out["data.image_size"] = side * downsample_factor(vae_fields["ch_mult"])
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
        grid = out["model.image_tower.image_size"] // out["model.image_tower.patch_size"]
        other += 1 + grid ** 2
      if "vae_proj" in cond:
        if vae_fields is None:
          other = None
        else:
          other += int(vae_fields["embed_dim"])
      if other is not None:
        out["model.conditioner.max_events"] = n_tokens - other
  return out


Heads = Union[str, Mapping[str, int], None]


def unseen_fields(fields: Mapping[str, Any], heads: Heads = None) -> dict:
  """{dotted field: (value, reason)} of the fields no weight shape shows, for the parts that the
  visible `fields` (infer_model_fields) describe: the GroupNorm groups are the reference's 32; the
  head counts are the reference's layout (UNet: 8 heads; towers: head dim 64) unless `heads` states
  the checkpoint's own ({dotted field: count}, or 'config': the config's). A width that the
  reference's layout cannot split gives value None: the caller has to state that head count."""
  out = {}
  for part in ("unet", "vae"):
    if f"model.{part}.ch_mult" in fields or f"model.{part}.channel_mult" in fields:
      out[f"model.{part}.norm_groups"] = (REFERENCE_NORM_GROUPS,
                                          "the reference hard-codes GroupNorm(32)")
  if heads == "config":
    return out
  stated = dict(heads or {})
  unknown = set(stated) - set(HEAD_FIELDS)
  if unknown:
    raise ValueError(f"heads: unknown fields {sorted(unknown)}; expected some of {HEAD_FIELDS}")
  layout = {}
  if "model.unet.model_channels" in fields:
    mc, mult = fields["model.unet.model_channels"], fields["model.unet.channel_mult"]
    widths = [mc * mult[level] for level in fields["model.unet.attention_levels"]]
    widths.append(mc * mult[-1])  # the middle block
    ok = all(w % REFERENCE_UNET_HEADS == 0 for w in widths)
    n = REFERENCE_UNET_HEADS
    layout["model.unet.num_heads"] = (n if ok else None, f"the reference's UNet has {n} heads "
                                      f"(head dim = channels / {n}; attention widths {widths})")
  from ehrxdiff_jax.interop.clip import REFERENCE_HEAD_DIM
  for name, width_field in (("model.image_tower.heads", "model.image_tower.width"),
                            ("model.table_tower.heads", "model.table_tower.event_dim")):
    if width_field in fields:
      width, dim = fields[width_field], REFERENCE_HEAD_DIM
      layout[name] = (width // dim if width % dim == 0 else None, f"the reference's towers have "
                      f"head dim {dim} ({width_field.split('.')[-1]} {width})")
  for name, (value, reason) in layout.items():
    out[name] = (stated[name], "stated by the caller") if name in stated else (value, reason)
  return out


def check_fields(params: Mapping[str, Any] | None, cfg, what: str = "the checkpoint",
                 fields: Mapping[str, Any] | None = None, heads: Heads = None) -> None:
  """Raises ConfigMismatch listing every config field whose value differs from what `params` implies
  (or from `fields`, {dotted config name: value}, when given), the fields no weight shows included
  (`unseen_fields`; `heads` as there)."""
  fields = infer_model_fields(params) if fields is None else fields
  problems = []
  for name, value in fields.items():
    try:
      want = _norm(_field_of(cfg, name))
    except (KeyError, AttributeError):
      continue
    if name == "model.conditioner.cross_attention":
      from ehrxdiff_jax.nn.conditioner import STREAMS
      want = tuple(s for s in STREAMS if s in want)
    if want != value:
      problems.append(f"{name}: {what} has {value!r}, the config has {want!r}")
  for name, (value, reason) in unseen_fields(fields, heads).items():
    want = _norm(_field_of(cfg, name))
    unseen = f"{name}: the weights do not show it and {reason}"
    if value is None:
      problems.append(f"{unseen} cannot give it; state the checkpoint's head count (heads="
                      f"{{{name!r}: N}}, or heads='config' for the config's {want!r})")
    elif want != value:
      hint = ("" if name not in HEAD_FIELDS else f"; if the checkpoint was trained with {want!r}, "
              f"say so (heads='config' or heads={{{name!r}: {want!r}}})")
      problems.append(f"{unseen}: {value!r}, the config has {want!r}{hint}")
  if problems:
    raise ConfigMismatch(f"{what} does not match the config ({len(problems)} fields): "
                         + "; ".join(problems))


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
  """Unboxed ShapeDtypeStructs of the config's {'unet', 'conditioner', 'vae'} (none allocated)."""
  return _expected_ldm_cached(cfg.to_json_best_effort(sort_keys=True))


# ---------------------------------------------------------------------------- schedule buffers

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
      betas=betas, alphas_cumprod=acp, alphas_cumprod_prev=acp_prev,
      sqrt_alphas_cumprod=np.sqrt(acp), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - acp),
      log_one_minus_alphas_cumprod=np.log(1.0 - acp), sqrt_recip_alphas_cumprod=np.sqrt(1.0 / acp),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / acp - 1), posterior_variance=post_var,
      posterior_log_variance_clipped=np.log(np.maximum(post_var, 1e-20)),
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
          f"the checkpoint's noise schedule '{name}' ({got.shape[0]} steps, {got[0]:.6g} .. "
          f"{got[-1]:.6g}) is not the config's (diffusion: {d.beta_schedule}, num_timesteps="
          f"{d.num_timesteps}, linear_start={d.linear_start}, linear_end={d.linear_end} -> "
          f"{want[0]:.6g} .. {want[-1]:.6g})")
  if "scale_factor" in sd:
    got = float(np.asarray(to_numpy(sd["scale_factor"])).reshape(()))
    if not math.isclose(got, float(cfg.diffusion.scale_factor), rel_tol=1e-5):
      raise ConfigMismatch(f"the checkpoint's scale_factor is {got}, the config's "
                           f"diffusion.scale_factor is {cfg.diffusion.scale_factor}")


# ---------------------------------------------------------------------------- importers

def _leftover_error(keys, what: str):
  keys = sorted(keys)
  shown = ", ".join(keys[:12]) + (f" ... ({len(keys)} in all)" if len(keys) > 12 else "")
  raise ConversionError(f"keys of {what} not used by the conversion: {shown}")


def _max_diff(a, b) -> float:
  import jax
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) if np.size(x) else 0.0
             for x, y in zip(la, lb))


def import_ehrxdiff(state_dict: Mapping[str, Any], cfg=None, *, ema: bool = True,
                    vae_mismatch: str = "error", heads: Heads = None) -> ImportedWeights:
  """An EHRXDiff Lightning state dict -> ImportedWeights(params, ema_params, info).

  cfg: the config the weights must match (architecture fields, noise schedule, scale factor); None
    checks the weights against the networks their own shapes describe.
  ema: also convert the LitEma UNet (model_ema.*) when present.
  vae_mismatch: 'error' | 'warn' when cond_stage_model.autoencoder differs from first_stage_model.
  heads: the checkpoint's head counts when they are not the reference's layout (`unseen_fields`).
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
    _leftover_error(stray, "the EHRXDiff checkpoint (outside model., model_ema., "
                    "first_stage_model., cond_stage_model. and the schedule buffers)")
  missing = [p for p in ("unet", "vae", "conditioner")
             if not any(k.startswith(_PREFIXES[p]) for k in sd)]
  if missing:
    absent = ", ".join(_PREFIXES[p] + "*" for p in missing)
    raise ConversionError(f"the checkpoint has no {absent} keys: not an EHRXDiff LatentDiffusion "
                          f"state dict (first keys: {list(sd)[:5]})")
  model_other = [k for k in sd if k.startswith("model.") and not k.startswith(_PREFIXES["unet"])]
  if model_other:
    _leftover_error(model_other, "the EHRXDiff checkpoint under model. (outside "
                    "model.diffusion_model.)")

  _check_schedule(sd, cfg, info)
  # Each part is converted and checked against the network its own shapes describe; then the
  # architecture is compared with the config field by field (a readable ConfigMismatch), then every
  # shape.
  params = {
      "unet": convert_ldm_unet(sd, _PREFIXES["unet"]),
      "vae": convert_ldm_vae(sd, _PREFIXES["vae"]),
  }
  cond_sd = {k: v for k, v in sd.items() if k.startswith(_PREFIXES["conditioner"])}
  params["conditioner"] = convert_reference_conditioner(cond_sd, _PREFIXES["conditioner"])
  if any(k.startswith(_COND_VAE) for k in sd):
    cond_vae = convert_ldm_vae(sd, _COND_VAE)
    same_shapes = _tree_shapes(cond_vae) == _tree_shapes(params["vae"])
    try:
      diff = _max_diff(cond_vae, params["vae"]) if same_shapes else math.inf
    except ValueError:
      diff = math.inf
    info["cond_autoencoder_max_abs_diff"] = diff
    if diff > 0:
      msg = (f"cond_stage_model.autoencoder.* (the conditioner's frozen VAE) differs from "
             f"first_stage_model.* (max |diff| {diff:.3g}); this implementation has one VAE and "
             "would use first_stage_model's for both encoding I_prev and decoding")
      if vae_mismatch == "error":
        raise ConversionError(msg + "; pass vae_mismatch='warn' to accept that")
      log.warning(msg)

  ema_keys = [k for k in sd if k.startswith(_PREFIXES["ema"])]
  ema_params = None
  if ema_keys:
    book = {k for k in ema_keys if k in ("model_ema.decay", "model_ema.num_updates")}
    for k in sorted(book):
      info[k.split(".", 1)[1]] = float(np.asarray(to_numpy(sd[k])).reshape(()))
    other = [k for k in ema_keys
             if k not in book and not k.startswith("model_ema.diffusion_model")]
    if other:
      _leftover_error(other, "the EHRXDiff checkpoint under model_ema.")
    if ema and any(k.startswith("model_ema.diffusion_model") for k in ema_keys):
      ema_params = {"unet": convert_ldm_unet_ema(sd, _PREFIXES["ema"])}
  info["has_ema"] = ema_params is not None

  if cfg is not None:
    check_fields(params, cfg, heads=heads)
    expected = expected_ldm_params(cfg)
    params = check_against(params, expected)
    if ema_params is not None:
      ema_params = {"unet": check_against(ema_params["unet"], expected["unet"])}
  info["fields"] = {k: list(v) if isinstance(v, tuple) else v
                    for k, v in infer_model_fields(params).items()}
  return ImportedWeights(params=params, ema_params=ema_params, info=info)


def _tree_shapes(tree):
  import jax
  return jax.tree.map(lambda a: tuple(np.shape(a)), tree)


def _detect_vae_prefix(sd: Mapping[str, Any]) -> str:
  for p in ("first_stage_model.", "model.", "vae.", ""):
    if any(k.startswith(p + "encoder.conv_in.") for k in sd):
      return p
  raise ConversionError(f"no autoencoder keys (encoder.conv_in.weight under '', "
                        f"'first_stage_model.', 'model.' or 'vae.') in the state dict; first keys: "
                        f"{list(sd)[:5]}")


def import_cheff_vae(state_dict: Mapping[str, Any], cfg=None,
                     prefix: str | None = None) -> ImportedWeights:
  """A Cheff autoencoder (.pt: encoder.*, decoder.*, quant_conv, post_quant_conv; loss.* skipped)
  -> {'vae'}. prefix: None detects '', 'first_stage_model.', 'model.' or 'vae.'; keys outside it
  are an error."""
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


def import_clip(state_dict: Mapping[str, Any], cfg=None, prefix: str = "model.",
                heads: Heads = None) -> ImportedWeights:
  """The EHRXDiff CLIP-pretraining checkpoint -> {'image_tower' (with ln_post), 'table_tower',
  'logit_scale'}: the CLIP trainer's layout (`train.clip.load_clip_towers` reads it back). heads: as
  import_ehrxdiff."""
  from ehrxdiff_jax.interop.clip import convert_reference_clip
  sd = dict(state_dict)
  outside = [k for k in sd if not k.startswith(prefix)]
  if outside:
    _leftover_error(outside, f"the CLIP checkpoint (outside {prefix!r})")
  params = convert_reference_clip(sd, prefix)
  if cfg is not None:
    check_fields(None, cfg, "the CLIP checkpoint", fields=_tower_fields(params), heads=heads)
  info = {"keys": len(sd), "logit_scale": float(params["logit_scale"])}
  return ImportedWeights(params=params, info=info)


def detect_kind(state_dict: Mapping[str, Any]) -> str:
  keys = list(state_dict)
  if any(k.startswith("model.diffusion_model.") for k in keys):
    return "ehrxdiff"
  if any(k.startswith("model.visual.") for k in keys):
    return "clip"
  return "cheff-vae"


def import_state_dict(sd: Mapping[str, Any], kind: str | None = None, cfg=None,
                      **kwargs) -> ImportedWeights:
  """The importer of `kind`: 'ehrxdiff' | 'cheff-vae' | 'clip' | None (detected from the names)."""
  kind = kind or detect_kind(sd)
  importers = {"ehrxdiff": import_ehrxdiff, "cheff-vae": import_cheff_vae, "clip": import_clip}
  if kind not in importers:
    raise ValueError(f"unknown checkpoint kind {kind!r}; one of {KINDS}")
  out = importers[kind](sd, cfg, **kwargs)
  out.info["kind"] = kind
  return out


def load_torch_weights(path: str, kind: str | None = None, cfg=None,
                       **kwargs) -> ImportedWeights:
  """Reads a PyTorch checkpoint (torch.load(weights_only=True); never pickle) and imports it."""
  out = import_state_dict(load_state_dict(path), kind, cfg, **kwargs)
  out.info["source"] = str(path)
  return out


# ---------------------------------------------------------------------------- export (the inverse)

def export_ehrxdiff_state_dict(params: Mapping[str, Any], ema_params: Mapping[str, Any] | None, cfg,
                               *, cond_autoencoder: bool = True, schedule: bool = True,
                               ema_decay: float | None = None, ema_num_updates: int = 0) -> dict:
  """{'unet', 'conditioner', 'vae'} (+ EMA {'unet'}) -> the EHRXDiff Lightning state dict (numpy
  float32; torch.from_numpy them to save): model.diffusion_model.*, model_ema.diffusion_model*
  (dot-free) + model_ema.decay / num_updates, first_stage_model.*, cond_stage_model.* (with the
  unused clip_img_encoder.ln_post and, with cond_autoencoder, the autoencoder copy), and the
  schedule buffers."""
  from ehrxdiff_jax.interop.clip import export_reference_conditioner
  from ehrxdiff_jax.interop.unet import export_ldm_unet
  from ehrxdiff_jax.interop.vae import export_ldm_vae
  out: dict = {}
  unet = export_ldm_unet(params["unet"], cfg.model.unet)
  out.update({"model.diffusion_model." + k: v for k, v in unet.items()})
  if ema_params is not None and "unet" in ema_params:
    ema = export_ldm_unet(ema_params["unet"], cfg.model.unet)
    out.update({"model_ema." + ("diffusion_model." + k).replace(".", ""): v
                for k, v in ema.items()})
    decay = float(cfg.train.ema_decay if ema_decay is None else ema_decay)
    out["model_ema.decay"] = np.asarray(decay, np.float32)
    out["model_ema.num_updates"] = np.asarray(int(ema_num_updates), np.int32)
  vae = export_ldm_vae(params["vae"])
  out.update({"first_stage_model." + k: v for k, v in vae.items()})
  cond = export_reference_conditioner(params["conditioner"])
  out.update({"cond_stage_model." + k: v for k, v in cond.items()})
  if cond_autoencoder:
    out.update({_COND_VAE + k: v.copy() for k, v in vae.items()})
  if schedule:
    out.update(reference_schedule_buffers(cfg.diffusion))
  return out
