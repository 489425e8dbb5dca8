"""Weight import and export for the LDM UNet (`ehrxdiff_jax.nn.unet.UNet`).

  convert_ldm_unet       CompVis / Cheff / EHRXDiff `openaimodel.UNetModel` names
                         ('model.diffusion_model.input_blocks.1.0.in_layers.0.weight')
  convert_ldm_unet_ema   its LitEma copy: the same names without dots after 'model_ema.'
                         ('model_ema.diffusion_modelinput_blocks10in_layers0weight')
  convert_diffusers_unet diffusers `UNet2DConditionModel` names ('down_blocks.1.resnets.0.conv1')
  export_ldm_unet        the inverse of convert_ldm_unet

A plan (`ldm_plan`, `diffusers_plan`) lists (our path, torch module, kind) for the block structure
read off the key names; a kind (`_KINDS`) says how an entry is read and written, so import and
export walk the same plan. Each converter returns the unboxed tree (float32 numpy, no 'params'
level), checked against the shapes of `UNet(**config)` (`config`: cfg.model.unet; inferred from the
weights when None): a missing, extra or mis-shaped weight raises `ConversionError` naming the key.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Iterator, Mapping

from ehrxdiff_jax.interop.common import (ConversionError, StateDict, check_against, put_conv,
                                         put_conv1x1, put_linear, put_norm)

# (levels, num_res_blocks, attention_levels, transformer depth)
Structure = tuple[int, int, tuple[int, ...], int]
PlanEntry = tuple[tuple[str, ...], str, str, bool]  # (our path, torch module key, kind, optional)

_UNET_FIELDS = ("in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
                "attention_levels", "num_heads", "transformer_depth", "context_dim", "norm_groups")


def _take_conv1x1(sd: StateDict, key: str) -> dict:
  """A 1x1 conv, or a Linear (diffusers' use_linear_projection) -> (1, 1, in, out)."""
  if sd.take(f"{key}.weight").ndim == 2:
    leaf = sd.linear(key)
    leaf["kernel"] = sd._tagged(leaf["kernel"][None, None], f"{key}.weight")
    return leaf
  return sd.conv(key)  # a wrong kernel size is reported by check_against


@dataclasses.dataclass(frozen=True)
class _Kind:
  """How an entry of one kind is read (`take(sd, key)`) and written (`put(out, key, params)`)."""
  take: Callable[[StateDict, str], dict]
  put: Callable[[dict, str, Mapping[str, Any]], None]
  suffixes: tuple[str, ...] = ("weight", "bias")


_KINDS = {
    "conv": _Kind(StateDict.conv, put_conv),
    "conv1x1": _Kind(_take_conv1x1, put_conv1x1),  # LDM writes 1x1 Conv2d
    "linear": _Kind(StateDict.linear, put_linear),
    "linear_nobias": _Kind(lambda sd, key: sd.linear(key, bias=False), put_linear, ("weight",)),
    "norm": _Kind(StateDict.norm, put_norm),
}


# ----------------------------------------------------------------------------- block plans

def _res_plan(path, key, names) -> Iterator[PlanEntry]:
  norm1, conv1, emb, norm2, conv2, skip = names
  yield path + ("norm1",), f"{key}.{norm1}", "norm", False
  yield path + ("conv1",), f"{key}.{conv1}", "conv", False
  yield path + ("emb_proj",), f"{key}.{emb}", "linear", False
  yield path + ("norm2",), f"{key}.{norm2}", "norm", False
  yield path + ("conv2",), f"{key}.{conv2}", "conv", False
  yield path + ("skip",), f"{key}.{skip}", "conv", True  # only when the width changes


_LDM_RES = ("in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3",
            "skip_connection")
_DIFFUSERS_RES = ("norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut")


def _transformer_plan(path, key, depth) -> Iterator[PlanEntry]:
  """SpatialTransformer / Transformer2DModel: the same names in LDM and diffusers."""
  yield path + ("norm",), f"{key}.norm", "norm", False
  yield path + ("proj_in",), f"{key}.proj_in", "conv1x1", False
  for d in range(depth):
    b, tb = path + (f"block_{d}",), f"{key}.transformer_blocks.{d}"
    for attn in ("attn1", "attn2"):
      for ours, theirs in (("q", "to_q"), ("k", "to_k"), ("v", "to_v")):
        yield b + (attn, ours), f"{tb}.{attn}.{theirs}", "linear_nobias", False
      yield b + (attn, "out"), f"{tb}.{attn}.to_out.0", "linear", False
    for n in ("norm1", "norm2", "norm3"):
      yield b + (n,), f"{tb}.{n}", "norm", False
    yield b + ("ff_in",), f"{tb}.ff.net.0.proj", "linear", False
    yield b + ("ff_out",), f"{tb}.ff.net.2", "linear", False
  yield path + ("proj_out",), f"{key}.proj_out", "conv1x1", False


def ldm_plan(structure: Structure) -> list[PlanEntry]:
  """Our parameter paths against LDM `openaimodel.UNetModel` module names (without the prefix)."""
  levels, nrb, attn, depth = structure
  plan = [(("time_embed_0",), "time_embed.0", "linear", False),
          (("time_embed_1",), "time_embed.2", "linear", False),
          (("conv_in",), "input_blocks.0.0", "conv", False)]
  n = 1
  for level in range(levels):
    for i in range(nrb):
      plan += _res_plan((f"down_{level}_res_{i}",), f"input_blocks.{n}.0", _LDM_RES)
      if level in attn:
        plan += _transformer_plan((f"down_{level}_attn_{i}",), f"input_blocks.{n}.1", depth)
      n += 1
    if level != levels - 1:
      plan.append(((f"down_{level}_downsample", "conv"), f"input_blocks.{n}.0.op", "conv", False))
      n += 1
  plan += _res_plan(("mid_res_0",), "middle_block.0", _LDM_RES)
  plan += _transformer_plan(("mid_attn",), "middle_block.1", depth)
  plan += _res_plan(("mid_res_1",), "middle_block.2", _LDM_RES)
  m = 0
  for level in reversed(range(levels)):
    for i in range(nrb + 1):
      plan += _res_plan((f"up_{level}_res_{i}",), f"output_blocks.{m}.0", _LDM_RES)
      if level in attn:
        plan += _transformer_plan((f"up_{level}_attn_{i}",), f"output_blocks.{m}.1", depth)
      if level != 0 and i == nrb:
        k = 2 if level in attn else 1
        plan.append(((f"up_{level}_upsample", "conv"), f"output_blocks.{m}.{k}.conv", "conv",
                     False))
      m += 1
  plan += [(("norm_out",), "out.0", "norm", False), (("conv_out",), "out.2", "conv", False)]
  return plan


def diffusers_plan(structure: Structure) -> list[PlanEntry]:
  """Our parameter paths against diffusers `UNet2DConditionModel` module names."""
  levels, nrb, attn, depth = structure
  plan = [(("time_embed_0",), "time_embedding.linear_1", "linear", False),
          (("time_embed_1",), "time_embedding.linear_2", "linear", False),
          (("conv_in",), "conv_in", "conv", False)]
  for level in range(levels):
    for i in range(nrb):
      block = f"down_blocks.{level}"
      plan += _res_plan((f"down_{level}_res_{i}",), f"{block}.resnets.{i}", _DIFFUSERS_RES)
      if level in attn:
        plan += _transformer_plan((f"down_{level}_attn_{i}",), f"{block}.attentions.{i}", depth)
    if level != levels - 1:
      plan.append(((f"down_{level}_downsample", "conv"), f"down_blocks.{level}.downsamplers.0.conv",
                   "conv", False))
  plan += _res_plan(("mid_res_0",), "mid_block.resnets.0", _DIFFUSERS_RES)
  plan += _transformer_plan(("mid_attn",), "mid_block.attentions.0", depth)
  plan += _res_plan(("mid_res_1",), "mid_block.resnets.1", _DIFFUSERS_RES)
  for j, level in enumerate(reversed(range(levels))):
    for i in range(nrb + 1):
      plan += _res_plan((f"up_{level}_res_{i}",), f"up_blocks.{j}.resnets.{i}", _DIFFUSERS_RES)
      if level in attn:
        plan += _transformer_plan((f"up_{level}_attn_{i}",), f"up_blocks.{j}.attentions.{i}", depth)
    if level != 0:
      plan.append(((f"up_{level}_upsample", "conv"), f"up_blocks.{j}.upsamplers.0.conv", "conv",
                   False))
  plan += [(("norm_out",), "conv_norm_out", "norm", False),
           (("conv_out",), "conv_out", "conv", False)]
  return plan


def plan_keys(plan: list[PlanEntry]) -> list[str]:
  """Every PyTorch parameter name a plan can consume (optional ones included)."""
  return [f"{key}.{s}" for _, key, kind, _ in plan for s in _KINDS[kind].suffixes]


# ----------------------------------------------------------------------------- structure from names

def _count(has: Callable[[str], bool], fmt: str) -> int:
  n = 0
  while has(fmt.format(n)):
    n += 1
  return n


def _ldm_structure(has: Callable[[str], bool]) -> Structure:
  """Reads (levels, res blocks per level, attention levels, depth) off LDM module names."""
  level, per_level, attn = 0, [0], set()
  n = 1
  while True:
    if has(f"input_blocks.{n}.0.op.weight"):
      level += 1
      per_level.append(0)
    elif has(f"input_blocks.{n}.0.in_layers.0.weight"):
      per_level[level] += 1
      if has(f"input_blocks.{n}.1.norm.weight"):
        attn.add(level)
    else:
      break
    n += 1
  depth = _count(has, "middle_block.1.transformer_blocks.{}.norm1.weight")
  if n == 1 or not has("time_embed.0.weight"):
    raise ConversionError("the state dict has no LDM UNet (no time_embed.0 / input_blocks.1.0 "
                          "keys)")
  return _checked_structure(per_level, attn, depth)


def _diffusers_structure(has: Callable[[str], bool]) -> Structure:
  levels = _count(has, "down_blocks.{}.resnets.0.norm1.weight")
  if not levels:
    raise ConversionError("the state dict has no diffusers UNet (no down_blocks.0.resnets.0 keys)")
  per_level = [_count(has, f"down_blocks.{level}.resnets.{{}}.norm1.weight")
               for level in range(levels)]
  attn = {level for level in range(levels) if has(f"down_blocks.{level}.attentions.0.norm.weight")}
  depth = _count(has, "mid_block.attentions.0.transformer_blocks.{}.norm1.weight")
  return _checked_structure(per_level, attn, depth)


def _checked_structure(per_level, attn, depth) -> Structure:
  if len(set(per_level)) != 1:
    raise ConversionError(f"unequal numbers of res blocks per level in the state dict: {per_level}")
  if depth == 0:
    raise ConversionError("the state dict has no middle-block spatial transformer")
  return len(per_level), per_level[0], tuple(sorted(attn)), depth


# ----------------------------------------------------------------------------- running a plan

def _run_plan(sd: StateDict, plan: list[PlanEntry]) -> dict:
  tree: dict = {}
  for path, key, kind, optional in plan:
    if optional and not sd.has(f"{key}.weight"):
      continue
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = _KINDS[kind].take(sd, key)
  sd.finish()
  return tree


def _export_plan(tree: Mapping[str, Any], plan: list[PlanEntry]) -> dict:
  """The inverse of `_run_plan`: our tree -> {torch name: float32 array}."""
  out: dict = {}
  for path, key, kind, optional in plan:
    node = tree
    try:
      for p in path:
        node = node[p]
    except KeyError:
      if optional:
        continue
      raise
    _KINDS[kind].put(out, key, node)
  return out


def infer_config(params: Mapping[str, Any]) -> dict:
  """UNet fields read off a converted parameter tree (num_heads and norm_groups, which no parameter
  shape shows, are set to 1; the parameter shapes do not depend on them)."""
  mc = params["conv_in"]["kernel"].shape[3]
  levels = 1 + max(int(m.group(1)) for k in params if (m := re.fullmatch(r"down_(\d+)_res_0", k)))
  return dict(
      in_channels=int(params["conv_in"]["kernel"].shape[2]),
      out_channels=int(params["conv_out"]["kernel"].shape[3]),
      model_channels=int(mc),
      channel_mult=tuple(int(params[f"down_{lv}_res_0"]["conv1"]["kernel"].shape[3] // mc)
                         for lv in range(levels)),
      num_res_blocks=sum(1 for k in params if re.fullmatch(r"down_0_res_\d+", k)),
      attention_levels=tuple(lv for lv in range(levels) if f"down_{lv}_attn_0" in params),
      num_heads=1,
      transformer_depth=sum(1 for k in params["mid_attn"] if k.startswith("block_")),
      context_dim=int(params["mid_attn"]["block_0"]["attn2"]["k"]["kernel"].shape[0]),
      norm_groups=1,
  )


@functools.lru_cache(maxsize=8)
def _expected_shapes(items: tuple) -> Any:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from ehrxdiff_jax.nn.unet import UNet
  cfg = dict(items)
  side = 2 ** (len(cfg["channel_mult"]) - 1)
  model = UNet(**cfg)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, side, side, cfg["in_channels"])),
                         jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, cfg["context_dim"]))))
  return nn.unbox(variables["params"])


def _check(tree: dict, sd: StateDict, config: Mapping[str, Any] | None) -> dict:
  try:
    cfg = infer_config(tree) if config is None else {k: config[k] for k in _UNET_FIELDS}
  except (KeyError, ValueError, IndexError) as e:
    raise ConversionError(f"the converted UNet is incomplete ({e!r}); is this a whole UNet state "
                          "dict?") from e
  items = tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in cfg.items())
  return check_against(tree, _expected_shapes(items), sd)


# ----------------------------------------------------------------------------- public converters

def convert_ldm_unet(state_dict: Mapping[str, Any], prefix: str = "model.diffusion_model.",
                     config: Mapping[str, Any] | None = None) -> dict:
  """LDM `openaimodel.UNetModel` weights under `prefix` -> UNet params.

  Every key under `prefix` must be used. `config`: the UNet fields (cfg.model.unet) to check the
  shapes against; None infers them from the weights.
  """
  sd = StateDict(state_dict, prefix)
  plan = ldm_plan(_ldm_structure(sd.has))
  return _check(_run_plan(sd, plan), sd, config)


def convert_ldm_unet_ema(state_dict: Mapping[str, Any], prefix: str = "model_ema.",
                         config: Mapping[str, Any] | None = None) -> dict:
  """The EMA UNet of an LDM Lightning checkpoint -> UNet params.

  LitEma stores every parameter `diffusion_model.<name>` of the LatentDiffusion's `model` as the
  buffer `prefix + ('diffusion_model.' + <name>).replace('.', '')`; the dotted names are recovered
  by matching against the dot-free form of this UNet's LDM names. `prefix + 'decay'` and
  `prefix + 'num_updates'` are ignored; every other key under `prefix + 'diffusion_model'` must be
  used.
  """
  ema_prefix = prefix + "diffusion_model"
  ema = {k[len(ema_prefix):]: v for k, v in state_dict.items() if k.startswith(ema_prefix)}
  if not ema:
    raise ConversionError(f"no key starts with {ema_prefix!r}; first keys: {list(state_dict)[:5]}")
  undot = lambda name: name.replace(".", "")
  plan = ldm_plan(_ldm_structure(lambda key: undot(key) in ema))
  fake = prefix + "diffusion_model."  # dotted stand-in names, translated back in error messages
  dotted, real = {}, {}
  for key in plan_keys(plan):
    flat = undot(key)
    if flat in real:
      raise ConversionError(f"LDM names {real[flat]!r} and {key!r} are the same without dots")
    real[flat] = key
    if flat in ema:
      dotted[fake + key] = ema[flat]
  unknown = sorted(ema_prefix + k for k in set(ema) - set(real))
  if unknown:
    shown = ", ".join(unknown[:10]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 10 else "")
    raise ConversionError(f"keys of the EMA state dict not used by the conversion: {shown}")
  try:
    sd = StateDict(dotted, fake)
    return _check(_run_plan(sd, plan), sd, config)
  except ConversionError as e:
    real_name = lambda m: ema_prefix + undot(m.group(0)[len(fake):])  # noqa: E731
    msg = re.sub(re.escape(fake) + r"[\w.]*\w", real_name, str(e))
    raise ConversionError(msg) from e


def convert_diffusers_unet(state_dict: Mapping[str, Any], prefix: str = "",
                           config: Mapping[str, Any] | None = None) -> dict:
  """diffusers `UNet2DConditionModel` weights (optionally under `prefix`, e.g. 'unet.') -> params.

  Expects the EHRXDiff layout: a DownBlock2D / CrossAttnDownBlock2D per level, the UpBlocks
  mirrored, UNetMidBlock2DCrossAttn, positional time embedding (flip_sin_to_cos=True, freq_shift=0
  matches LDM), attention without q/k/v bias, GEGLU feed-forward; proj_in/out 1x1 convs or Linears.
  """
  sd = StateDict(state_dict, prefix)
  plan = diffusers_plan(_diffusers_structure(sd.has))
  return _check(_run_plan(sd, plan), sd, config)


def export_ldm_unet(unet: Mapping[str, Any], unet_cfg: Mapping[str, Any]) -> dict:
  """Our UNet tree -> LDM `openaimodel.UNetModel` names (no prefix); inverse of convert_ldm_unet."""
  structure = (len(unet_cfg["channel_mult"]), int(unet_cfg["num_res_blocks"]),
               tuple(unet_cfg["attention_levels"]), int(unet_cfg["transformer_depth"]))
  return _export_plan(unet, ldm_plan(structure))


def resblock_params(state_dict: Mapping[str, Any], key: str, naming: str = "diffusers") -> dict:
  """One ResBlock's params from a state dict holding it under `key` ('diffusers' or 'ldm' names)."""
  sd = StateDict(state_dict, key + ".")
  names = _DIFFUSERS_RES if naming == "diffusers" else _LDM_RES
  return _run_plan(sd, _relative(_res_plan(("",), "", names)))


def transformer_params(state_dict: Mapping[str, Any], key: str, depth: int = 1) -> dict:
  """One SpatialTransformer's params from a state dict holding it under `key` (LDM and diffusers
  share the names)."""
  sd = StateDict(state_dict, key + ".")
  return _run_plan(sd, _relative(_transformer_plan(("",), "", depth)))


def _relative(plan) -> list[PlanEntry]:
  """A block's plan made with path ('',) and key '' without that root."""
  return [(p[1:], k[1:], kind, opt) for p, k, kind, opt in plan]
