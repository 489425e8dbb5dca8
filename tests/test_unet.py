"""The LDM UNet: paper parameter count, shapes, parity with diffusers, LDM / EMA / diffusers weight import."""
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ehrxdiff_jax.interop.common import ConversionError
from ehrxdiff_jax.interop.unet import (convert_diffusers_unet, convert_ldm_unet, convert_ldm_unet_ema,
                                       resblock_params, transformer_params)
from ehrxdiff_jax.nn.unet import Downsample, ResBlock, SpatialTransformer, UNet, timestep_embedding
from parity import max_rel_err, nchw_to_nhwc, nhwc_to_nchw

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_PARAMS = 505_780_355

# The paper UNet at small widths: model_channels 32, mult (1, 2, 4, 4) -> 32/64/128/128 (paper 224/448/896/896).
SMALL = dict(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
             attention_levels=(1, 2, 3), num_heads=8, transformer_depth=1, context_dim=48, norm_groups=16)


def _jit(fn):
  # LLVM -O0: the same HLO, a fraction of the compile time on the CPU test machines.
  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def _load(name):
  from ehrxdiff_jax.config_util import load_config
  return load_config(os.path.join(ROOT, "configs", name))


def _randomize(module, seed):
  """Random values for every parameter, norms included, at scales that keep activations O(1)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if p.ndim > 1:
        p.copy_(torch.randn(p.shape, generator=g) / float(np.prod(p.shape[1:])) ** 0.5)
      elif name.endswith("weight"):  # norm scales
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      else:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
  return module


def _state_dict(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------- diffusers -> LDM names
# Written out independently of the converter: the classic openaimodel <-> diffusers correspondence.
_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _res_rename(rest):
  head, tail = rest.split(".", 1)
  return f"{_RES[head]}.{tail}"


def diffusers_to_ldm(key, nrb=2, attn_levels=(1, 2, 3), levels=4):
  fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
  module, param = key.rsplit(".", 1)
  if module in fixed:
    return f"{fixed[module]}.{param}"
  if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
    return f"input_blocks.{1 + int(m[1]) * (nrb + 1) + int(m[2])}.0.{_res_rename(m[3])}"
  if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
    return f"input_blocks.{1 + int(m[1]) * (nrb + 1) + int(m[2])}.1.{m[3]}"
  if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
    return f"input_blocks.{(int(m[1]) + 1) * (nrb + 1)}.0.op.{m[2]}"
  if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key):
    return f"middle_block.{2 * int(m[1])}.{_res_rename(m[2])}"
  if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
    return f"middle_block.1.{m[1]}"
  if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
    return f"output_blocks.{int(m[1]) * (nrb + 1) + int(m[2])}.0.{_res_rename(m[3])}"
  if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
    return f"output_blocks.{int(m[1]) * (nrb + 1) + int(m[2])}.1.{m[3]}"
  if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
    level = levels - 1 - int(m[1])
    return f"output_blocks.{int(m[1]) * (nrb + 1) + nrb}.{2 if level in attn_levels else 1}.conv.{m[2]}"
  raise KeyError(key)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def small_diffusers():
  torch.manual_seed(0)
  mc = SMALL["model_channels"]
  model = diffusers.UNet2DConditionModel(
      sample_size=16, in_channels=3, out_channels=3, flip_sin_to_cos=True, freq_shift=0,
      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
      mid_block_type="UNetMidBlock2DCrossAttn",
      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
      block_out_channels=tuple(mc * m for m in SMALL["channel_mult"]), layers_per_block=2,
      downsample_padding=1, act_fn="silu", norm_num_groups=SMALL["norm_groups"], norm_eps=1e-5,
      cross_attention_dim=SMALL["context_dim"],
      attention_head_dim=8,  # diffusers reads this as the number of heads when num_attention_heads is None
      use_linear_projection=False, upcast_attention=False)
  return _randomize(model, seed=1).eval()


@pytest.fixture(scope="module")
def small_sd(small_diffusers):
  return _state_dict(small_diffusers)


@pytest.fixture(scope="module")
def small_params(small_sd):
  return convert_diffusers_unet(small_sd, config=SMALL)


@pytest.fixture(scope="module")
def small_apply():
  model = UNet(**SMALL, dtype=jnp.float32, attention="xla")
  return _jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))


# ----------------------------------------------------------------------------- (a) paper size

def test_paper_parameter_count_and_axes():
  cfg = _load("base.py")
  model = UNet(**cfg.model.unet.to_dict(), dtype=jnp.float32, attention="auto", remat="none")
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)),
                                             jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1024, 768))))
  leaves = jax.tree_util.tree_leaves(shapes["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) and len(x.names) == len(x.value.shape) for x in leaves)
  assert sum(int(np.prod(x.value.shape)) for x in leaves) == PAPER_PARAMS


def test_paper_diffusers_peer_has_same_count():
  """The diffusers layout used for parity, at paper widths, also has exactly the paper's count."""
  with torch.device("meta"):
    peer = diffusers.UNet2DConditionModel(
        sample_size=64, in_channels=3, out_channels=3,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
        block_out_channels=(224, 448, 896, 896), layers_per_block=2, cross_attention_dim=768,
        attention_head_dim=8, norm_num_groups=32)
  assert sum(p.numel() for p in peer.parameters()) == PAPER_PARAMS


# ----------------------------------------------------------------------------- (b) tiny forward

def test_tiny_forward_shape(tiny_config):
  u = tiny_config.model.unet
  x = jnp.ones((2, 16, 16, u.in_channels))
  ctx = jnp.ones((2, 5, u.context_dim))
  model = UNet(**u.to_dict(), dtype=jnp.float32, attention="xla", remat="block")
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, jnp.array([3, 999]), ctx)
  plain = UNet(**u.to_dict(), dtype=jnp.float32, attention="xla", remat="none")
  assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(
      jax.eval_shape(plain.init, jax.random.PRNGKey(0), x, jnp.array([3, 999]), ctx))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda s: 0.1 * rng.standard_normal(s.shape).astype(np.float32),
                                  nn.unbox(shapes["params"]))
  out = _jit(model.apply)({"params": params}, x, jnp.array([3.0, 999.0]), ctx)
  assert out.shape == (2, 16, 16, u.out_channels) and out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))
  bf16 = UNet(**u.to_dict(), dtype=jnp.bfloat16, attention="xla")
  out_bf16 = jax.eval_shape(bf16.apply, {"params": params}, x, jnp.array([3, 999]), ctx)
  assert out_bf16.shape == out.shape and out_bf16.dtype == jnp.float32


def test_zero_initialised_outputs_as_ldm():
  """LDM's zero_module: the last conv of a ResBlock and a SpatialTransformer's proj_out start at zero."""
  x, emb = jnp.ones((1, 4, 4, 16)), jnp.ones((1, 32))
  res = jax.jit(ResBlock(16, 8).init)(jax.random.PRNGKey(0), x, emb)["params"]
  st = jax.jit(SpatialTransformer(4, 1, 8).init)(jax.random.PRNGKey(0), x, jnp.ones((1, 3, 16)))["params"]
  assert not np.any(nn.unbox(res)["conv2"]["kernel"]) and not np.any(nn.unbox(st)["proj_out"]["kernel"])
  assert np.any(nn.unbox(res)["conv1"]["kernel"])


# ----------------------------------------------------------------------------- (c) whole-UNet parity

def test_parity_with_diffusers_small(small_diffusers, small_params, small_apply):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
  t = np.array([7, 815])
  ctx = rng.standard_normal((2, 9, SMALL["context_dim"])).astype(np.float32)
  with torch.no_grad():
    ref = small_diffusers(torch.from_numpy(nhwc_to_nchw(x)), torch.from_numpy(t),
                          encoder_hidden_states=torch.from_numpy(ctx)).sample.numpy()
  ours = small_apply(small_params, x, t, ctx)
  err = max_rel_err(ours, nchw_to_nhwc(ref))
  print(f"small UNet parity max_rel_err={err:.3g}")
  assert err <= 1e-4


def test_timestep_embedding_matches_ldm_and_diffusers():
  from diffusers.models.embeddings import get_timestep_embedding
  t = np.array([0, 1, 7, 500, 999])
  ref = get_timestep_embedding(torch.from_numpy(t), 32, flip_sin_to_cos=True, downscale_freq_shift=0).numpy()
  assert max_rel_err(timestep_embedding(jnp.asarray(t), 32), ref) <= 1e-5  # fp32 sin/cos at t ~ 1000
  assert max_rel_err(timestep_embedding(jnp.asarray(t, jnp.float32), 32), ref) <= 1e-5
  half = np.exp(-np.log(10000.0) * np.arange(16) / 16)  # LDM: [cos, sin] of t * 10000^(-i/16)
  np.testing.assert_allclose(timestep_embedding(jnp.asarray(t), 32)[:, :16], np.cos(t[:, None] * half), atol=2e-4)


# ----------------------------------------------------------------------------- (d) real-width block

class _DownLevel(nn.Module):
  """ResBlock, SpatialTransformer, Downsample: one paper level-2 step (448 -> 896 channels)."""
  out_channels: int
  num_heads: int

  @nn.compact
  def __call__(self, x, emb, context):
    h = ResBlock(self.out_channels, 32, name="res")(x, emb)
    h = SpatialTransformer(self.num_heads, 1, 32, attention="xla", name="attn")(h, context)
    return h, Downsample(self.out_channels, name="down")(h)


def test_parity_real_width_block():
  from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D
  torch.manual_seed(0)
  block = CrossAttnDownBlock2D(in_channels=448, out_channels=896, temb_channels=896, num_layers=1,
                               resnet_eps=1e-5, resnet_groups=32, num_attention_heads=8,
                               cross_attention_dim=768, add_downsample=True, use_linear_projection=False)
  block = _randomize(block, seed=2).eval()
  sd = _state_dict(block)
  params = {"res": resblock_params(sd, "resnets.0"), "attn": transformer_params(sd, "attentions.0"),
            "down": {"conv": {"kernel": sd["downsamplers.0.conv.weight"].transpose(2, 3, 1, 0),
                              "bias": sd["downsamplers.0.conv.bias"]}}}
  rng = np.random.default_rng(1)
  x = rng.standard_normal((1, 8, 8, 448)).astype(np.float32)
  emb = rng.standard_normal((1, 896)).astype(np.float32)
  ctx = rng.standard_normal((1, 16, 768)).astype(np.float32)
  with torch.no_grad():
    ref_down, ref_states = block(torch.from_numpy(nhwc_to_nchw(x)), torch.from_numpy(emb),
                                 encoder_hidden_states=torch.from_numpy(ctx))
  h, down = _jit(_DownLevel(896, 8).apply)({"params": params}, x, emb, ctx)
  err_h = max_rel_err(h, nchw_to_nhwc(ref_states[0].numpy()))
  err_down = max_rel_err(down, nchw_to_nhwc(ref_down.numpy()))
  print(f"real-width block parity max_rel_err: res+transformer {err_h:.3g}, downsample {err_down:.3g}")
  assert err_h <= 1e-4 and err_down <= 1e-4


# ----------------------------------------------------------------------------- (e) LDM / EMA names

@pytest.fixture(scope="module")
def ldm_sd(small_sd):
  return {f"model.diffusion_model.{diffusers_to_ldm(k)}": v for k, v in small_sd.items()}


def _assert_same(a, b):
  fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], dict(jax.tree_util.tree_flatten_with_path(b)[0])
  assert len(fa) == len(fb)
  for path, leaf in fa:
    np.testing.assert_array_equal(leaf, fb[path], err_msg=jax.tree_util.keystr(path))


def test_ldm_names_give_identical_params(ldm_sd, small_params):
  assert len(ldm_sd) == len(set(ldm_sd))
  assert "model.diffusion_model.output_blocks.5.2.conv.weight" in ldm_sd  # upsample after a transformer
  assert "model.diffusion_model.output_blocks.8.2.conv.weight" in ldm_sd
  assert "model.diffusion_model.input_blocks.3.0.op.weight" in ldm_sd
  other = {"first_stage_model.encoder.conv_in.weight": np.zeros((1,)), "model_ema.decay": np.array(0.9999)}
  _assert_same(convert_ldm_unet({**ldm_sd, **other}, config=SMALL), small_params)
  _assert_same(convert_ldm_unet(ldm_sd), small_params)  # config inferred from the weights


def test_ldm_ema_names_give_identical_params(ldm_sd, small_params):
  ema = {"model_ema." + k[len("model."):].replace(".", ""): v for k, v in ldm_sd.items()}
  assert "model_ema.diffusion_modelinput_blocks00weight" in ema
  noisy = {k: v + 1.0 for k, v in ldm_sd.items()}  # the non-EMA weights differ: must not be read
  ckpt = {**noisy, **ema, "model_ema.decay": np.array(0.9999), "model_ema.num_updates": np.array(10)}
  _assert_same(convert_ldm_unet_ema(ckpt, config=SMALL), small_params)
  _assert_same(convert_ldm_unet_ema(ema), small_params)


# ----------------------------------------------------------------------------- (f) errors

def test_conversion_errors_name_the_key(ldm_sd, small_sd):
  extra = "model.diffusion_model.input_blocks.4.1.extra.weight"
  with pytest.raises(ConversionError, match=re.escape(extra)):
    convert_ldm_unet({**ldm_sd, extra: np.zeros((3,), np.float32)}, config=SMALL)

  bad = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
  wrong = dict(ldm_sd, **{bad: np.zeros((64, 32, 1, 1), np.float32)})
  with pytest.raises(ConversionError, match=re.escape(bad)):
    convert_ldm_unet(wrong, config=SMALL)

  bad_d = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
  with pytest.raises(ConversionError, match=re.escape(bad_d)):
    convert_diffusers_unet(dict(small_sd, **{bad_d: np.zeros((128, 40), np.float32)}), config=SMALL)
  with pytest.raises(ConversionError, match="shape mismatch"):  # the config disagrees with the weights
    convert_diffusers_unet(small_sd, config=dict(SMALL, context_dim=64))

  missing = dict(ldm_sd)
  del missing["model.diffusion_model.output_blocks.3.0.skip_connection.bias"]
  with pytest.raises(ConversionError, match=re.escape("output_blocks.3.0.skip_connection.bias")):
    convert_ldm_unet(missing, config=SMALL)

  ema = {"model_ema." + k[len("model."):].replace(".", ""): v for k, v in ldm_sd.items()}
  bad_e = "model_ema.diffusion_modelmiddle_block1proj_outweight"
  with pytest.raises(ConversionError, match=re.escape(bad_e)):
    convert_ldm_unet_ema(dict(ema, **{bad_e: np.zeros((128, 128, 3, 3), np.float32)}), config=SMALL)
  with pytest.raises(ConversionError, match="model_ema.diffusion_modelfoo"):
    convert_ldm_unet_ema(dict(ema, **{"model_ema.diffusion_modelfoo": np.zeros(1)}), config=SMALL)
