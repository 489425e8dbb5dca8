"""The KL autoencoder: paper parameter count, shapes, DiagonalGaussian math, and weight import parity
against diffusers `AutoencoderKL` (random weights) in both the diffusers and the LDM naming."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from ehrxdiff_jax.interop.common import ConversionError
from ehrxdiff_jax.interop.vae import (convert_diffusers_vae, convert_ldm_vae, expected_vae_params,
                                      infer_vae_fields)
from ehrxdiff_jax.nn.vae import AutoencoderKL, DiagonalGaussian
from tests.parity import max_rel_err, nchw_to_nhwc, nhwc_to_nchw

PAPER_VAE_PARAMS = 55_312_063

# The diffusers peer at small widths: 3 levels (f = 4), 2 res blocks per level, GroupNorm(8).
SMALL = dict(in_channels=3, out_channels=3, ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, z_channels=3,
             embed_dim=3, norm_groups=8, norm_eps=1e-6)
IMAGE = 32
LEVELS = len(SMALL["ch_mult"])


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


# ------------------------------------------------------------------------------------------- structure
def test_paper_parameter_count_and_logical_axes():
  cfg = base.get_config()
  model = AutoencoderKL(**cfg.model.vae, dtype=cfg.model.dtype, attention=cfg.model.attention,
                        remat=cfg.model.remat)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 256, 256, 3))))["params"]
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert all(isinstance(x, nn.Partitioned) for x in leaves), "every parameter needs logical axis names"
  assert all(len(x.names) == x.value.ndim for x in leaves)
  params = nn.unbox(boxed)
  assert _count(params) == PAPER_VAE_PARAMS
  assert _count(expected_vae_params(model)) == PAPER_VAE_PARAMS
  assert infer_vae_fields(params) == dict(in_channels=3, out_channels=3, ch=128, ch_mult=(1, 2, 4),
                                          num_res_blocks=2, z_channels=3, embed_dim=3)


@pytest.mark.parametrize("remat,dtype", [("none", "float32"), ("block", "bfloat16")])
def test_shapes_tiny(tiny_config, remat, dtype):
  m = tiny_config.model
  model = AutoencoderKL(**m.vae, dtype=dtype, attention="xla", remat=remat)
  size = tiny_config.data.image_size
  f = 2 ** (len(m.vae.ch_mult) - 1)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  params = expected_vae_params(model, size)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
      expected_vae_params(AutoencoderKL(**m.vae)))
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  post = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.encode), params, x)
  assert isinstance(post, DiagonalGaussian)
  assert post.mean.shape == post.logvar.shape == (2, size // f, size // f, m.vae.embed_dim)
  assert post.mean.dtype == jnp.float32
  z = jax.ShapeDtypeStruct(post.mean.shape, jnp.float32)
  out = jax.eval_shape(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode), params, z)
  assert out.shape == (2, size, size, 3) and out.dtype == jnp.float32
  rec = jax.eval_shape(lambda p, x, r: model.apply({"params": p}, x, r), params, x,
                       jax.ShapeDtypeStruct((), jax.random.key(0).dtype))
  assert rec.shape == (2, size, size, 3)


# ------------------------------------------------------------------------------------- DiagonalGaussian
def test_diagonal_gaussian_math():
  rng = np.random.default_rng(0)
  moments = rng.normal(size=(3, 4, 5, 6)).astype(np.float32) * 3
  moments[0, 0, 0, 3] = -45.0  # clipped to -30
  moments[1, 1, 1, 4] = 25.0   # clipped to 20
  post = jax.jit(DiagonalGaussian.from_moments)(jnp.asarray(moments))  # a pytree through jit
  mean = moments[..., :3].astype(np.float64)
  logvar = np.clip(moments[..., 3:], -30, 20).astype(np.float64)
  np.testing.assert_array_equal(post.mean, moments[..., :3])
  np.testing.assert_array_equal(post.logvar, logvar.astype(np.float32))
  np.testing.assert_array_equal(post.mode(), post.mean)
  np.testing.assert_allclose(post.std, np.exp(0.5 * logvar), rtol=1e-6)
  np.testing.assert_allclose(post.var, np.exp(logvar), rtol=1e-6)
  np.testing.assert_array_equal(post.moments, np.concatenate([mean, logvar], -1).astype(np.float32))
  kl = 0.5 * np.sum(mean ** 2 + np.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
  assert post.kl().shape == (3,)
  np.testing.assert_allclose(post.kl(), kl, rtol=1e-5)
  key = jax.random.key(7)
  eps = np.asarray(jax.random.normal(key, mean.shape, jnp.float32), np.float64)
  np.testing.assert_allclose(post.sample(key), mean + np.exp(0.5 * logvar) * eps, rtol=1e-5, atol=1e-6)
  x = rng.normal(size=mean.shape)
  nll = 0.5 * np.sum(np.log(2 * np.pi) + logvar + (x - mean) ** 2 / np.exp(logvar), axis=(1, 2, 3))
  np.testing.assert_allclose(post.nll(jnp.asarray(x, jnp.float32)), nll, rtol=1e-5)
  # Same numbers as diffusers' DiagonalGaussianDistribution (channels on axis 1 there).
  torch = pytest.importorskip("torch")
  from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
  theirs = DiagonalGaussianDistribution(torch.from_numpy(nhwc_to_nchw(moments).copy()))
  np.testing.assert_allclose(post.kl(), theirs.kl().numpy(), rtol=1e-5)
  np.testing.assert_allclose(post.logvar, nchw_to_nhwc(theirs.logvar.numpy()), rtol=1e-6)


# --------------------------------------------------------------------------------------- diffusers peer
@pytest.fixture(scope="module")
def peer():
  """(torch AutoencoderKL with every weight randomised, its state dict as numpy, input image)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * LEVELS,
      up_block_types=("UpDecoderBlock2D",) * LEVELS,
      block_out_channels=tuple(SMALL["ch"] * m for m in SMALL["ch_mult"]),
      layers_per_block=SMALL["num_res_blocks"], latent_channels=SMALL["z_channels"],
      norm_num_groups=SMALL["norm_groups"], sample_size=IMAGE).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in vae.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim == 1 and ("norm" in name and name.endswith("weight")):
        p.copy_(1.0 + 0.3 * noise)          # norm scales around 1
      elif p.ndim == 1:
        p.copy_(0.2 * noise)                # biases and norm offsets
      else:
        p.copy_(noise / np.sqrt(p[0].numel()))  # fan-in scaled, so activations stay O(1)
  sd = {k: v.detach().numpy().copy() for k, v in vae.state_dict().items()}
  x = np.random.default_rng(0).uniform(-1, 1, size=(2, IMAGE, IMAGE, 3)).astype(np.float32)
  return vae, sd, x


@pytest.fixture(scope="module")
def ours():
  model = AutoencoderKL(**SMALL, attention="xla")
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.encode))
  decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode))
  return model, encode, decode


def test_diffusers_parity(peer, ours):
  import torch
  vae, sd, x = peer
  model, encode, decode = ours
  params = convert_diffusers_vae(sd, expected=expected_vae_params(model))
  assert _count(params) == sum(v.size for v in sd.values())
  with torch.no_grad():
    dist = vae.encode(torch.from_numpy(nhwc_to_nchw(x).copy())).latent_dist
    z = dist.mean
    ref_dec = vae.decode(z).sample.numpy()
    ref_rec = vae(torch.from_numpy(nhwc_to_nchw(x).copy()), sample_posterior=False).sample.numpy()
  post = encode(params, x)
  z_nhwc = nchw_to_nhwc(z.numpy())
  errs = {
      "mean": max_rel_err(post.mean, z_nhwc),
      "logvar": max_rel_err(post.logvar, nchw_to_nhwc(dist.logvar.numpy())),
      "decode": max_rel_err(decode(params, jnp.asarray(z_nhwc)), nchw_to_nhwc(ref_dec)),
      "reconstruct": max_rel_err(jax.jit(model.apply)({"params": params}, x), nchw_to_nhwc(ref_rec)),
  }
  print("vae parity max_rel_err:", {k: f"{v:.2e}" for k, v in errs.items()})
  assert np.std(nchw_to_nhwc(ref_dec)) > 1e-2 and np.std(z_nhwc) > 1e-2  # a non-degenerate peer
  assert all(v <= 1e-4 for v in errs.values()), errs


def _to_ldm_name(key: str) -> str:
  """diffusers AutoencoderKL key -> CompVis LDM key, written out rule by rule for the test."""
  rules = [
      (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
      (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv."),
      (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
       lambda m: f"decoder.up.{LEVELS - 1 - int(m.group(1))}.block.{m.group(2)}."),
      (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.",
       lambda m: f"decoder.up.{LEVELS - 1 - int(m.group(1))}.upsample.conv."),
      (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
      (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
      (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
      (r"\.mid_block\.attentions\.0\.to_q\.", ".mid.attn_1.q."),
      (r"\.mid_block\.attentions\.0\.to_k\.", ".mid.attn_1.k."),
      (r"\.mid_block\.attentions\.0\.to_v\.", ".mid.attn_1.v."),
      (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
      (r"\.conv_shortcut\.", ".nin_shortcut."),
      (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
  ]
  for pattern, repl in rules:
    key = re.sub(pattern, repl, key)
  return key


def _ldm_state_dict(sd, prefix):
  out = {}
  for k, v in sd.items():
    name = _to_ldm_name(k)
    if ".attn_1." in name and name.endswith("weight") and v.ndim == 2:
      v = v[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
    out[prefix + name] = v
  return out


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_ldm_names_match_diffusers(peer, ours):
  _, sd, x = peer
  model, encode, decode = ours
  ref = convert_diffusers_vae(sd)
  ldm = _ldm_state_dict(sd, "first_stage_model.")
  assert "first_stage_model.encoder.mid.attn_1.q.weight" in ldm
  assert "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight" in ldm
  assert "first_stage_model.decoder.up.2.upsample.conv.weight" in ldm
  # The rest of a Lightning LDM checkpoint lies outside the prefix and is not the VAE's business.
  ldm["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((4, 3, 3, 3), np.float32)
  params = convert_ldm_vae(ldm, prefix="first_stage_model.", expected=expected_vae_params(model))
  _assert_trees_equal(params, ref)
  np.testing.assert_array_equal(encode(params, x).mean, encode(ref, x).mean)
  # A standalone autoencoder checkpoint (no prefix) may carry its training loss: skipped.
  bare = _ldm_state_dict(sd, "")
  bare["loss.logvar"] = np.zeros((), np.float32)
  _assert_trees_equal(convert_ldm_vae(bare), ref)


def test_legacy_diffusers_attention_names(peer):
  _, sd, _ = peer
  legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  legacy = {}
  for k, v in sd.items():
    for new, old in legacy_names.items():
      k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
    legacy[k] = v
  assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
  _assert_trees_equal(convert_diffusers_vae(legacy), convert_diffusers_vae(sd))


# --------------------------------------------------------------------------------------------- errors
def test_conversion_errors_name_the_key(peer, ours):
  _, sd, _ = peer
  model = ours[0]
  extra = dict(sd, **{"encoder.down_blocks.0.resnets.0.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(ConversionError, match=re.escape("encoder.down_blocks.0.resnets.0.extra.weight")):
    convert_diffusers_vae(extra)
  key = "encoder.down_blocks.1.resnets.1.conv1.weight"
  bad = dict(sd, **{key: np.zeros((64, 64, 1, 1), np.float32)})
  with pytest.raises(ConversionError, match=re.escape(key)):
    convert_diffusers_vae(bad)
  with pytest.raises(ConversionError, match=re.escape(key)):
    convert_diffusers_vae(bad, expected=expected_vae_params(model))
  missing = {k: v for k, v in sd.items() if k != "decoder.conv_norm_out.bias"}
  with pytest.raises(ConversionError, match=re.escape("decoder.conv_norm_out.bias")):
    convert_diffusers_vae(missing)
  ldm = _ldm_state_dict(sd, "first_stage_model.")
  ldm["first_stage_model.decoder.up.1.block.0.norm1.weight"] = np.ones(7, np.float32)
  with pytest.raises(ConversionError, match=re.escape("first_stage_model.decoder.up.1.block.0.norm1.weight")):
    convert_ldm_vae(ldm, prefix="first_stage_model.")
  # A checkpoint of a different depth than the network it is meant for.
  with pytest.raises(ConversionError, match="has no source"):
    convert_diffusers_vae(sd, expected=expected_vae_params(AutoencoderKL(**dict(SMALL, num_res_blocks=3))))
