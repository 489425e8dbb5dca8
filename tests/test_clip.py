"""CLIP pretraining: the contrastive loss against numpy (incl. an 8-device global batch), the logit-scale
clamp, the image-tower init with positional-embedding adaptation, RandomResizedCrop, the warm-up + cosine
schedule with restarts, resume, and loading the CLIP towers into the conditioner."""
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ehrxdiff_jax import augment, batch_format, models, parallel
from ehrxdiff_jax.config_util import load_config
from ehrxdiff_jax.train import clip as clip_lib
from ehrxdiff_jax.train import loop
from ehrxdiff_jax.train import state as state_lib
from ehrxdiff_jax.train.checkpoint import Checkpointer
from ehrxdiff_jax.train.state import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def clip_cfg(overrides=()):
  base = ["--config.train.batch_size=16", "--config.train.log_every=2", "--config.train.ckpt_every=2",
          "--config.train.eval_every=0", "--config.train.num_steps=4", "--config.train.warmup_steps=1"]
  return load_config(os.path.join(ROOT, "configs", "clip.py:tiny"), base + list(overrides))


def np_contrastive(u, v, s):
  u = u / np.linalg.norm(u, axis=1, keepdims=True)
  v = v / np.linalg.norm(v, axis=1, keepdims=True)
  logits = np.exp(min(max(s, -np.log(100)), np.log(100))) * (u.astype(np.float64) @ v.T.astype(np.float64))

  def ce(lg):  # rows are the predictions, target = the diagonal
    m = lg.max(axis=1, keepdims=True)
    lse = np.log(np.exp(lg - m).sum(axis=1)) + m[:, 0]
    return np.mean(lse - np.diag(lg))

  n = len(u)
  return (0.5 * (ce(logits) + ce(logits.T)), np.mean(logits.argmax(1) == np.arange(n)),
          np.mean(logits.argmax(0) == np.arange(n)))


@pytest.fixture(scope="module")
def mesh8():
  assert jax.device_count() == 8
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))  # as parallel.make_mesh


def test_contrastive_loss_matches_numpy_on_a_sharded_global_batch(mesh8):
  rng = np.random.default_rng(0)
  u = rng.normal(size=(16, 8)).astype(np.float32)
  v = (u + rng.normal(size=(16, 8)) * 1.5).astype(np.float32)
  s = np.float32(np.log(1 / 0.07))
  want, acc_i, acc_e = np_contrastive(u, v, s)
  sh = NamedSharding(mesh8, P("data"))
  fn = jax.jit(clip_lib.contrastive_loss)
  loss, m = fn(jax.device_put(u, sh), jax.device_put(v, sh), s)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(m["acc_img2ev"]), acc_i)
  np.testing.assert_allclose(float(m["acc_ev2img"]), acc_e)
  # a per-device loss (negatives only within each device's 2 rows) is a different number
  per_device = np.mean([np_contrastive(u[i:i + 2], v[i:i + 2], s)[0] for i in range(0, 16, 2)])
  assert abs(per_device - want) > 1e-2


def test_logit_scale_is_clamped_at_ln_100():
  rng = np.random.default_rng(1)
  u, v = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(6, 4)).astype(np.float32)
  big = jnp.float32(np.log(100) + 1.0)
  loss, m = clip_lib.contrastive_loss(u, v, big)
  np.testing.assert_allclose(float(m["logit_scale"]), 100.0, rtol=1e-6)
  np.testing.assert_allclose(float(loss), np_contrastive(u, v, np.log(100))[0], rtol=1e-5)
  g = jax.grad(lambda s: clip_lib.contrastive_loss(u, v, s)[0])(big)
  assert float(g) == 0.0
  obj = clip_lib.make_objective(clip_cfg())
  out = obj.post_update({"logit_scale": big, "image_tower": {}})
  np.testing.assert_allclose(float(out["logit_scale"]), np.log(100), rtol=1e-6)
  assert obj.logit_scale_init == pytest.approx(np.log(1 / 0.07))


def test_random_resized_crop_matches_a_direct_crop_and_resize():
  rng = np.random.default_rng(2)
  img = jnp.asarray(rng.uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)
  key = jax.random.key(0)
  out = jax.jit(lambda x, k: augment.random_resized_crop(x, k, 32, scale=(0.5, 1.0)))(img, key)
  boxes = np.asarray(augment.crop_boxes(key, 4, 32, 32, (0.5, 1.0)))
  assert out.shape == img.shape
  assert np.all(boxes[:, 2] == boxes[:, 3])                                 # ratio 1: square crops
  assert np.all(boxes[:, 2] ** 2 >= 0.5 * 32 * 32 - 32) and np.all(boxes[:, 2] <= 32)
  assert np.all(boxes[:, 0] + boxes[:, 2] <= 32) and np.all(boxes[:, 1] + boxes[:, 3] <= 32)
  assert len({tuple(b) for b in boxes}) > 1                                  # per-sample randomness
  for i, (t, l, h, w) in enumerate(boxes):                                   # interior equals crop+resize
    crop = img[i, t:t + h, l:l + w]
    ref = jax.image.resize(crop, (32, 32, 3), "linear", antialias=False)
    np.testing.assert_allclose(np.asarray(out[i])[2:-2, 2:-2], np.asarray(ref)[2:-2, 2:-2], atol=1e-5)
  full = augment.resize_crops(img, jnp.asarray([[0, 0, 32, 32]] * 4), 32)  # the whole image: identity
  np.testing.assert_allclose(np.asarray(full), np.asarray(img), atol=1e-6)


@pytest.fixture(scope="module")
def trainer():
  cfg = clip_cfg()
  obj = clip_lib.make_objective(cfg)
  return loop.Trainer(cfg, obj, parallel.make_mesh(cfg))


def test_objective_loss_uses_the_global_batch(trainer):
  """objective.loss on a batch sharded over 8 devices == numpy InfoNCE over the per-sample embeddings."""
  obj = trainer.objective
  state = trainer.init_state()
  host = loop.SyntheticBatches(obj.dummy_batch(1), 16, seed=3).batch(0)
  batch = trainer.put_batch(host)
  rng = jax.random.key(5)
  with jax.set_mesh(trainer.mesh):
    loss, m = jax.jit(lambda p, b: obj.loss(p, batch_format.to_device(b), rng, train=False))(state.params, batch)
  params = jax.device_get(state.params)
  img, tab = obj.embeddings(params, batch_format.to_device({k: jnp.asarray(v) for k, v in host.items()}), rng,
                            train=False)
  want, acc_i, acc_e = np_contrastive(np.asarray(img), np.asarray(tab), float(params["logit_scale"]))
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)
  np.testing.assert_allclose(float(m["acc_img2ev"]), acc_i)
  assert batch["events"].sharding.spec[0] == parallel.BATCH_AXES


def reference_lr(step, lr, warmup, cycle):
  """CosineAnnealingWarmupRestarts(first_cycle_steps=cycle, warmup_steps=warmup, cycle_mult=1, min_lr=0),
  stepped once per optimisation step (the reference CLIP pretraining), at optimisation step `step`."""
  k = step % cycle
  if k < warmup:
    return lr * k / warmup
  return lr * (1 + math.cos(math.pi * (k - warmup) / (cycle - warmup))) / 2


def test_cosine_restarts_schedule_matches_the_reference(trainer):
  full = load_config(os.path.join(ROOT, "configs", "clip.py")).train
  assert (full.schedule, full.restart_every, full.warmup_steps) == ("cosine_restarts", 500, 100)
  assert full.learning_rate == 5e-4
  _, schedule = state_lib.make_optimizer(full)
  steps = [0, 1, 50, 99, 100, 101, 300, 498, 499, 500, 501, 599, 600, 601, 1234, 9999, 10_000, 25_123]
  np.testing.assert_allclose([float(schedule(k)) for k in steps], [reference_lr(k, 5e-4, 100, 500) for k in steps],
                             rtol=1e-5, atol=1e-11)
  assert float(schedule(499)) < 1e-8 and float(schedule(500)) == 0.0 and float(schedule(600)) == pytest.approx(5e-4)
  # the trainer's schedule (tiny: lr 1e-3, warm-up 1 per the test config, cycles of 50), jitted as in the step
  t = trainer.cfg.train
  assert (t.schedule, t.restart_every, t.warmup_steps) == ("cosine_restarts", 50, 1)
  steps = np.array([0, 1, 2, 25, 49, 50, 51, 99, 100, 101])
  np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(trainer.schedule))(steps)),
                             [reference_lr(int(k), t.learning_rate, 1, 50) for k in steps], rtol=1e-5, atol=1e-11)
  with pytest.raises(ValueError, match="restart_every"):
    state_lib.learning_rate_schedule(clip_cfg(["--config.train.restart_every=1"]).train)


def _run(trainer, workdir, steps, resume):
  ck = Checkpointer(os.path.join(workdir, "checkpoints"), keep=5, async_save=False)
  it = loop.SyntheticBatches(trainer.objective.dummy_batch(1), trainer.global_batch, seed=7)
  if resume:
    state, _ = ck.restore(trainer.abstract_state(), data_iter=it)
  else:
    state = trainer.init_state()
  state = loop.fit(trainer, state, it, num_steps=steps, workdir=workdir, checkpointer=ck, progress=False)
  ck.close()
  return jax.device_get(state)


def test_resume_equals_uninterrupted_and_towers_load_into_the_conditioner(trainer, tmp_path):
  full = _run(trainer, str(tmp_path / "a"), 4, resume=False)
  _run(trainer, str(tmp_path / "b"), 2, resume=False)
  resumed = _run(trainer, str(tmp_path / "b"), 4, resume=True)
  assert int(resumed.step) == 4
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(a, b)

  # The CLIP run initialises the LDM conditioner (train.init_from) and the loaded towers are exact.
  towers = clip_lib.load_clip_towers(str(tmp_path / "a"))
  assert "ln_post" not in towers["image_tower"]
  np.testing.assert_array_equal(towers["table_tower"]["fc"]["kernel"], full.params["table_tower"]["fc"]["kernel"])
  ldm_cfg = load_config(os.path.join(ROOT, "configs", "tiny.py"))
  cond = models.build_conditioner(ldm_cfg)
  b = models.dummy_batch(ldm_cfg, 1)
  h, w, c = models.latent_shape(ldm_cfg)
  init = jax.jit(lambda r: nn.unbox(cond.init(r, b["prev_image"], jnp.zeros((1, h, w, c)), b["events"],
                                              b["event_mask"])["params"]))
  fresh = TrainState(step=jnp.zeros((), jnp.int32), params={"conditioner": init(jax.random.key(0))},
                     opt_state={}, ema_params={}, rng=jax.random.key(1))
  loaded = clip_lib.clip_init_state(fresh, str(tmp_path / "a"), part="conditioner")   # the LDM's init_from
  params = jax.device_get(loaded.params["conditioner"])
  for part in ("image_tower", "table_tower"):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(params[part])[0],
                            jax.tree.leaves(towers[part])):
      np.testing.assert_array_equal(np.asarray(x), y, err_msg=str(path))
  np.testing.assert_array_equal(params["adapter"]["kernel"], np.asarray(fresh.params["conditioner"]["adapter"]["kernel"]))


def test_image_tower_init_from_a_transformers_clip_vision_state_dict(tmp_path):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  from safetensors.torch import save_file

  from ehrxdiff_jax.interop.clip import adapt_position_embedding
  torch.manual_seed(0)
  hf_cfg = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, image_size=32, patch_size=16)
  sd = {k: v.contiguous() for k, v in transformers.CLIPVisionModel(hf_cfg).state_dict().items()}
  path = str(tmp_path / "vision.safetensors")
  save_file(sd, path)
  cfg = clip_cfg([f"--config.train.clip_vision_init={path}"])    # clip_pos_embed='interpolate'
  obj = clip_lib.make_objective(cfg)                 # tiny: 64 px, patch 16 -> grid 4 (the file has grid 2)
  params = jax.jit(lambda r: nn.unbox(obj.init_params(r)))(jax.random.key(0))
  img = params["image_tower"]
  prefix = "vision_model." if any(k.startswith("vision_model.") for k in sd) else ""
  pos = sd[prefix + "embeddings.position_embedding.weight"].numpy()
  assert pos.shape == (5, 64) and img["positional_embedding"].shape == (17, 64)
  np.testing.assert_allclose(np.asarray(img["positional_embedding"]), adapt_position_embedding(pos, 4), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(img["blocks_1"]["fc1"]["kernel"]),
                                sd[prefix + "encoder.layers.1.mlp.fc1.weight"].numpy().T)
  np.testing.assert_array_equal(np.asarray(img["ln_post"]["scale"]), sd[prefix + "post_layernorm.weight"].numpy())
  # 'reinit' (the reference): everything but the positional embedding, which stays freshly initialised
  reinit = clip_lib.vision_init_params(path, 4, "reinit")
  assert "positional_embedding" not in reinit
  np.testing.assert_array_equal(reinit["blocks_1"]["fc1"]["kernel"], np.asarray(img["blocks_1"]["fc1"]["kernel"]))
  with pytest.raises(ValueError):
    clip_lib.vision_init_params(path, 4, "nope")
