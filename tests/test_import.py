"""Whole-checkpoint import of the published PyTorch weights (interop/ehrxdiff.py) on synthetic checkpoints
with the reference's key names and shapes: EHRXDiff Lightning .ckpt, Cheff autoencoder .pt, CLIP .ckpt."""
from __future__ import annotations

import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ehrxdiff_jax.config_util import apply_override, load_config  # noqa: E402
from ehrxdiff_jax.interop import ehrxdiff as ex  # noqa: E402
from ehrxdiff_jax.interop.clip import export_openai_visual, export_table_tower  # noqa: E402
from ehrxdiff_jax.interop.common import ConversionError, load_state_dict  # noqa: E402
from ehrxdiff_jax.interop.vae import export_ldm_vae  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# tiny.py made smaller still (the import tests never compile a network, the sample tests compile
# one), with what the reference's code fixes and no weight shows: GroupNorm(32), 8 UNet heads, tower
# head dim 64.
SMALL = ("model.unet.model_channels=64", "model.unet.channel_mult=(1, 2)",
         "model.unet.attention_levels=(1,)", "model.unet.num_heads=8", "model.unet.norm_groups=32",
         "model.vae.norm_groups=32", "model.image_tower.layers=1", "model.image_tower.heads=1",
         "model.table_tower.layers=1", "model.table_tower.heads=1")


def small_config(extra=()):
  cfg = load_config(os.path.join(ROOT, "configs", "tiny.py"))
  for item in SMALL + tuple(extra):
    apply_override(cfg, item)
  return cfg


def random_params(cfg, seed=0, std=0.05):
  """Random float32 numpy trees with the shapes of {'unet', 'conditioner', 'vae'} (no compile)."""
  rng = np.random.default_rng(seed)
  shapes = ex.expected_ldm_params(cfg)
  return jax.tree.map(lambda s: (rng.standard_normal(s.shape) * std).astype(np.float32), shapes)


def save_ckpt(path, sd):
  """A Lightning-style file: {'state_dict': {name: torch tensor}, 'epoch': ...} (torch.save)."""
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
  torch.save({"state_dict": tensors, "epoch": 3, "global_step": 1234}, path)
  return path


@pytest.fixture(scope="session")
def ref_ckpt(tmp_path_factory):
  """(config, params, ema params, path of the synthetic EHRXDiff .ckpt, its state dict)."""
  cfg = small_config()
  params = random_params(cfg, 0)
  ema = {"unet": random_params(cfg, 1)["unet"]}
  sd = ex.export_ehrxdiff_state_dict(params, ema, cfg, ema_num_updates=1234)
  path = save_ckpt(str(tmp_path_factory.mktemp("ref") / "ehrxdiff.ckpt"), sd)
  return cfg, params, ema, path, sd


def _same(a, b):
  fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [k for k, _ in fa] == [k for k, _ in fb]
  for (k, x), (_, y) in zip(fa, fb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(k))


def test_reference_key_names(ref_ckpt):
  """The synthetic checkpoint has the reference's names (spot checks written out by hand)."""
  cfg, params, ema, path, sd = ref_ckpt
  for key in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.time_embed.2.bias",
              "model.diffusion_model.input_blocks.2.0.op.weight",  # the downsample after level 0 (1 res block)
              "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight",
              "model.diffusion_model.middle_block.1.proj_in.weight", "model.diffusion_model.out.2.weight",
              "model_ema.diffusion_modelinput_blocks00weight", "model_ema.decay", "model_ema.num_updates",
              "first_stage_model.encoder.down.0.block.0.conv1.weight", "first_stage_model.decoder.mid.attn_1.q.weight",
              "first_stage_model.post_quant_conv.weight",
              "cond_stage_model.clip_img_encoder.conv1.weight", "cond_stage_model.clip_img_encoder.ln_post.weight",
              "cond_stage_model.clip_img_encoder.transformer.resblocks.0.attn.in_proj_weight",
              "cond_stage_model.clip_tab_encoder.transformer.layers.0.self_attn.in_proj_weight",
              "cond_stage_model.clip_tab_encoder.fc.weight", "cond_stage_model.vae_projector.weight",
              "cond_stage_model.adaptor.weight", "cond_stage_model.autoencoder.encoder.conv_in.weight",
              "betas", "alphas_cumprod", "posterior_mean_coef2"):
    assert key in sd, key
  assert sd["model.diffusion_model.middle_block.1.proj_in.weight"].ndim == 4  # LDM: 1x1 Conv2d
  assert sd["cond_stage_model.adaptor.weight"].shape == (32, 32 + 17 + 3)  # Linear(n_tokens, 32): events + 1+4x4 patches + z tokens
  assert sd["cond_stage_model.vae_projector.weight"].shape == (64, 16 * 16)  # Linear(h*w, D)
  assert not any(k.startswith("model_ema.") and "." in k[len("model_ema."):] for k in sd)  # LitEma: no dots


def test_import_equals_source(ref_ckpt):
  cfg, params, ema, path, sd = ref_ckpt
  loaded = load_state_dict(path)  # torch.load(weights_only=True) of the Lightning file
  assert set(loaded) == set(sd)
  out = ex.import_ehrxdiff(loaded, cfg)
  _same(out.params, params)
  _same(out.ema_params, ema)
  assert out.info["has_ema"] and out.info["num_updates"] == 1234 and abs(out.info["decay"] - 0.999) < 1e-6
  # Layout transposes, written out: NCHW conv -> HWIO, Linear (out, in) -> (in, out), fused in_proj split.
  p = out.params
  np.testing.assert_array_equal(p["unet"]["conv_in"]["kernel"],
                                sd["model.diffusion_model.input_blocks.0.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p["unet"]["time_embed_1"]["kernel"], sd["model.diffusion_model.time_embed.2.weight"].T)
  np.testing.assert_array_equal(p["unet"]["mid_attn"]["proj_in"]["kernel"],
                                sd["model.diffusion_model.middle_block.1.proj_in.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(out.ema_params["unet"]["conv_out"]["kernel"],
                                sd["model_ema.diffusion_modelout2weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p["vae"]["decoder"]["mid_attn_1"]["q"]["kernel"],
                                sd["first_stage_model.decoder.mid.attn_1.q.weight"][:, :, 0, 0].T)
  w = sd["cond_stage_model.clip_tab_encoder.transformer.layers.0.self_attn.in_proj_weight"]
  d = w.shape[1]
  np.testing.assert_array_equal(p["conditioner"]["table_tower"]["layer_0"]["self_attn"]["k"]["kernel"], w[d:2 * d].T)
  np.testing.assert_array_equal(p["conditioner"]["adapter"]["kernel"], sd["cond_stage_model.adaptor.weight"].T)
  np.testing.assert_array_equal(p["conditioner"]["image_tower"]["patch_embed"]["kernel"],
                                sd["cond_stage_model.clip_img_encoder.conv1.weight"].transpose(2, 3, 1, 0))
  assert "ln_post" not in p["conditioner"]["image_tower"]  # the reference's unused ln_post is skipped
  # Without a config the weights are checked against the networks their own shapes describe.
  _same(ex.import_ehrxdiff(loaded).params, params)
  assert ex.import_ehrxdiff(loaded, cfg, ema=False).ema_params is None


def test_leftover_keys_are_errors(ref_ckpt):
  cfg, _, _, _, sd = ref_ckpt
  extra = np.zeros((3,), np.float32)
  for key in ("cond_stage_model.clip_tab_encoder.extra.weight", "model.diffusion_model.input_blocks.99.0.foo",
              "first_stage_model.encoder.bogus.weight", "model_ema.something_else", "model.other_module.weight",
              "some_buffer"):
    with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
      ex.import_ehrxdiff(dict(sd, **{key: extra}), cfg)


def test_missing_keys_are_errors(ref_ckpt):
  cfg, _, _, _, sd = ref_ckpt
  for key in ("model.diffusion_model.out.2.weight", "first_stage_model.decoder.conv_out.bias",
              "cond_stage_model.clip_tab_encoder.fc.weight", "cond_stage_model.adaptor.bias",
              "model_ema.diffusion_modelmiddle_block1proj_outweight"):
    broken = {k: v for k, v in sd.items() if k != key}
    with pytest.raises(ConversionError) as e:
      ex.import_ehrxdiff(broken, cfg)
    assert key.rsplit(".", 1)[0].replace("model_ema.", "") in str(e.value) or key in str(e.value), str(e.value)
  no_vae = {k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}
  with pytest.raises(ConversionError, match="first_stage_model"):
    ex.import_ehrxdiff(no_vae, cfg)


def test_config_mismatch_names_both_values(ref_ckpt):
  _, _, _, _, sd = ref_ckpt
  with pytest.raises(ex.ConfigMismatch, match=r"model\.unet\.model_channels: the checkpoint has 64, the config has 32"):
    ex.import_ehrxdiff(sd, small_config(["model.unet.model_channels=32"]))
  with pytest.raises(ex.ConfigMismatch, match=r"model\.table_tower\.event_dim: the checkpoint has 64, the config has 48"):
    ex.import_ehrxdiff(sd, small_config(["model.table_tower.event_dim=48"]))
  with pytest.raises(ex.ConfigMismatch, match=r"max_events: the checkpoint has 32, the config has 16"):
    ex.import_ehrxdiff(sd, small_config(["model.conditioner.max_events=16"]))
  with pytest.raises(ex.ConfigMismatch, match="noise schedule"):
    ex.import_ehrxdiff(sd, small_config(["diffusion.linear_end=0.012"]))


def test_conditioner_vae_copy_must_match(ref_ckpt):
  cfg, params, _, _, sd = ref_ckpt
  key = "cond_stage_model.autoencoder.decoder.conv_out.bias"
  changed = dict(sd, **{key: sd[key] + 1.0})
  with pytest.raises(ConversionError, match="cond_stage_model.autoencoder"):
    ex.import_ehrxdiff(changed, cfg)
  out = ex.import_ehrxdiff(changed, cfg, vae_mismatch="warn")
  _same(out.params["vae"], params["vae"])  # first_stage_model's VAE is the one used
  # A checkpoint without the conditioner's copy (and without EMA / schedule buffers) also imports.
  bare = {k: v for k, v in sd.items() if not k.startswith(("cond_stage_model.autoencoder.", "model_ema."))
          and k not in ex.SCHEDULE_BUFFERS}
  out = ex.import_ehrxdiff(bare, cfg)
  assert out.ema_params is None


def test_cheff_vae_and_clip_files(ref_ckpt, tmp_path):
  cfg, params, _, _, _ = ref_ckpt
  vae_sd = export_ldm_vae(params["vae"])
  vae_sd["loss.logvar"] = np.zeros((), np.float32)  # the training loss of the autoencoder: skipped
  path = str(tmp_path / "cheff.pt")
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in vae_sd.items()}, path)
  out = ex.load_torch_weights(path, None, cfg)
  assert out.info["kind"] == "cheff-vae"
  _same(out.params["vae"], params["vae"])
  with pytest.raises(ConversionError, match="encoder.stray"):
    ex.import_cheff_vae(dict(vae_sd, **{"encoder.stray.weight": np.zeros(2, np.float32)}), cfg)

  towers = params["conditioner"]
  clip_sd = {"model.visual." + k: v for k, v in export_openai_visual(towers["image_tower"]).items()}
  clip_sd.update({"model.transformer." + k: v for k, v in export_table_tower(towers["table_tower"]).items()})
  clip_sd["model.logit_scale"] = np.asarray(2.5, np.float32)
  clip_sd["model.ln_final.weight"] = np.ones(8, np.float32)  # OpenAI text-tower remnants: skipped
  path = str(tmp_path / "clip.ckpt")
  save_ckpt(path, clip_sd)
  out = ex.load_torch_weights(path, None, cfg)
  assert out.info["kind"] == "clip" and float(out.params["logit_scale"]) == 2.5
  _same(out.params["table_tower"], towers["table_tower"])
  img = dict(out.params["image_tower"])
  assert "ln_post" in img
  img.pop("ln_post")
  _same(img, towers["image_tower"])
  with pytest.raises(ex.ConfigMismatch, match="table_tower.event_dim"):
    ex.import_clip(clip_sd, small_config(["model.table_tower.event_dim=48"]))


def test_fields_the_weights_do_not_show_are_refused(ref_ckpt):
  """GroupNorm groups and head counts are in no weight shape: a config that differs from what the
  reference's code fixes is refused naming the field and both values (GroupNorm(8) and 4 heads used
  to import silently)."""
  cfg, params, _, _, sd = ref_ckpt
  with pytest.raises(ex.ConfigMismatch) as e:
    ex.import_ehrxdiff(sd, small_config(["model.unet.norm_groups=8", "model.vae.norm_groups=16"]))
  assert ("model.unet.norm_groups: the weights do not show it and the reference hard-codes "
          "GroupNorm(32): 32, the config has 8") in str(e.value)
  assert "model.vae.norm_groups" in str(e.value) and "the config has 16" in str(e.value)
  with pytest.raises(ex.ConfigMismatch,
                     match=r"model\.vae\.norm_groups: .*GroupNorm\(32\): 32, the config has 16"):
    ex.import_cheff_vae(export_ldm_vae(params["vae"]), small_config(["model.vae.norm_groups=16"]))
  # The norm groups cannot be stated away: the reference has no other.
  with pytest.raises(ex.ConfigMismatch, match=r"model\.unet\.norm_groups"):
    ex.import_ehrxdiff(sd, small_config(["model.unet.norm_groups=8"]), heads="config")

  four = small_config(["model.unet.num_heads=4", "model.table_tower.heads=2"])
  with pytest.raises(ex.ConfigMismatch) as e:
    ex.import_ehrxdiff(sd, four)
  msg = str(e.value)
  assert "model.unet.num_heads: the weights do not show it and the reference's UNet has 8 heads" \
      in msg
  assert ": 8, the config has 4" in msg and "heads='config'" in msg
  assert ("model.table_tower.heads: the weights do not show it and the reference's towers have "
          "head dim 64 (event_dim 64): 1, the config has 2") in msg
  assert "model.image_tower.heads" not in msg  # 1 head at width 64, as the config says
  # Stated explicitly (the checkpoint was trained with other heads), the config's values are taken
  _same(ex.import_ehrxdiff(sd, four, heads="config").params, params)
  stated = {"model.unet.num_heads": 4, "model.table_tower.heads": 2}
  _same(ex.import_ehrxdiff(sd, four, heads=stated).params, params)
  # ... and a stated value is still checked against the config.
  with pytest.raises(ex.ConfigMismatch,
                     match=r"model\.unet\.num_heads: .*stated by the caller: 2, the config has 4"):
    ex.import_ehrxdiff(sd, four, heads={"model.unet.num_heads": 2, "model.table_tower.heads": 2})
  with pytest.raises(ValueError, match="unknown fields"):
    ex.import_ehrxdiff(sd, four, heads={"model.unet.heads": 4})


def test_head_counts_the_reference_layout_cannot_have_must_be_stated():
  """A width that the reference's layout cannot split (UNet: 8 heads; towers: head dim 64) has no
  reference head count: the import asks for it."""
  fields = {"model.unet.model_channels": 36, "model.unet.channel_mult": (1, 3),
            "model.unet.attention_levels": (1,), "model.image_tower.width": 96,
            "model.table_tower.event_dim": 128}
  unseen = ex.unseen_fields(fields)
  assert unseen["model.unet.num_heads"][0] is None        # 108 channels at level 1 / 8: not whole
  assert unseen["model.image_tower.heads"][0] is None     # 96 is not a multiple of 64
  assert unseen["model.table_tower.heads"][0] == 2
  assert unseen["model.unet.norm_groups"][0] == 32 and "model.vae.norm_groups" not in unseen
  cfg = small_config(["model.unet.model_channels=36", "model.unet.channel_mult=(1, 3)",
                      "model.image_tower.width=96", "model.table_tower.event_dim=128"])
  with pytest.raises(ex.ConfigMismatch) as e:
    ex.check_fields(None, cfg, fields=fields)
  assert ("model.unet.num_heads: the weights do not show it and the reference's UNet has 8 heads "
          "(head dim = channels / 8; attention widths [108, 108]) cannot give it; state the "
          "checkpoint's head count") in str(e.value)
  assert "model.image_tower.heads" in str(e.value) and "model.table_tower.heads" in str(e.value)
  ex.check_fields(None, cfg, fields=fields, heads={"model.unet.num_heads": 8,
                                                   "model.image_tower.heads": 1,
                                                   "model.table_tower.heads": 1})
