"""Table-classifier baselines: the prev-label token, the NaN-masked BCE, init from a CLIP checkpoint,
resume, and the grouped AUROC over a split."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ehrxdiff_jax import parallel
from ehrxdiff_jax.config_util import load_config
from ehrxdiff_jax.nn.table import TableTower
from ehrxdiff_jax.train import classifier as cls
from ehrxdiff_jax.train import loop
from ehrxdiff_jax.train.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN = np.nan


def cls_cfg(variant="tiny_prev_label", overrides=()):
  base = ["--config.train.log_every=2", "--config.train.ckpt_every=2", "--config.train.eval_every=0",
          "--config.train.num_steps=4"]
  return load_config(os.path.join(ROOT, "configs", f"table_classifier.py:{variant}"), base + list(overrides))


def test_prev_label_token_averages_the_positive_labels():
  embs = np.arange(1, 41, dtype=np.float32).reshape(10, 4)
  prev = np.zeros((3, 10), np.float32)
  prev[0, [1, 4]] = 1.0
  prev[0, 7] = NAN                 # unknown: not positive
  prev[2, :] = NAN                 # nothing known: zero token
  tok = np.asarray(cls.prev_label_token(jnp.asarray(prev), jnp.asarray(embs), "positives"))
  np.testing.assert_allclose(tok[0], (embs[1] + embs[4]) / 2)
  np.testing.assert_array_equal(tok[1], 0.0)
  np.testing.assert_array_equal(tok[2], 0.0)
  ref = np.asarray(cls.prev_label_token(jnp.asarray(prev), jnp.asarray(embs), "all"))
  np.testing.assert_allclose(ref[0], (embs[1] + embs[4]) / 10)   # the reference: mean over all 10 slots

  model = cls.TableClassifier(event_dim=4, heads=1, ff_dim=8, layers=1, prev_label=True)
  events = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5, 4)), jnp.float32)
  mask = jnp.asarray(np.arange(5)[None] < np.array([[2], [0], [5]]))
  x, m = model.tokens(events, mask, jnp.asarray(prev), jnp.asarray(embs))
  assert x.shape == (3, 6, 4) and m.shape == (3, 6)
  np.testing.assert_allclose(np.asarray(x[:, 0]), tok)
  np.testing.assert_array_equal(np.asarray(x[:, 1:]), np.asarray(events))
  assert bool(jnp.all(m[:, 0])) and bool(jnp.all(m[:, 1:] == mask))


def test_bce_ignores_unknown_labels():
  logits = jnp.asarray([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
  labels = jnp.asarray([[1.0, NAN, 0.0], [NAN, 1.0, NAN]])
  loss, n = cls.masked_bce(logits, labels)
  x = np.array([2.0, 0.5, 3.0])
  y = np.array([1.0, 0.0, 1.0])
  want = np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x))))
  assert int(n) == 3
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)


def _fake_clip_run(workdir, cfg):
  """A CLIP checkpoint with random towers of the config's shapes (what a CLIP run saves under 'params')."""
  tt = cfg.model.table_tower
  tower = TableTower(**tt.to_dict())
  abstract = nn.unbox(jax.eval_shape(tower.init, jax.random.key(0), jnp.zeros((1, 4, tt.event_dim)),
                                     jnp.ones((1, 4), bool))["params"])
  rng = np.random.default_rng(0)
  table = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), abstract)
  state = {"params": {"table_tower": table, "image_tower": {"ln_post": {"scale": np.ones(4, np.float32)}},
                      "logit_scale": np.float32(2.0)}, "step": np.int32(0)}
  ck = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  ck.save(0, state)
  ck.close()
  return table


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
  clip_dir = str(tmp_path_factory.mktemp("clip"))
  cfg = cls_cfg(overrides=[f"--config.train.init_from={clip_dir}"])
  table = _fake_clip_run(clip_dir, cfg)
  tr = loop.Trainer(cfg, cls.make_objective(cfg), parallel.make_mesh(cfg, jax.devices()[:2]))
  tr.clip_table, tr.clip_dir = table, clip_dir
  return tr


def _run(trainer, workdir, steps, resume):
  ck = Checkpointer(os.path.join(workdir, "checkpoints"), keep=5, async_save=False)
  it = loop.SyntheticBatches(trainer.objective.dummy_batch(1), trainer.global_batch, seed=11)
  if resume:
    state = ck.restore(trainer.abstract_state(), data_iter=it)[0]
  else:   # as commands/train.py: a fresh run applies train.init_from through the objective's hook
    state = trainer.objective.init_from(trainer.init_state(), trainer.cfg.train.init_from, trainer)
  state = loop.fit(trainer, state, it, num_steps=steps, workdir=workdir, checkpointer=ck, progress=False)
  ck.close()
  return state


def test_init_from_clip_resume_and_grouped_auroc(trainer, tmp_path):
  state0 = jax.device_get(trainer.objective.init_from(trainer.init_state(), trainer.clip_dir, trainer))
  tower = state0.params["table_tower"]
  assert "fc" not in tower and set(state0.params) == {"table_tower", "head", "label_embs"}
  for k in ("layer_0", "layer_1"):
    for a, b in zip(jax.tree.leaves(tower[k]), jax.tree.leaves(trainer.clip_table[k])):
      np.testing.assert_array_equal(a, b)

  full = jax.device_get(_run(trainer, str(tmp_path / "a"), 4, resume=False))
  _run(trainer, str(tmp_path / "b"), 2, resume=False)
  resumed = _run(trainer, str(tmp_path / "b"), 4, resume=True)
  assert int(resumed.step) == 4
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(jax.device_get(resumed.params))):
    np.testing.assert_array_equal(a, b)

  rng = np.random.default_rng(3)

  def batches():
    for i in range(3):
      b = loop.SyntheticBatches(trainer.objective.dummy_batch(1), 16, seed=i).batch(0)
      b["target_labels"] = rng.integers(0, 2, (16, 10)).astype(np.float32)
      b["target_labels"][rng.random((16, 10)) < 0.1] = np.nan
      b["prev_labels"] = rng.integers(0, 2, (16, 10)).astype(np.float32)
      yield b

  out = cls.evaluate_auroc(trainer, resumed, batches())
  assert out["n"] == 48
  for g in ("all", "same", "diff"):
    assert out[g]["auroc"].shape == (10,)
    assert np.isfinite(out[g]["weighted_macro"])
  flat = cls.split_metrics(trainer, resumed, batches(), num_batches=2)
  assert np.isfinite(flat["auroc_all_weighted_macro"]) and "auroc_diff_9" in flat
