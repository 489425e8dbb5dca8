"""Cached VAE latents: `ehrxdiff prepare --vae-checkpoint` -> records -> loader -> the LDM objective."""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_prep import latents, synthetic
from ehrxdiff_jax import batch_format, models, pipeline
from micro import micro_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = 5
S, D, E = 32, 16, 8   # image size, event dim, max events of the micro config (quick compiles)


def random_params(abstract, seed: int):
  """Parameters of the shapes of `abstract` (jax.eval_shape of an init: nothing compiled): kernels
  N(0, 1/fan_in), norm scales 1, biases 0 -- an untrained network with well-scaled activations."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = jax.tree_util.keystr(path[-1:])
    if "kernel" in name or "embedding" in name:
      fan_in = int(np.prod(x.shape[:-1])) or 1
      return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(np.float32)
    return np.full(x.shape, 1.0 if "scale" in name else 0.0, np.float32)
  return jax.tree_util.tree_map_with_path(leaf, nn.unbox(abstract))


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
  """A micro VAE run (configs/vae.py:tiny at tests/micro.py's sizes): WORKDIR/config.json + an orbax checkpoint at step 5 holding
  params['vae'], the layout `ehrxdiff train` writes and `train.vae.load_vae_params` reads."""
  from ehrxdiff_jax.commands.train import config_dict
  from ehrxdiff_jax.config_util import load_config
  from ehrxdiff_jax.train.checkpoint import Checkpointer
  cfg = micro_config(load_config(os.path.join(ROOT, "configs", "vae.py:tiny")))
  vae = models.build_vae(cfg)
  s = cfg.data.image_size
  params = random_params(jax.eval_shape(lambda: vae.init(jax.random.key(1), jnp.zeros((1, s, s, 3)))["params"]), 1)
  workdir = str(tmp_path_factory.mktemp("vae_run"))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config_dict(cfg), f)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  ckpt.save(STEP, {"params": {"vae": params}, "step": np.int32(STEP)})
  ckpt.close()
  return workdir, cfg, params


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, vae_run):
  from test_prepare import run_prepare
  root = str(tmp_path_factory.mktemp("cached"))
  synthetic.generate(os.path.join(root, "db"), patients=8, seed=0, progress=False)
  iv, cxr = os.path.join(root, "db", "mimic-iv"), os.path.join(root, "db", "mimic-cxr")
  out = os.path.join(root, "ds")
  assert run_prepare(iv, cxr, out, "--image-size", str(S), "--event-dim", str(D), "--split-fractions", "1,0,0",
                     "--vae-checkpoint", vae_run[0], "--latents-batch", "8") == 0
  return out, (iv, cxr)


@pytest.fixture(scope="module")
def encode(vae_run):
  _, cfg, params = vae_run
  vae = models.build_vae(cfg)
  f = jax.jit(lambda x: vae.apply({"params": params}, x, method=vae.encode).moments)
  return lambda u8: np.asarray(f(np.repeat((u8.astype(np.float32) * (2 / 255) - 1)[..., None], 3, -1)))


def test_manifest_names_the_vae(dataset, vae_run):
  out, _ = dataset
  man = pipeline.read_manifest(out)
  lat = man["latents"]
  assert lat["source"] == os.path.abspath(vae_run[0]) and lat["step"] == STEP
  assert lat["fingerprint"] == latents.params_fingerprint(vae_run[2])
  assert lat["shape"] == [16, 16, 3] and lat["image_size"] == S
  assert lat["fields"] == ["target_moments", "prev_mean", "prev_logvar"]
  # [mean, std] of z ~ q(z | I) over the encoded images, against a direct sampling estimate.
  src = pipeline.data_source(out, "train")
  moments = np.concatenate([src[i]["target_moments"][None] for i in range(len(src))]).astype(np.float64)
  mean, logvar = moments[..., :3], moments[..., 3:]
  z = mean + np.exp(0.5 * logvar) * np.random.RandomState(0).standard_normal((64,) + mean.shape)
  assert lat["mean_std"][1] == pytest.approx(z.std(), rel=0.05)
  assert lat["mean_std"][0] == pytest.approx(z.mean(), abs=0.05 * z.std())


def test_records_hold_the_moments_of_their_images(dataset, encode):
  out, _ = dataset
  src = pipeline.data_source(out, "train")
  for i in (0, len(src) // 2, len(src) - 1):
    r = src[i]
    assert r["target_moments"].dtype == np.float16 and r["target_moments"].shape == (16, 16, 6)
    assert r["prev_mean"].shape == (16, 16, 3) and r["prev_logvar"].shape == (16, 16, 3)
    trg, prev = encode(np.stack([r["target_image"], r["prev_image"]]))
    np.testing.assert_allclose(r["target_moments"].astype(np.float32), trg, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(r["prev_mean"].astype(np.float32), prev[..., :3], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(r["prev_logvar"].astype(np.float32), prev[..., 3:], rtol=1e-3, atol=1e-3)


def _batch(out, **data):
  cfg = {**dict(image_size=S, w_null=False, augment_target=False, cached_latents=False, num_workers=0), **data}
  loader = pipeline.make_loader(out, "train", global_batch_size=4, config_data=cfg, seed=0, shuffle=False,
                                max_events=E, process_index=0, process_count=1)
  return next(iter(loader))


def test_loader_and_ldm_loss_match_the_images_path(dataset, vae_run, tiny_config):
  out, _ = dataset
  cached = _batch(out, cached_latents=True)
  assert cached["target_moments"].shape == (4, 16, 16, 6) and cached["target_moments"].dtype == np.float32
  assert cached["prev_mean"].shape == (4, 16, 16, 3)
  images = _batch(out)
  assert "target_moments" not in images and list(images["key"]) == list(cached["key"])

  from ehrxdiff_jax.train.ldm import LDMObjective
  cfg = micro_config(tiny_config)
  cfg.data.cached_latents = True
  objective = LDMObjective(cfg)
  params = random_params(jax.eval_shape(lambda: models.init_ldm(cfg, jax.random.key(0))), 0)
  params = {**params, "vae": vae_run[2]}
  latents.check_dataset_latents(pipeline.read_manifest(out), cfg, params["vae"])
  loss = jax.jit(lambda p, b: objective.loss(p, batch_format.to_device(b), jax.random.key(7), train=False)[0])
  keep = ("prev_image", "target_image", "events", "event_mask")
  l_img = float(loss(params, {k: images[k] for k in keep}))
  l_lat = float(loss(params, {k: cached[k] for k in keep + ("target_moments", "prev_mean")}))
  assert np.isfinite(l_img) and l_lat == pytest.approx(l_img, rel=1e-3)


def test_w_null_uses_the_moments_of_the_previous_image(dataset):
  out, _ = dataset
  n = pipeline.read_manifest(out)["splits"]["train"]["samples"]
  cfg = dict(image_size=S, w_null=True, augment_target=False, cached_latents=True, num_workers=0)
  loader = pipeline.make_loader(out, "train", global_batch_size=1, config_data=cfg, seed=0, shuffle=False,
                                max_events=E, process_index=0, process_count=1)
  it = iter(loader)
  for _ in range(n):  # the real samples come first without shuffling
    next(it)
  b = next(it)
  assert b["is_null"][0]
  key = bytes(b["key"][0]).decode().removeprefix("null_")
  src = pipeline.data_source(out, "train")
  r = next(src[i] for i in range(len(src)) if src[i]["meta"]["key"] == key)
  want = np.concatenate([r["prev_mean"], r["prev_logvar"]], -1).astype(np.float32)
  np.testing.assert_array_equal(b["target_moments"][0], want)
  np.testing.assert_array_equal(b["prev_mean"][0], r["prev_mean"].astype(np.float32))
  with pytest.raises(ValueError, match="augment_target"):
    pipeline.make_loader(out, "train", global_batch_size=1, config_data=dict(cfg, augment_target=True),
                         process_index=0, process_count=1)


def test_mismatches_are_refused(dataset, vae_run, tiny_config, tmp_path, capsys):
  out, (iv, cxr) = dataset
  man = pipeline.read_manifest(out)
  other = jax.tree.map(lambda x: x + 1, vae_run[2])
  cfg = micro_config(tiny_config)
  with pytest.raises(ValueError, match="another VAE"):
    latents.check_dataset_latents(man, cfg, other)
  big = cfg.copy_and_resolve_references()
  big.data.image_size = 2 * S
  with pytest.raises(ValueError, match=r"\[32, 32, 3\]"):
    latents.check_dataset_latents(man, big)
  with pytest.raises(ValueError, match="no cached latents"):
    latents.check_dataset_latents({k: v for k, v in man.items() if k != "latents"}, cfg)
  # a dataset image size the VAE was not made for fails before any table is read
  from test_prepare import run_prepare
  assert run_prepare(iv, cxr, str(tmp_path / "ds"), "--image-size", "64", "--vae-checkpoint", vae_run[0]) == 2
  assert "32 px images, the dataset is 64 px" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "ds")
