"""The trainer protocol (train/objective.py): every hook the loop or `ehrxdiff train` calls is
declared on `Objective`, and its default does nothing (or refuses, naming the objective)."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ehrxdiff_jax.train.objective import Objective


class _Minimal(Objective):
  """Only what a subclass must define."""
  name = "minimal"

  def init_params(self, rng):
    return {"w": jnp.ones((2,))}

  def loss(self, params, batch, rng, train):
    return jnp.sum(params["w"]) * (2.0 if train else 1.0), {"train": jnp.float32(train)}


def test_required_methods_name_the_objective(tiny_config):
  bare = Objective(tiny_config)
  with pytest.raises(NotImplementedError, match="'objective' does not define init_params"):
    bare.init_params(jax.random.key(0))
  with pytest.raises(NotImplementedError, match="'objective' does not define loss"):
    bare.loss({}, {}, jax.random.key(0), True)


def test_attribute_defaults():
  assert Objective.trainable_keys is None   # every part trains
  assert tuple(Objective.ema_keys) == ()    # no EMA copy
  assert Objective.uses_step is False       # loss gets no `step`


def test_hook_defaults(tiny_config):
  obj = _Minimal(tiny_config)
  params = obj.init_params(jax.random.key(0))
  # eval_metrics: the loss in evaluation mode and its metrics
  metrics = obj.eval_metrics(params, {}, {}, jax.random.key(1))
  assert float(metrics["loss"]) == 2.0 and float(metrics["train"]) == 0.0
  assert obj.post_update(params) is params
  assert obj.weight_decay_mask() is None
  assert obj.validation_report(None, None, iter(())) == ({}, {})
  assert obj.check_data("/nonexistent", "train") is None
  # sample_hook: no hook, and nothing is read from the batches
  batches = iter([{"x": 1}])
  assert obj.sample_hook(None, batches, 5) is None
  assert next(batches) == {"x": 1}
  with pytest.raises(NotImplementedError,
                     match=r"train.init_from='runs/x': objective 'minimal' does not define"):
    obj.init_from(None, "runs/x", None)
  # dummy_batch: the LDM batch of the config (numpy), batch axis first
  b = obj.dummy_batch(3)
  m = tiny_config.model
  assert set(b) == {"prev_image", "target_image", "events", "event_mask"}
  assert all(isinstance(v, np.ndarray) for v in b.values())
  assert b["events"].shape == (3, m.conditioner.max_events, m.table_tower.event_dim)
  assert b["prev_image"].shape == (3, tiny_config.data.image_size, tiny_config.data.image_size, 3)


def test_every_hook_the_callers_use_is_declared():
  """Every attribute commands/train.py and train/loop.py use on an objective exists on the base
  class (no hasattr / getattr look-ups of undeclared hooks)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  used = set()
  for path in ("ehrxdiff_jax/commands/train.py", "ehrxdiff_jax/train/loop.py"):
    with open(os.path.join(root, path)) as f:
      text = f.read()
    assert "hasattr(objective" not in text and "getattr(trainer.objective" not in text, path
    used |= set(re.findall(r"\bobjective\.([a-z_]+)", text))
  assert {"sample_hook", "init_from", "check_data", "post_update", "validation_report"} <= used
  assert not [name for name in used if not hasattr(Objective, name)]
