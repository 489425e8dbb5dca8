"""Weight import and export for the KL autoencoder (`ehrxdiff_jax.nn.vae.AutoencoderKL`).

Two PyTorch naming schemes describe the same network (`_Naming`: name tables and level lists):
  * CompVis LDM / Cheff / EHRXDiff: `encoder.down.{i}.block.{j}.conv1`, `encoder.mid.attn_1.q`
    (1x1 convs), `decoder.up.{i}...` with i the resolution level (0 = full resolution); EHRXDiff
    Lightning checkpoints hold it under `first_stage_model.`.
  * diffusers `AutoencoderKL`: `encoder.down_blocks.{i}.resnets.{j}`, `mid_block.attentions.0.to_q`
    (Linear; legacy `query/key/value/proj_attn`), `decoder.up_blocks.{k}` with k = levels-1-i.
The converters read the depth off the keys, refuse leftover keys and check every shape against the
network (`expected`, or the one the converted shapes describe). `export_ldm_vae` walks the same
tables back.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ehrxdiff_jax.interop.common import (ConversionError, IfPresent, StateDict, check_against,
                                         export_block, export_blocks, put_conv)
from ehrxdiff_jax.nn.vae import AutoencoderKL

__all__ = ["convert_diffusers_vae", "convert_ldm_vae", "expected_vae_params", "export_ldm_vae",
           "infer_vae_fields"]


def expected_vae_params(module: AutoencoderKL, image_size: int | None = None) -> dict:
  """The unboxed parameter ShapeDtypeStructs of `module` (jax.eval_shape; nothing allocated).
  `image_size` (default 8 x the downsample factor) sets only the traced input, no shape."""
  size = image_size or 8 * module.downsample_factor
  x = jax.ShapeDtypeStruct((1, size, size, module.in_channels), jnp.float32)
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)))
  return nn.unbox(variables["params"])


def infer_vae_fields(params: Mapping[str, Any]) -> dict:
  """AutoencoderKL fields that a (converted) parameter tree implies; norm_groups/norm_eps are not
  visible in shapes and are left out."""
  enc, dec = params["encoder"], params["decoder"]
  ch = int(enc["conv_in"]["kernel"].shape[-1])
  levels = sorted({int(m.group(1)) for k in enc if (m := re.fullmatch(r"down_(\d+)_block_\d+", k))})
  if not levels or levels != list(range(len(levels))):
    raise ConversionError(f"encoder resolution levels {levels} are not 0..n-1")
  ch_mult = []
  for i in levels:
    width = int(enc[f"down_{i}_block_0"]["norm2"]["scale"].shape[0])
    if width % ch:
      raise ConversionError(f"encoder level {i} width {width} is not a multiple of conv_in width "
                            f"{ch}")
    ch_mult.append(width // ch)
  num_res_blocks = sum(1 for k in enc if re.fullmatch(r"down_0_block_\d+", k))
  return dict(
      in_channels=int(enc["conv_in"]["kernel"].shape[2]),
      out_channels=int(dec["conv_out"]["kernel"].shape[-1]),
      ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
      z_channels=int(enc["conv_out"]["kernel"].shape[-1]) // 2,
      embed_dim=int(params["quant_conv"]["kernel"].shape[-1]) // 2,
  )


_PROJ = StateDict.conv1x1_as_linear  # attention projections: 1x1 convs (LDM) or Linear (diffusers)


def _resnet_table(shortcut: str) -> dict:
  return {"norm1": (StateDict.norm, "norm1"), "conv1": (StateDict.conv, "conv1"),
          "norm2": (StateDict.norm, "norm2"), "conv2": (StateDict.conv, "conv2"),
          # only where the block changes the width
          "nin_shortcut": IfPresent(StateDict.conv, shortcut)}


@dataclasses.dataclass(frozen=True)
class _Naming:
  """Where a naming scheme keeps each part of the encoder / decoder (our names: nn/vae.py)."""
  part: Mapping[str, Any]       # name table of the fixed layers of the encoder / decoder
  levels: Mapping[str, str]     # part -> the ModuleList of resolution levels
  blocks: str                   # the res blocks inside a level
  resnet: Mapping[str, Any]     # name table of one res block
  resample: Mapping[str, str]   # part -> the down/upsampling conv inside a level
  decoder_coarsest_first: bool  # the decoder's level list starts at the lowest resolution


def _part_table(mid_block_1: str, mid_attn_1: str, mid_block_2: str, norm_out: str, resnet,
                attention) -> dict:
  return {"conv_in": (StateDict.conv, "conv_in"), "mid_block_1": (resnet, mid_block_1),
          "mid_attn_1": (attention, mid_attn_1), "mid_block_2": (resnet, mid_block_2),
          "norm_out": (StateDict.norm, norm_out), "conv_out": (StateDict.conv, "conv_out")}


_LDM_RESNET = _resnet_table("nin_shortcut")
_LDM = _Naming(
    part=_part_table("mid.block_1", "mid.attn_1", "mid.block_2", "norm_out", _LDM_RESNET,
                     {"norm": (StateDict.norm, "norm"), "q": (_PROJ, "q"), "k": (_PROJ, "k"),
                      "v": (_PROJ, "v"), "proj_out": (_PROJ, "proj_out")}),
    levels={"encoder": "down", "decoder": "up"}, blocks="block", resnet=_LDM_RESNET,
    resample={"encoder": "downsample.conv", "decoder": "upsample.conv"},
    decoder_coarsest_first=False)
# diffusers: Linear attention projections (legacy names query/key/value/proj_attn), decoder coarsest
# first.
_DIFFUSERS_RESNET = _resnet_table("conv_shortcut")
_DIFFUSERS = _Naming(
    part=_part_table("mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1",
                     "conv_norm_out", _DIFFUSERS_RESNET,
                     {"norm": (StateDict.norm, "group_norm"), "q": (_PROJ, ("to_q", "query")),
                      "k": (_PROJ, ("to_k", "key")), "v": (_PROJ, ("to_v", "value")),
                      "proj_out": (_PROJ, ("to_out.0", "proj_attn"))}),
    levels={"encoder": "down_blocks", "decoder": "up_blocks"}, blocks="resnets",
    resnet=_DIFFUSERS_RESNET,
    resample={"encoder": "downsamplers.0.conv", "decoder": "upsamplers.0.conv"},
    decoder_coarsest_first=True)
_OURS = {"encoder": "down", "decoder": "up"}  # our levels: down_{i}_block_{j}, down_{i}_downsample
_TOP = {"quant_conv": (StateDict.conv, "quant_conv"),
        "post_quant_conv": (StateDict.conv, "post_quant_conv")}


def _level(names: _Naming, part: str, k: int, n_levels: int) -> int:
  """Our level index (0 = full resolution) of their k-th level."""
  return n_levels - 1 - k if part == "decoder" and names.decoder_coarsest_first else k


def _convert(state_dict: Mapping[str, Any], prefix: str, expected, names: _Naming) -> dict:
  """The one conversion loop of both naming schemes."""
  sd = StateDict(state_dict, prefix)
  p: dict = {}
  for part, ours in _OURS.items():
    tree = p[part] = sd.block(part, names.part)
    levels = f"{part}.{names.levels[part]}"
    found = sd.indices(levels)
    for k in found:
      i = _level(names, part, k, len(found))
      tree.update(sd.blocks(f"{levels}.{k}.{names.blocks}", f"{ours}_{i}_block_{{}}", names.resnet))
      resample = f"{levels}.{k}.{names.resample[part]}"
      if sd.has(f"{resample}.weight"):
        tree[f"{ours}_{i}_{ours}sample"] = sd.conv(resample)
  p.update(sd.block("", _TOP))
  return _finish(sd, p, expected)


def _export(vae: Mapping[str, Any], names: _Naming) -> dict:
  """Inverse of `_convert`: our tree -> the scheme's names (no prefix)."""
  out: dict = {}
  for part, ours in _OURS.items():
    tree = vae[part]
    export_block(out, part, tree, names.part)
    n_levels = len({m.group(1) for k in tree if (m := re.fullmatch(rf"{ours}_(\d+)_block_\d+", k))})
    for k in range(n_levels):
      i = _level(names, part, k, n_levels)
      level = f"{part}.{names.levels[part]}.{k}"
      export_blocks(out, tree, f"{ours}_{i}_block_{{}}", f"{level}.{names.blocks}", names.resnet)
      if f"{ours}_{i}_{ours}sample" in tree:
        put_conv(out, f"{level}.{names.resample[part]}", tree[f"{ours}_{i}_{ours}sample"])
  export_block(out, "", vae, _TOP)
  return out


def _finish(sd: StateDict, params: dict, expected) -> dict:
  sd.skip_under("loss")  # the VAE training loss (LPIPS, discriminator): not the model
  sd.finish()
  if expected is None:
    try:
      fields = infer_vae_fields(params)
    except (KeyError, IndexError) as e:
      raise ConversionError(f"the state dict does not describe a complete KL autoencoder: missing "
                            f"{e}") from e
    expected = expected_vae_params(AutoencoderKL(**fields, norm_groups=1))
  return check_against(params, expected, sd)


def convert_ldm_vae(state_dict: Mapping[str, Any], prefix: str = "", *, expected=None) -> dict:
  """CompVis LDM / Cheff / EHRXDiff `AutoencoderKL` weights -> our unboxed `params` tree.

  Args:
    state_dict: flat {name: tensor | array}; keys outside `prefix` are ignored.
    prefix: e.g. 'first_stage_model.' for an EHRXDiff / LDM Lightning checkpoint.
    expected: optional parameter shapes to check against (e.g. `expected_vae_params(model)`).
  """
  return _convert(state_dict, prefix, expected, _LDM)


def convert_diffusers_vae(state_dict: Mapping[str, Any], prefix: str = "", *,
                          expected=None) -> dict:
  """diffusers `AutoencoderKL` weights (e.g. `vae.state_dict()` or its safetensors) -> our `params`.

  Args:
    state_dict: flat {name: tensor | array}; keys outside `prefix` are ignored.
    prefix: e.g. 'vae.' when the autoencoder sits inside a larger state dict.
    expected: optional parameter shapes to check against (e.g. `expected_vae_params(model)`).
  """
  return _convert(state_dict, prefix, expected, _DIFFUSERS)


def export_ldm_vae(vae: Mapping[str, Any]) -> dict:
  """Our AutoencoderKL tree -> CompVis LDM / Cheff names (no prefix); inverse of convert_ldm_vae."""
  return _export(vae, _LDM)
