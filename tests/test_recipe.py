"""The demo recipe's conditioning options (configs/demo.py): event dropout in the LDM loss, the pooled
events token and the UNet's adm input, the events-removed condition, guidance against it, and the
per-t-bucket loss. The learning itself is the demo's job (BENCHMARKS.md), not a test's."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from ehrxdiff_jax import models
from ehrxdiff_jax import sample as smp
from ehrxdiff_jax.train import ldm
from test_sample import _batch, _stand_ins

B = 2


@pytest.fixture(scope="module")
def demo_setup():
  cfg = demo.get_config()
  cfg.data.cached_latents = False
  params = nn.unbox(jax.jit(functools.partial(models.init_ldm, cfg))(jax.random.key(0)))
  # A non-zero UNet output head and adm path, so that the context can change the output.
  params["unet"] = jax.tree.map(lambda x: x + 0.05 * jnp.sin(jnp.arange(x.size).reshape(x.shape)),
                                params["unet"])
  rng = np.random.RandomState(0)
  batch = {k: np.array(v) for k, v in models.dummy_batch(cfg, B).items()}
  batch["prev_image"] = rng.uniform(-1, 1, batch["prev_image"].shape).astype(np.float32)
  batch["target_image"] = rng.uniform(-1, 1, batch["target_image"].shape).astype(np.float32)
  batch["event_mask"][:, 10:] = False
  batch["events"] = (rng.randn(*batch["events"].shape) * batch["event_mask"][..., None]).astype(np.float32)
  return cfg, params, batch


def _other_events(batch, seed=1):
  rng = np.random.RandomState(seed)
  return dict(batch, events=(rng.randn(*batch["events"].shape) * batch["event_mask"][..., None])
              .astype(np.float32))


def test_event_dropout_removes_the_events_from_the_loss(demo_setup):
  cfg, params, batch = demo_setup
  rng = jax.random.key(3)
  always = cfg.copy_and_resolve_references()
  always.train.event_dropout = 1.0
  loss_always = jax.jit(lambda p, b: ldm.LDMObjective(always).loss(p, b, rng, train=True)[0])
  never = cfg.copy_and_resolve_references()
  never.train.event_dropout = 0.0
  loss_never = jax.jit(lambda p, b: ldm.LDMObjective(never).loss(p, b, rng, train=True)[0])
  other = _other_events(batch)
  # Every sample's events dropped: the loss does not see them; kept: it does.
  assert float(loss_always(params, batch)) == float(loss_always(params, other))
  assert float(loss_never(params, batch)) != float(loss_never(params, other))
  # Dropping equals feeding the events-removed condition (zero events, mask all False).
  events, mask = smp.events_removed(batch["events"], batch["event_mask"], cfg)
  assert not mask.any() and not events.any()
  assert float(loss_always(params, batch)) == pytest.approx(
      float(loss_never(params, dict(batch, events=events, event_mask=mask))), rel=1e-6)


def test_events_removed_follows_the_trained_no_event_condition(demo_setup):
  cfg, _, batch = demo_setup
  wnull = cfg.copy_and_resolve_references()
  wnull.data.w_null = True  # the reference's no-change samples: zero rows marked valid
  events, mask = smp.events_removed(batch["events"], batch["event_mask"], wnull)
  assert mask.all() and not events.any() and isinstance(events, np.ndarray)
  events, mask = smp.events_removed(jnp.asarray(batch["events"]), jnp.asarray(batch["event_mask"]), cfg)
  assert isinstance(events, jax.Array) and not bool(mask.any())


def test_pooled_events_token_and_unet_adm(demo_setup):
  cfg, params, batch = demo_setup
  cond = models.build_conditioner(cfg)
  inputs = (jnp.asarray(batch["prev_image"]), jnp.zeros((B, 16, 16, 3)), jnp.asarray(batch["events"]),
            jnp.asarray(batch["event_mask"]))
  context = cond.apply({"params": params["conditioner"]}, *inputs)
  assert context.shape == (B, cfg.model.conditioner.context_tokens + 1, cfg.model.conditioner.context_dim)
  assert cond.context_shape() == context.shape[1:]
  # The last token is the mean of the table tokens over the real events (D == context_dim: no projection).
  table_only = cond.clone(cross_attention=("table",), pooled_events=False)
  tokens = table_only.apply({"params": {"table_tower": params["conditioner"]["table_tower"]}}, *inputs)
  mask = batch["event_mask"][..., None]
  want = (np.asarray(tokens) * mask).sum(1) / mask.sum(1)
  np.testing.assert_allclose(np.asarray(context[:, -1]), want, rtol=1e-5, atol=1e-6)
  # The rest is the fused context without the pooled token.
  plain = cond.clone(pooled_events=False).apply({"params": params["conditioner"]}, *inputs)
  np.testing.assert_allclose(np.asarray(context[:, :-1]), np.asarray(plain), rtol=1e-6)
  # split_context feeds it to the UNet's time embedding: it changes the output.
  tokens, y = models.split_context(context, cfg)
  assert tokens.shape[1] == cfg.model.conditioner.context_tokens and y.shape == (B, 64)
  unet = models.build_unet(cfg)
  x, t = jnp.ones((B, 16, 16, 6)), jnp.array([10, 900])
  a = unet.apply({"params": params["unet"]}, x, t, tokens, y)
  b = unet.apply({"params": params["unet"]}, x, t, tokens, y + 1.0)
  assert not np.allclose(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="adm_in_channels"):
    unet.apply({"params": params["unet"]}, x, t, tokens)
  bad = cfg.copy_and_resolve_references()
  bad.model.unet.adm_in_channels = 0
  with pytest.raises(ValueError, match="adm_in_channels"):
    models.split_context(context, bad)


def test_validation_loss_buckets_are_stratified(demo_setup):
  cfg, params, batch = demo_setup
  c = cfg.copy_and_resolve_references()
  c.diffusion.loss_buckets = 2  # B = 2 samples: one per bucket on every validation batch
  obj = ldm.LDMObjective(c)
  out = jax.jit(obj.eval_metrics)(params, {}, batch, jax.random.key(0))
  assert {"loss", "loss_t0", "loss_t1"} <= set(out) and "loss_t2" not in out
  assert all(np.isfinite(float(out[k])) for k in ("loss_t0", "loss_t1"))
  # v target, uniform weights: the loss is the mean of the two buckets' (one sample each).
  assert float(out["loss"]) == pytest.approx((float(out["loss_t0"]) + float(out["loss_t1"])) / 2, rel=1e-5)


def test_guidance_against_no_events(tiny_config):
  """guidance_null='no_events': the unconditional branch is the conditioner with the events removed, so
  a batch whose events are already removed samples the same with or without guidance."""
  c = tiny_config.copy_and_resolve_references()
  c.sample.steps = 4
  unet, cond, dec, enc, params = _stand_ins(3)
  batch = _batch(2)
  keys = smp.per_sample_keys(0, range(2))
  make = functools.partial(smp.make_generate_fn, unet, cond, dec, c, vae_encode_mean=enc)
  plain, guided = make(), make(guidance_scale=3.0, null_context="no_events")
  zeros_null = make(guidance_scale=3.0, null_context="zeros")
  assert guided.settings["guidance_null"] == "no_events"
  events, mask = smp.events_removed(batch["events"], batch["event_mask"], c)
  removed = dict(batch, events=events, event_mask=mask)
  np.testing.assert_allclose(np.asarray(guided(params, removed, keys)), np.asarray(plain(params, removed, keys)),
                             atol=1e-5)  # u + s (c - u) with c == u: rounding only
  assert not np.allclose(np.asarray(guided(params, batch, keys)), np.asarray(plain(params, batch, keys)))
  # ... while an all-zero null context also drops what the image contributes: guided != plain.
  assert not np.allclose(np.asarray(zeros_null(params, removed, keys)), np.asarray(plain(params, removed, keys)))
  with pytest.raises(ValueError, match="null_context"):
    make(guidance_scale=3.0, null_context="nothing")
