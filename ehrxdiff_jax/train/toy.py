"""A tiny stand-in objective (`--config.train.objective=toy`) that exercises the whole machinery in
seconds: logical-axis parameters (sharded by the mesh rules), a frozen part, an EMA part, randomness
from the step key, and the batch format of SyntheticBatches. Used by the loop, checkpoint and
multi-process tests and handy for smoke-testing a cluster set-up before the real model."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ehrxdiff_jax.nn.layers import Dense
from ehrxdiff_jax.train.objective import Objective

WIDTH, HIDDEN = 16, 64


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = Dense(HIDDEN, ("embed", "mlp"), name="fc1")(x)
    return Dense(WIDTH, ("mlp", "embed"), name="fc2")(nn.gelu(h))


class ToyObjective(Objective):
  """y ~ head(encoder(x + noise)) + frozen(x); trainable 'encoder', 'head'; frozen 'frozen'; EMA 'head'."""
  name = "toy"
  trainable_keys = ("encoder", "head")
  ema_keys = ("head",)

  def __init__(self, cfg):
    super().__init__(cfg)
    self.encoder, self.head, self.frozen = _MLP(), _MLP(), _MLP()

  def init_params(self, rng):
    r1, r2, r3 = jax.random.split(rng, 3)
    x = jnp.zeros((1, WIDTH))
    return {"encoder": self.encoder.init(r1, x)["params"], "head": self.head.init(r2, x)["params"],
            "frozen": self.frozen.init(r3, x)["params"]}

  def loss(self, params, batch, rng, train):
    x, y = batch["x"], batch["y"]
    noise = 0.1 * jax.random.normal(rng, x.shape) if train else 0.0
    h = self.encoder.apply({"params": params["encoder"]}, x + noise)
    pred = self.head.apply({"params": params["head"]}, h) + self.frozen.apply({"params": params["frozen"]}, x)
    loss = jnp.mean(jnp.square(pred - y))
    return loss, {"pred_std": jnp.std(pred)}

  def dummy_batch(self, batch_size):
    return {"x": np.zeros((batch_size, WIDTH), np.float32), "y": np.zeros((batch_size, WIDTH), np.float32)}


def make_objective(cfg) -> ToyObjective:
  return ToyObjective(cfg)
