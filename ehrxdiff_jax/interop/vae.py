"""Weight import for the KL autoencoder (`ehrxdiff_jax.nn.vae.AutoencoderKL`).

Two PyTorch naming schemes describe the same network:
  * CompVis LDM / Cheff / EHRXDiff: `encoder.down.{i}.block.{j}.conv1`, `encoder.mid.attn_1.q` (1x1 convs),
    `decoder.up.{i}...` with i the resolution level (0 = full resolution). EHRXDiff Lightning checkpoints
    hold it under `first_stage_model.`.
  * diffusers `AutoencoderKL`: `encoder.down_blocks.{i}.resnets.{j}`, `mid_block.attentions.0.to_q`
    (Linear; legacy `query/key/value/proj_attn`), and `decoder.up_blocks.{k}` with k = levels-1-i
    (diffusers orders the decoder blocks coarsest first).
Both converters infer the depth (levels, res blocks per level) from the keys, refuse leftover keys,
and check every shape against the network (`expected`, or the network the converted shapes describe).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ehrxdiff_jax.interop.common import ConversionError, StateDict, check_against
from ehrxdiff_jax.nn.vae import AutoencoderKL

__all__ = ["convert_diffusers_vae", "convert_ldm_vae", "expected_vae_params", "infer_vae_fields"]


def expected_vae_params(module: AutoencoderKL, image_size: int | None = None) -> dict:
  """The unboxed parameter tree of `module` as ShapeDtypeStructs (jax.eval_shape; nothing allocated).

  Parameter shapes do not depend on the image size; `image_size` (default 8 * downsample factor) only
  sets the traced input.
  """
  size = image_size or 8 * 2 ** (len(module.ch_mult) - 1)
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
      raise ConversionError(f"encoder level {i} width {width} is not a multiple of conv_in width {ch}")
    ch_mult.append(width // ch)
  num_res_blocks = sum(1 for k in enc if re.fullmatch(r"down_0_block_\d+", k))
  return dict(
      in_channels=int(enc["conv_in"]["kernel"].shape[2]),
      out_channels=int(dec["conv_out"]["kernel"].shape[-1]),
      ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
      z_channels=int(enc["conv_out"]["kernel"].shape[-1]) // 2,
      embed_dim=int(params["quant_conv"]["kernel"].shape[-1]) // 2,
  )


def _indices(sd: StateDict, pattern: str) -> list[int]:
  """Sorted distinct integers captured by `pattern` (a regex with one group) at the start of keys."""
  rx = re.compile(re.escape(sd.prefix) + pattern)
  return sorted({int(m.group(1)) for k in sd._sd if (m := rx.match(k))})


def _resnet(sd: StateDict, key: str, shortcut: str) -> dict:
  out = {n: sd.norm(f"{key}.{n}") for n in ("norm1", "norm2")}
  out.update(conv1=sd.conv(f"{key}.conv1"), conv2=sd.conv(f"{key}.conv2"))
  if sd.has(f"{key}.{shortcut}.weight"):
    out["nin_shortcut"] = sd.conv(f"{key}.{shortcut}")
  return out


def _attention(sd: StateDict, key: str, names: Mapping[str, tuple[str, ...]]) -> dict:
  out = {}
  for ours, candidates in names.items():
    found = [c for c in candidates if sd.has(f"{key}.{c}.weight")]
    if not found:
      raise ConversionError(f"missing key {sd.prefix}{key}.{candidates[0]}.weight in the PyTorch state dict")
    out[ours] = sd.norm(f"{key}.{found[0]}") if ours == "norm" else sd.conv1x1_as_linear(f"{key}.{found[0]}")
  return out


_LDM_ATTN = {"norm": ("norm",), "q": ("q",), "k": ("k",), "v": ("v",), "proj_out": ("proj_out",)}
_DIFFUSERS_ATTN = {"norm": ("group_norm",), "q": ("to_q", "query"), "k": ("to_k", "key"),
                   "v": ("to_v", "value"), "proj_out": ("to_out.0", "proj_attn")}


def _finish(sd: StateDict, params: dict, expected) -> dict:
  for k in list(sd._sd):
    if k.startswith(sd.prefix + "loss."):  # the VAE training loss (LPIPS, discriminator): not the model
      sd.skip(k[len(sd.prefix):])
  sd.finish()
  if expected is None:
    try:
      fields = infer_vae_fields(params)
    except (KeyError, IndexError) as e:
      raise ConversionError(f"the state dict does not describe a complete KL autoencoder: missing {e}") from e
    expected = expected_vae_params(AutoencoderKL(**fields, norm_groups=1))
  return check_against(params, expected, sd)


def convert_ldm_vae(state_dict: Mapping[str, Any], prefix: str = "", *, expected=None) -> dict:
  """CompVis LDM / Cheff / EHRXDiff `AutoencoderKL` weights -> our unboxed `params` tree.

  Args:
    state_dict: flat {name: tensor | array}; keys outside `prefix` are ignored.
    prefix: e.g. 'first_stage_model.' for an EHRXDiff / LDM Lightning checkpoint.
    expected: optional parameter shapes to check against (e.g. `expected_vae_params(model)`).
  """
  sd = StateDict(state_dict, prefix)
  p: dict = {}
  for part in ("encoder", "decoder"):
    tree = p[part] = {"conv_in": sd.conv(f"{part}.conv_in")}
    tree["mid_block_1"] = _resnet(sd, f"{part}.mid.block_1", "nin_shortcut")
    tree["mid_attn_1"] = _attention(sd, f"{part}.mid.attn_1", _LDM_ATTN)
    tree["mid_block_2"] = _resnet(sd, f"{part}.mid.block_2", "nin_shortcut")
    tree["norm_out"] = sd.norm(f"{part}.norm_out")
    tree["conv_out"] = sd.conv(f"{part}.conv_out")
    ours, theirs, resample = ("down", "down", "downsample") if part == "encoder" else ("up", "up", "upsample")
    for i in _indices(sd, rf"{part}\.{theirs}\.(\d+)\."):
      for j in _indices(sd, rf"{part}\.{theirs}\.{i}\.block\.(\d+)\."):
        tree[f"{ours}_{i}_block_{j}"] = _resnet(sd, f"{part}.{theirs}.{i}.block.{j}", "nin_shortcut")
      if sd.has(f"{part}.{theirs}.{i}.{resample}.conv.weight"):
        tree[f"{ours}_{i}_{resample}"] = sd.conv(f"{part}.{theirs}.{i}.{resample}.conv")
  p["quant_conv"] = sd.conv("quant_conv")
  p["post_quant_conv"] = sd.conv("post_quant_conv")
  return _finish(sd, p, expected)


def convert_diffusers_vae(state_dict: Mapping[str, Any], prefix: str = "", *, expected=None) -> dict:
  """diffusers `AutoencoderKL` weights (e.g. `vae.state_dict()` or its safetensors) -> our `params`.

  Args:
    state_dict: flat {name: tensor | array}; keys outside `prefix` are ignored.
    prefix: e.g. 'vae.' when the autoencoder sits inside a larger state dict.
    expected: optional parameter shapes to check against (e.g. `expected_vae_params(model)`).
  """
  sd = StateDict(state_dict, prefix)
  p: dict = {}
  for part in ("encoder", "decoder"):
    tree = p[part] = {"conv_in": sd.conv(f"{part}.conv_in")}
    tree["mid_block_1"] = _resnet(sd, f"{part}.mid_block.resnets.0", "conv_shortcut")
    tree["mid_attn_1"] = _attention(sd, f"{part}.mid_block.attentions.0", _DIFFUSERS_ATTN)
    tree["mid_block_2"] = _resnet(sd, f"{part}.mid_block.resnets.1", "conv_shortcut")
    tree["norm_out"] = sd.norm(f"{part}.conv_norm_out")
    tree["conv_out"] = sd.conv(f"{part}.conv_out")
  enc, dec = p["encoder"], p["decoder"]
  for i in _indices(sd, r"encoder\.down_blocks\.(\d+)\."):
    key = f"encoder.down_blocks.{i}"
    for j in _indices(sd, rf"encoder\.down_blocks\.{i}\.resnets\.(\d+)\."):
      enc[f"down_{i}_block_{j}"] = _resnet(sd, f"{key}.resnets.{j}", "conv_shortcut")
    if sd.has(f"{key}.downsamplers.0.conv.weight"):
      enc[f"down_{i}_downsample"] = sd.conv(f"{key}.downsamplers.0.conv")
  up = _indices(sd, r"decoder\.up_blocks\.(\d+)\.")
  for k in up:
    i = len(up) - 1 - k  # diffusers lists the decoder levels coarsest first
    key = f"decoder.up_blocks.{k}"
    for j in _indices(sd, rf"decoder\.up_blocks\.{k}\.resnets\.(\d+)\."):
      dec[f"up_{i}_block_{j}"] = _resnet(sd, f"{key}.resnets.{j}", "conv_shortcut")
    if sd.has(f"{key}.upsamplers.0.conv.weight"):
      dec[f"up_{i}_upsample"] = sd.conv(f"{key}.upsamplers.0.conv")
  p["quant_conv"] = sd.conv("quant_conv")
  p["post_quant_conv"] = sd.conv("post_quant_conv")
  return _finish(sd, p, expected)
