"""The diffusion departures from the paper that the demo uses (each a config option, off in the paper
configs): v prediction, the zero-terminal-SNR schedule, 'trailing' timesteps, min-SNR weights. Checked
against diffusers' DDIMScheduler (rescale_betas_zero_snr, v_prediction, trailing) in float32."""
import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ehrxdiff_jax import diffusion as dfn
from ehrxdiff_jax import sample as smp
from parity import max_rel_err

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")

T, START, END = 1000, 0.0015, 0.0295
SHAPE = (2, 4, 4, 3)


def _cfg(**kw):
  return ml_collections.ConfigDict(dict(num_timesteps=T, beta_schedule="linear", linear_start=START,
                                        linear_end=END, scale_factor=1.0, **kw))


def _ddim_peer(**kw):
  diffusers = pytest.importorskip("diffusers")
  pytest.importorskip("torch")
  return diffusers.DDIMScheduler(num_train_timesteps=T, beta_start=START, beta_end=END,
                                 beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                 **kw)


def test_zero_terminal_snr_schedule_matches_diffusers():
  ours = dfn.make_schedule(_cfg(prediction="v", rescale_zero_terminal_snr=True))
  peer = _ddim_peer(rescale_betas_zero_snr=True).alphas_cumprod.numpy()
  assert float(ours.alphas_cumprod[-1]) == 0.0 and peer[-1] == pytest.approx(0.0, abs=1e-12)
  np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), peer, rtol=2e-5, atol=1e-9)
  # The first alpha-bar is kept; the paper's schedule ends at 3.15e-6, not 0.
  paper = dfn.make_schedule(_cfg(prediction="epsilon"))
  assert float(ours.alphas_cumprod[0]) == pytest.approx(float(paper.alphas_cumprod[0]), rel=1e-6)
  assert float(paper.alphas_cumprod[-1]) > 0


def test_zero_terminal_snr_needs_v_and_bad_names_are_refused():
  with pytest.raises(ValueError, match="prediction='v'"):
    dfn.make_schedule(_cfg(prediction="epsilon", rescale_zero_terminal_snr=True))
  with pytest.raises(ValueError, match="prediction"):
    dfn.prediction_type(_cfg(prediction="x1"))
  with pytest.raises(ValueError, match="spacing"):
    dfn.timesteps("ddim", 20, T, "middle")
  with pytest.raises(ValueError, match="loss_weighting"):
    dfn.loss_weights(dfn.make_schedule(_cfg()), jnp.array([3]), "snr", "epsilon")


@pytest.mark.parametrize("steps", [20, 50, 7])
def test_trailing_timesteps_match_diffusers(steps):
  peer = _ddim_peer(timestep_spacing="trailing")
  peer.set_timesteps(steps)
  ts = dfn.timesteps("ddim", steps, T, "trailing")
  np.testing.assert_array_equal(ts, peer.timesteps.numpy())
  assert ts[0] == T - 1


def test_v_target_and_its_inverse():
  """v = sqrt(a) eps - sqrt(1-a) x0 (diffusers get_velocity), and the output -> (eps, x0) map inverts
  it exactly, including at SNR 0."""
  torch = pytest.importorskip("torch")
  schedule = dfn.make_schedule(_cfg(prediction="v", rescale_zero_terminal_snr=True))
  rng = np.random.RandomState(0)
  x0, eps = (rng.randn(*SHAPE).astype(np.float32) for _ in range(2))
  t = np.array([0, T - 1], np.int32)
  v = np.asarray(dfn.training_target(schedule, x0, t, eps, "v"))
  peer = _ddim_peer(rescale_betas_zero_snr=True, prediction_type="v_prediction")
  v_peer = peer.get_velocity(torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t.astype(np.int64)))
  assert max_rel_err(v, v_peer.numpy()) < 1e-5
  np.testing.assert_array_equal(np.asarray(dfn.training_target(schedule, x0, t, eps, "epsilon")), eps)
  x_t = np.asarray(dfn.q_sample(schedule, x0, t, eps))
  eps_back, x0_back = dfn.model_output_to_eps_x0(schedule, x_t, t, v, "v")
  np.testing.assert_allclose(np.asarray(eps_back), eps, atol=2e-5)
  np.testing.assert_allclose(np.asarray(x0_back), x0, atol=2e-5)
  np.testing.assert_allclose(np.asarray(x0_back[1]), -v[1], atol=1e-6)  # SNR 0: x_t = eps, v = -x0


def test_v_ddim_trajectory_matches_diffusers():
  """The whole DDIM-20 trailing, eta 0 trajectory on a zero-terminal-SNR schedule with a v-predicting
  stand-in model, step by step against diffusers: <= 1e-5."""
  torch = pytest.importorskip("torch")
  peer = _ddim_peer(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")
  schedule = dfn.Schedule.from_alphas_cumprod(peer.alphas_cumprod.numpy())
  field = np.random.RandomState(1).randn(T, *SHAPE).astype(np.float32)

  def model_np(x, t):
    return (0.5 * x + 0.3 * field[t]).astype(np.float32)

  keys = smp.per_sample_keys(0, range(SHAPE[0]))
  z0, xs = smp.sample_latents(lambda z, t: 0.5 * z + 0.3 * jnp.asarray(field)[t[0]], SHAPE[1:], keys,
                              schedule=schedule, sampler="ddim", steps=20, eta=0.0, prediction="v",
                              spacing="trailing", return_intermediates=True)
  xs = np.asarray(xs)
  peer.set_timesteps(20)
  x = torch.from_numpy(np.array(smp.step_noise(keys, 0, SHAPE[1:])))
  errs = []
  for j, t in enumerate(peer.timesteps):
    x = peer.step(torch.from_numpy(model_np(x.numpy(), int(t))), t, x, eta=0.0).prev_sample
    errs.append(max_rel_err(xs[j], x.numpy()))
  assert np.isfinite(xs).all() and max(errs) <= 1e-5, errs


def test_min_snr_weights():
  schedule = dfn.make_schedule(_cfg(prediction="v", rescale_zero_terminal_snr=True))
  t = jnp.arange(T)
  a = np.asarray(schedule.alphas_cumprod, np.float64)
  snr = a / np.maximum(1 - a, 1e-12)
  w_v = np.asarray(dfn.loss_weights(schedule, t, "min_snr", "v", 5.0))
  w_eps = np.asarray(dfn.loss_weights(schedule, t, "min_snr", "epsilon", 5.0))
  np.testing.assert_allclose(w_v, np.minimum(snr, 5) / (snr + 1), rtol=1e-4)
  low = snr < 5  # below gamma the eps weight is 1, above it gamma / snr
  np.testing.assert_allclose(w_eps[low & (snr > 0)], 1.0, rtol=1e-5)
  np.testing.assert_allclose(w_eps[~low], 5 / snr[~low], rtol=1e-4)
  assert w_v[-1] == 0.0 and math.isfinite(float(w_eps[-1]))
  np.testing.assert_array_equal(np.asarray(dfn.loss_weights(schedule, t, "uniform", "v")), 1.0)
