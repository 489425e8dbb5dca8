"""Diffusion math: the LDM schedule, q_sample, timesteps, and step-math parity with diffusers' PyTorch
schedulers (DDIM, DDPM, DPM-Solver++ 2M) over whole trajectories in float32."""
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ehrxdiff_jax import diffusion as dfn
from ehrxdiff_jax import sample as smp
from parity import max_rel_err

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers")

T = 1000
START, END = 0.0015, 0.0295
# diffusers' "scaled_linear" is the LDM "linear" schedule (linear in sqrt(beta)).
DIFFUSERS_COMMON = dict(num_train_timesteps=T, beta_start=START, beta_end=END, beta_schedule="scaled_linear")
SHAPE = (2, 6, 6, 3)  # [B, h, w, c]; the step math is elementwise


def _diffusion_config():
  return ml_collections.ConfigDict(dict(num_timesteps=T, beta_schedule="linear", linear_start=START,
                                        linear_end=END, scale_factor=0.18215, prediction="epsilon"))


@pytest.fixture(scope="module")
def ldm_schedule():
  return dfn.make_schedule(_diffusion_config())


def _torch_scheduler(sampler):
  diffusers = pytest.importorskip("diffusers")
  if sampler == "ddim":
    return diffusers.DDIMScheduler(**DIFFUSERS_COMMON, clip_sample=False, set_alpha_to_one=False,
                                   steps_offset=1, timestep_spacing="leading")
  if sampler == "ddpm":
    return diffusers.DDPMScheduler(**DIFFUSERS_COMMON, variance_type="fixed_small", clip_sample=False)
  return diffusers.DPMSolverMultistepScheduler(**DIFFUSERS_COMMON, algorithm_type="dpmsolver++",
                                               solver_order=2, lower_order_final=True)


# ------------------------------------------------------------------------------------ schedule
def test_schedule_matches_ldm_formula(ldm_schedule):
  betas64 = np.linspace(math.sqrt(START), math.sqrt(END), T, dtype=np.float64) ** 2
  acp64 = np.cumprod(1.0 - betas64)
  s = ldm_schedule
  assert s.num_timesteps == T
  for name in ("betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
    assert getattr(s, name).dtype == jnp.float32 and getattr(s, name).shape == (T,)
  np.testing.assert_array_equal(np.asarray(s.betas), betas64.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(s.alphas_cumprod), acp64.astype(np.float32))
  np.testing.assert_allclose(np.asarray(s.sqrt_alphas_cumprod), np.sqrt(acp64), rtol=1e-7)
  np.testing.assert_allclose(np.asarray(s.sqrt_one_minus_alphas_cumprod), np.sqrt(1 - acp64), rtol=1e-7)
  np.testing.assert_allclose([s.betas[0], s.betas[-1]], [START, END], rtol=1e-6)
  # Nearly pure noise at t = 999: alpha_bar ~ 3.15e-6.
  np.testing.assert_allclose(float(s.alphas_cumprod[-1]), 3.1514e-6, rtol=1e-3)


def test_schedule_close_to_diffusers_scaled_linear(ldm_schedule):
  torch_acp = _torch_scheduler("ddim").alphas_cumprod.numpy()  # float32 linspace + float32 cumprod
  assert max_rel_err(ldm_schedule.alphas_cumprod, torch_acp) < 1e-6
  rebuilt = dfn.Schedule.from_alphas_cumprod(torch_acp)
  np.testing.assert_array_equal(np.asarray(rebuilt.alphas_cumprod), torch_acp)


def test_schedule_is_a_pytree(ldm_schedule):
  leaves = jax.tree_util.tree_leaves(ldm_schedule)
  assert len(leaves) == 4
  doubled = jax.jit(lambda s: jax.tree_util.tree_map(lambda a: 2 * a, s))(ldm_schedule)
  assert isinstance(doubled, dfn.Schedule)


def test_q_sample(ldm_schedule):
  rng = np.random.RandomState(0)
  x0 = rng.randn(*SHAPE).astype(np.float32)
  noise = rng.randn(*SHAPE).astype(np.float32)
  t = np.array([0, 999], np.int32)

  @jax.jit
  def run(s, x0, t, noise):
    xt_scalar = dfn.q_sample(s, x0, 500, noise)  # scalar t broadcasts
    return dfn.q_sample(s, x0, t, noise), dfn.predict_x0(s, xt_scalar, 500, noise)

  got, back = run(ldm_schedule, x0, t, noise)
  acp = np.asarray(ldm_schedule.alphas_cumprod, np.float64)[t][:, None, None, None]
  want = np.sqrt(acp) * x0 + np.sqrt(1 - acp) * noise
  assert max_rel_err(got, want) < 1e-6
  assert max_rel_err(back, x0) < 1e-5  # predict_x0 inverts q_sample given the true noise


def test_q_sample_matches_diffusers_add_noise(ldm_schedule):
  torch = pytest.importorskip("torch")
  sched = _torch_scheduler("ddpm")
  rng = np.random.RandomState(1)
  x0, noise = rng.randn(2, *SHAPE).astype(np.float32)
  t = np.array([3, 700], np.int64)
  want = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
  got = jax.jit(dfn.q_sample)(ldm_schedule, x0, jnp.asarray(t, jnp.int32), noise)
  assert max_rel_err(got, want) < 1e-6


def test_guidance_combination():
  u, c = np.array([1.0, -2.0]), np.array([3.0, 0.5])
  np.testing.assert_allclose(dfn.guidance(u, c, 1.0), c)
  np.testing.assert_allclose(dfn.guidance(u, c, 0.0), u)
  np.testing.assert_allclose(dfn.guidance(u, c, 7.5), np.array([1.0 + 7.5 * 2.0, -2.0 + 7.5 * 2.5]))


# ------------------------------------------------------------------------------------ timesteps
def test_reference_ddim_timesteps():
  ts = dfn.timesteps("ddim", 100, T)
  np.testing.assert_array_equal(ts, np.arange(991, 0, -10))
  assert ts[0] == 991 and ts[-1] == 1 and len(ts) == 100
  np.testing.assert_array_equal(dfn.next_timesteps(ts)[-2:], [1, -1])
  np.testing.assert_array_equal(dfn.timesteps("ddpm", 1000, T), np.arange(999, -1, -1))


@pytest.mark.parametrize("sampler,steps", [("ddim", 100), ("ddim", 50), ("ddim", 30), ("ddpm", 1000),
                                           ("ddpm", 50), ("dpmpp_2m", 20), ("dpmpp_2m", 7)])
def test_timesteps_match_diffusers(sampler, steps):
  sched = _torch_scheduler(sampler)
  sched.set_timesteps(steps)
  np.testing.assert_array_equal(dfn.timesteps(sampler, steps, T), sched.timesteps.numpy())


def test_sampler_names_and_bad_steps():
  assert dfn.canonical_sampler("DPM++2M") == "dpmpp_2m"
  with pytest.raises(ValueError):
    dfn.canonical_sampler("euler")
  with pytest.raises(ValueError):
    dfn.timesteps("ddim", 0)
  with pytest.raises(ValueError):
    dfn.timesteps("ddim", 1000)  # 'leading' + offset 1 would reach t = 1000
  np.testing.assert_array_equal(dfn.dpm_orders(5), [1, 2, 2, 2, 1])


# ------------------------------------------------------------------------------------ parity
_R = np.random.RandomState(0).randn(T, *SHAPE).astype(np.float32)


def _model_np(x, t, acp):
  """A deterministic stand-in for the UNet, identical on both sides: a Gaussian-data-like eps plus a
  fixed random field per timestep (float32 numpy)."""
  return (np.sqrt(np.float32(1.0) - acp[t]) * x + np.float32(0.2) * _R[t]).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _jitted_trajectory(sampler, steps, eta):
  """Our sampler returning every intermediate. The schedule and the model's random field are arguments,
  not constants, so both schedules share one compile (cold XLA CPU compiles dominate this file)."""

  def run(schedule, keys, r):
    def denoise(z, t):
      return jnp.sqrt(1.0 - schedule.alphas_cumprod[t][:, None, None, None]) * z + 0.2 * r[t[0]]

    return smp.sample_latents(denoise, SHAPE[1:], keys, schedule=schedule, sampler=sampler, steps=steps,
                              eta=eta, return_intermediates=True)

  return jax.jit(run)


# The sampler's noise draws, replayed for the peer: index 0 is x_T, step j uses j + 1 (one compile).
_noise = jax.jit(lambda keys, index: smp.step_noise(keys, index, SHAPE[1:]))


def _trajectory_parity(schedule, sampler, steps, eta):
  """Runs our scan sampler (every intermediate returned) and the diffusers scheduler with the same x_T,
  the same per-step noise and the same model outputs; returns the relative error of every step."""
  torch = pytest.importorskip("torch")
  keys = smp.per_sample_keys(0, range(SHAPE[0]))
  run = functools.partial(_jitted_trajectory(sampler, steps, eta), schedule, keys, _R)
  z0, xs = (np.array(a) for a in run())
  np.testing.assert_array_equal(z0, xs[-1])

  sched = _torch_scheduler(sampler)
  sched.set_timesteps(steps)
  acp_np = np.asarray(schedule.alphas_cumprod)  # the stand-in model reads the same table on both sides
  x = torch.from_numpy(np.array(_noise(keys, 0)))
  errs = []
  import diffusers.schedulers.scheduling_ddpm as ddpm_module
  saved = ddpm_module.randn_tensor
  try:
    for j, t in enumerate(sched.timesteps):
      eps = torch.from_numpy(_model_np(x.numpy(), int(t), acp_np))
      noise = torch.from_numpy(np.array(_noise(keys, j + 1)))
      if sampler == "ddim":
        x = sched.step(eps, t, x, eta=eta, variance_noise=noise if eta > 0 else None).prev_sample
      elif sampler == "ddpm":
        ddpm_module.randn_tensor = lambda *a, _n=noise, **k: _n  # the peer draws internally
        x = sched.step(eps, t, x).prev_sample
      else:
        x = sched.step(eps, t, x).prev_sample
      errs.append(max_rel_err(xs[j], x.numpy()))
  finally:
    ddpm_module.randn_tensor = saved
  return np.array(errs)


@pytest.mark.parametrize("sampler,steps,eta", [
    ("ddim", 100, 1.0), ("ddim", 100, 0.0), ("ddpm", 1000, 1.0), ("ddpm", 50, 1.0),
    ("dpmpp_2m", 20, 0.0)])
def test_step_parity_with_diffusers(sampler, steps, eta):
  """Identical alpha-bar tables (the peer's float32 ones) -> the step math alone: <= 1e-5 every step."""
  torch_acp = _torch_scheduler(sampler).alphas_cumprod.numpy()
  schedule = dfn.Schedule.from_alphas_cumprod(torch_acp)
  errs = _trajectory_parity(schedule, sampler, steps, eta)
  print(f"\n{sampler} steps={steps} eta={eta}: max_rel_err over steps {errs.max():.2e}, final {errs[-1]:.2e}")
  assert len(errs) == steps
  assert errs.max() <= 1e-5, errs.max()


def test_reference_ddim_parity_with_ldm_schedule(ldm_schedule):
  """The reference sampler (DDIM-100, eta 1) on OUR float64-derived LDM schedule vs diffusers' float32
  scaled_linear one: the table differences stay well inside the 1e-5 bound too."""
  errs = _trajectory_parity(ldm_schedule, "ddim", 100, 1.0)
  print(f"\nddim-100 eta=1 on the LDM schedule: max_rel_err {errs.max():.2e}")
  assert errs.max() <= 1e-5, errs.max()


def test_step_ends_and_eta(ldm_schedule):
  x = jnp.ones(SHAPE)
  eps = jnp.full(SHAPE, 0.3)
  noise = jnp.full(SHAPE, 2.0)

  @jax.jit
  def run(s):
    a, _ = dfn.ddim_step(s, x, eps, 991, 981, eta=0.0, noise=noise)
    b, _ = dfn.ddim_step(s, x, eps, 991, 981, eta=0.0)
    c, _ = dfn.ddim_step(s, x, eps, 991, 981, eta=1.0, noise=noise)
    last, _ = dfn.ddim_step(s, x, eps, 1, -1, eta=0.0)
    x0 = dfn.predict_x0(s, x, 1, eps)
    last_ddpm, x0_ddpm = dfn.ddpm_step(s, x, eps, 0, -1, noise=noise)
    last_dpm, x0_dpm = dfn.dpmpp_2m_step(s, x, eps, jnp.zeros_like(x), 1, -1, 11, 1)
    return a, b, c, last, x0, last_ddpm, x0_ddpm, last_dpm, x0_dpm

  a, b, c, last, x0, last_ddpm, x0_ddpm, last_dpm, x0_dpm = (np.asarray(v) for v in run(ldm_schedule))
  np.testing.assert_array_equal(a, b)  # eta 0: the noise is ignored
  assert not np.allclose(a, c)
  # The last DDIM step lands on alpha_bar[0] (LDM / set_alpha_to_one=False) ...
  a0 = float(ldm_schedule.alphas_cumprod[0])
  np.testing.assert_allclose(last, math.sqrt(a0) * x0 + math.sqrt(1 - a0) * np.asarray(eps), rtol=1e-5)
  # ... the last DDPM step (from t = 0) on the x0 prediction, without noise; DPM-Solver++ on x0.
  np.testing.assert_allclose(last_ddpm, x0_ddpm, rtol=1e-6)
  np.testing.assert_array_equal(last_dpm, x0_dpm)
  assert np.all(np.isfinite(last_dpm))
