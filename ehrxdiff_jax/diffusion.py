"""Diffusion math: the LDM noise schedule, the forward process and the per-step reverse updates.

Conventions (shared by the trainer, the sampler and the tests):
- Discrete time t in {0, ..., T-1} (T = `c.diffusion.num_timesteps`, 1000). The UNet predicts
  `c.diffusion.prediction`: 'epsilon' (the paper) or 'v' (v = sqrt(a) eps - sqrt(1-a) x0, Salimans &
  Ho 2022); `model_output_to_eps_x0` turns either into the (eps, x0) pair every step function uses.
- `c.diffusion.rescale_zero_terminal_snr` (Lin et al. 2024, diffusers' `rescale_betas_zero_snr`)
  rescales the schedule so that alpha_bar[T-1] = 0: training then sees pure noise at the last step, the
  state sampling starts from. It needs v prediction (eps carries no information at SNR 0).
- `Schedule` holds float32 tables; the betas are computed in float64 with numpy (as the LDM code does)
  and cast once.
- A sampling trajectory is a descending array of timesteps (`timesteps`); step i goes from
  `ts[i]` to `ts[i+1]`, and the last step goes to "t = -1", i.e. the clean sample. What alpha-bar the
  "-1" end has depends on the sampler, exactly as in diffusers / LDM:
    ddim      alpha_bar(-1) = alpha_bar[0]   (LDM DDIM, diffusers `set_alpha_to_one=False`)
    ddpm      alpha_bar(-1) = 1              (no noise is added on the step from t = 0)
    dpmpp_2m  sigma(-1) = 0                  (diffusers `final_sigmas_type='zero'`: returns the x0 prediction)
- Step updates follow diffusers' `DDIMScheduler`, `DDPMScheduler` (fixed_small, no clipping) and
  `DPMSolverMultistepScheduler` (dpmsolver++, order 2, midpoint, lower_order_final) operation by
  operation in float32, so that fed identical model outputs they agree to float32 rounding.
  All step functions accept traced scalar timesteps, so they run inside `lax.scan`.
"""
from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SAMPLERS = ("ddpm", "ddim", "dpmpp_2m")
_ALIASES = {
    "ddpm": "ddpm", "ancestral": "ddpm",
    "ddim": "ddim",
    "dpmpp_2m": "dpmpp_2m", "dpm++2m": "dpmpp_2m", "dpm++": "dpmpp_2m", "dpmsolver++": "dpmpp_2m",
    "dpm-solver++": "dpmpp_2m", "dpmpp": "dpmpp_2m",
}


def canonical_sampler(name: str) -> str:
  """Maps a sampler name (case-insensitive, a few aliases) to one of `SAMPLERS`."""
  key = str(name).lower().replace(" ", "")
  if key not in _ALIASES:
    raise ValueError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")
  return _ALIASES[key]


# ---------------------------------------------------------------------------------------- schedule
def make_betas(beta_schedule: str, num_timesteps: int, linear_start: float, linear_end: float,
               cosine_s: float = 8e-3) -> np.ndarray:
  """The LDM beta schedules, float64 numpy [T]. 'linear' (the paper's) is linear in sqrt(beta)."""
  n = int(num_timesteps)
  if beta_schedule == "linear":
    betas = np.linspace(math.sqrt(linear_start), math.sqrt(linear_end), n, dtype=np.float64) ** 2
  elif beta_schedule == "sqrt_linear":
    betas = np.linspace(linear_start, linear_end, n, dtype=np.float64)
  elif beta_schedule == "sqrt":
    betas = np.linspace(linear_start, linear_end, n, dtype=np.float64) ** 0.5
  elif beta_schedule == "cosine":
    steps = np.arange(n + 1, dtype=np.float64) / n + cosine_s
    alpha_bar = np.cos(steps / (1 + cosine_s) * np.pi / 2) ** 2
    alpha_bar = alpha_bar / alpha_bar[0]
    betas = np.clip(1 - alpha_bar[1:] / alpha_bar[:-1], 0.0, 0.999)
  else:
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}")
  return betas


@flax.struct.dataclass
class Schedule:
  """The noise schedule as float32 tables of length T (a pytree: pass it into jit or close over it)."""
  betas: jax.Array
  alphas_cumprod: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array

  @property
  def num_timesteps(self) -> int:
    return int(self.betas.shape[0])

  @classmethod
  def from_betas(cls, betas) -> "Schedule":
    """From betas; the products are formed in float64 before the cast to float32 (as the LDM code)."""
    betas64 = np.asarray(betas, np.float64)
    acp = np.cumprod(1.0 - betas64)
    return cls._from_numpy(betas64, acp)

  @classmethod
  def from_alphas_cumprod(cls, alphas_cumprod) -> "Schedule":
    """From given alpha-bars (e.g. a peer's float32 table, to compare step math on identical tables)."""
    acp = np.asarray(alphas_cumprod, np.float32).astype(np.float64)
    betas = 1.0 - acp / np.concatenate([[1.0], acp[:-1]])
    return cls._from_numpy(betas, acp)

  @classmethod
  def _from_numpy(cls, betas64, acp64) -> "Schedule":
    # Concrete arrays even when built while tracing (a schedule cached from inside jit must not leak).
    with jax.ensure_compile_time_eval():
      return cls(
          betas=jnp.asarray(np.asarray(betas64, np.float32)),
          alphas_cumprod=jnp.asarray(np.asarray(acp64, np.float32)),
          sqrt_alphas_cumprod=jnp.asarray(np.sqrt(acp64).astype(np.float32)),
          sqrt_one_minus_alphas_cumprod=jnp.asarray(np.sqrt(1.0 - acp64).astype(np.float32)),
      )


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Lin et al. 2024 (Algorithm 1; diffusers `rescale_zero_terminal_snr`): shift and scale
  sqrt(alpha_bar) so that its last value is 0 and its first is unchanged. float64 in and out."""
  abar_sqrt = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
  first, last = abar_sqrt[0], abar_sqrt[-1]
  abar_sqrt = (abar_sqrt - last) * first / (first - last)
  abar = abar_sqrt ** 2
  alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
  return 1.0 - alphas


PREDICTIONS = ("epsilon", "v")


def prediction_type(diffusion_config) -> str:
  """`c.diffusion.prediction` checked: 'epsilon' (alias 'eps') or 'v'."""
  p = str(diffusion_config.get("prediction", "epsilon"))
  p = "epsilon" if p == "eps" else p
  if p not in PREDICTIONS:
    raise ValueError(f"diffusion.prediction={p!r}; expected one of {PREDICTIONS}")
  return p


def make_schedule(diffusion_config) -> Schedule:
  """`Schedule` from `c.diffusion` (num_timesteps, beta_schedule, linear_start, linear_end,
  rescale_zero_terminal_snr)."""
  d = diffusion_config
  betas = make_betas(d.beta_schedule, d.num_timesteps, d.linear_start, d.linear_end)
  if d.get("rescale_zero_terminal_snr", False):
    if prediction_type(d) != "v":
      raise ValueError("diffusion.rescale_zero_terminal_snr needs diffusion.prediction='v' "
                       "(at SNR 0 an epsilon prediction cannot give x0)")
    betas = rescale_zero_terminal_snr(betas)
  return Schedule.from_betas(betas)


def training_target(schedule: Schedule, x0, t, eps, prediction: str):
  """What the UNet is trained to output at (x0, t, eps): eps, or v = sqrt(a) eps - sqrt(1-a) x0."""
  if prediction == "epsilon":
    return eps
  a = _bcast(schedule.sqrt_alphas_cumprod[t], x0)
  s = _bcast(schedule.sqrt_one_minus_alphas_cumprod[t], x0)
  return a * eps - s * x0


def model_output_to_eps_x0(schedule: Schedule, x_t, t, out, prediction: str):
  """(eps, x0) implied by the UNet's output at x_t; t scalar or [B] int."""
  if prediction == "epsilon":
    return out, predict_x0(schedule, x_t, t, out)
  a = _bcast(schedule.sqrt_alphas_cumprod[t], x_t)
  s = _bcast(schedule.sqrt_one_minus_alphas_cumprod[t], x_t)
  return s * x_t + a * out, a * x_t - s * out


LOSS_WEIGHTINGS = ("uniform", "min_snr")


def loss_weights(schedule: Schedule, t, weighting: str, prediction: str, gamma: float = 5.0):
  """Per-sample weights [B] of the squared error. 'uniform' (the paper): 1. 'min_snr' (Hang et al.
  2023): min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v, the x0-space weight
  min(SNR, gamma) expressed in the parameterisation's units (SNR = a / (1 - a))."""
  if weighting == "uniform":
    return jnp.ones(jnp.shape(t), jnp.float32)
  if weighting != "min_snr":
    raise ValueError(f"diffusion.loss_weighting={weighting!r}; expected one of {LOSS_WEIGHTINGS}")
  a = schedule.alphas_cumprod[t]
  snr = a / jnp.maximum(1.0 - a, 1e-12)
  clipped = jnp.minimum(snr, gamma)
  return clipped / (snr + 1.0) if prediction == "v" else clipped / jnp.maximum(snr, 1e-12)


def _bcast(v, x):
  """Broadcasts a scalar or [B] vector against x [B, ...]."""
  v = jnp.asarray(v)
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def q_sample(schedule: Schedule, x0, t, noise):
  """Forward process: sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise; t scalar or [B] int."""
  a = _bcast(schedule.sqrt_alphas_cumprod[t], x0).astype(x0.dtype)
  s = _bcast(schedule.sqrt_one_minus_alphas_cumprod[t], x0).astype(x0.dtype)
  return a * x0 + s * noise


def predict_x0(schedule: Schedule, x_t, t, eps):
  """x0 implied by an epsilon prediction."""
  a = _bcast(schedule.alphas_cumprod[t], x_t)
  return (x_t - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)


def guidance(eps_uncond, eps_cond, scale):
  """Classifier-free guidance: eps_u + s (eps_c - eps_u); s = 1 gives eps_c."""
  return eps_uncond + scale * (eps_cond - eps_uncond)


# ---------------------------------------------------------------------------------------- timesteps
SPACINGS = ("leading", "trailing")


def timesteps(sampler: str, num_steps: int, num_train_timesteps: int = 1000,
              spacing: str = "leading") -> np.ndarray:
  """The descending int32 timesteps a sampler visits.

  ddim: 'leading' spacing + offset 1 (LDM 'uniform'): 100 of 1000 -> 991, 981, ..., 1.
  ddpm: 'leading' spacing, no offset: 1000 of 1000 -> 999, ..., 0 (the LDM ancestral loop).
  spacing='trailing' (ddim and ddpm; diffusers' 'trailing', Lin et al. 2024): round(arange(T, 0,
    -T/S)) - 1, so the first step is t = T-1 (where a zero-terminal-SNR schedule has pure noise):
    20 of 1000 -> 999, 949, ..., 49.
  dpmpp_2m: 'linspace' spacing (diffusers' default for DPM-Solver): linspace(0, T-1, S+1) rounded,
    reversed, the last (0) dropped.
  """
  sampler = canonical_sampler(sampler)
  n, s = int(num_train_timesteps), int(num_steps)
  if not 1 <= s <= n:
    raise ValueError(f"num_steps must be in [1, {n}], got {s}")
  if spacing not in SPACINGS:
    raise ValueError(f"timestep spacing {spacing!r}; expected one of {SPACINGS}")
  if spacing == "trailing" and sampler != "dpmpp_2m":
    ts = np.round(np.arange(n, 0, -n / s)).astype(np.int64) - 1
  elif sampler == "ddim":
    ts = (np.arange(s, dtype=np.int64) * (n // s))[::-1] + 1
    if ts[0] > n - 1:
      raise ValueError(f"ddim with {s} of {n} steps reaches t = {ts[0]} > {n - 1}; use fewer steps")
  elif sampler == "ddpm":
    ts = (np.arange(s, dtype=np.int64) * (n // s))[::-1]
  else:
    ts = np.linspace(0, n - 1, s + 1).round()[::-1][:-1].astype(np.int64)
  return np.ascontiguousarray(ts).astype(np.int32)


def next_timesteps(ts: np.ndarray) -> np.ndarray:
  """ts[1:] followed by -1 (the clean end)."""
  ts = np.asarray(ts, np.int32)
  return np.concatenate([ts[1:], np.array([-1], np.int32)])


def dpm_orders(num_steps: int, solver_order: int = 2, lower_order_final: bool = True) -> np.ndarray:
  """Solver order used on each step by diffusers' DPMSolverMultistep (dpmsolver++, order <= 2).

  First step: order 1 (no history). Last step: order 1 (final sigma 0, also `lower_order_final`).
  """
  if solver_order not in (1, 2):
    raise NotImplementedError("only DPM-Solver++ orders 1 and 2 are implemented")
  orders = np.full((num_steps,), solver_order, np.int32)
  orders[0] = 1
  orders[-1] = 1  # final_sigmas_type 'zero' forces first order on the last step (lower_order_final too)
  del lower_order_final
  return orders


# ---------------------------------------------------------------------------------------- steps
def _acp(schedule: Schedule, t, final):
  """alpha_bar at t (scalar int, possibly traced); `final` where t < 0."""
  acp = schedule.alphas_cumprod
  return jnp.where(t >= 0, acp[jnp.maximum(t, 0)], jnp.asarray(final, acp.dtype))


def ddim_step(schedule: Schedule, x, eps, t, t_next, *, eta=0.0, noise=None, final_alpha_cumprod=None,
              x0=None):
  """One DDIM update x_t -> x_{t_next} (eta 0: deterministic; 1: DDPM-like). Returns (x_next, x0).

  x0: the model's x0 (from `model_output_to_eps_x0`); default: implied by eps (inf at alpha_bar 0).
  `noise` (same shape as x) is the standard normal draw scaled by sigma_t; pass None for eta == 0.
  `final_alpha_cumprod` is alpha_bar used when t_next < 0 (default alpha_bar[0], as LDM).
  """
  if final_alpha_cumprod is None:
    final_alpha_cumprod = schedule.alphas_cumprod[0]
  a_t = schedule.alphas_cumprod[t]
  a_prev = _acp(schedule, t_next, final_alpha_cumprod)
  b_t = 1 - a_t
  if x0 is None:
    x0 = (x - b_t ** 0.5 * eps) / a_t ** 0.5
  variance = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)
  std = eta * variance ** 0.5
  direction = (1 - a_prev - std ** 2) ** 0.5 * eps
  x_next = a_prev ** 0.5 * x0 + direction
  if noise is not None:
    x_next = x_next + std * noise
  return x_next, x0


def ddpm_step(schedule: Schedule, x, eps, t, t_next, *, noise=None, x0=None):
  """One ancestral DDPM update (posterior q(x_{t_next} | x_t, x0), 'fixed_small' variance, no
  clipping); works for strided trajectories too. No noise is added from t = 0. Returns (x_next, x0)."""
  a_t = schedule.alphas_cumprod[t]
  a_prev = _acp(schedule, t_next, 1.0)
  b_t = 1 - a_t
  b_prev = 1 - a_prev
  cur_alpha = a_t / a_prev
  cur_beta = 1 - cur_alpha
  if x0 is None:
    x0 = (x - b_t ** 0.5 * eps) / a_t ** 0.5
  c_x0 = (a_prev ** 0.5 * cur_beta) / b_t
  c_xt = cur_alpha ** 0.5 * b_prev / b_t
  x_next = c_x0 * x0 + c_xt * x
  if noise is not None:
    variance = jnp.maximum((1 - a_prev) / (1 - a_t) * cur_beta, 1e-20)
    std = jnp.where(t > 0, variance ** 0.5, 0.0)
    x_next = x_next + std * noise
  return x_next, x0


def _dpm_alpha_sigma(schedule: Schedule, t):
  """diffusers' DPM-Solver parametrisation at t (t < 0: sigma 0): sigma = sqrt((1-a)/a),
  alpha_t = 1/sqrt(sigma^2 + 1), sigma_t = sigma alpha_t. Returns (alpha_t, sigma_t)."""
  acp = schedule.alphas_cumprod[jnp.maximum(t, 0)]
  sigma = jnp.where(t >= 0, ((1 - acp) / acp) ** 0.5, 0.0)
  alpha_t = 1 / ((sigma ** 2 + 1) ** 0.5)
  return alpha_t, sigma * alpha_t


def dpmpp_2m_step(schedule: Schedule, x, eps, x0_prev, t, t_next, t_last, order):
  """One DPM-Solver++(2M) update (data prediction, midpoint). Returns (x_next, x0).

  x0_prev: the previous step's x0 (ignored where order == 1); t_last: the previous step's timestep;
  order: 1 or 2 (see `dpm_orders`). Where t_next < 0 (final sigma 0) the result is x0, as diffusers.
  """
  alpha_s0, sigma_s0 = _dpm_alpha_sigma(schedule, t)
  x0 = (x - sigma_s0 * eps) / alpha_s0
  final = t_next < 0
  alpha_t, sigma_t = _dpm_alpha_sigma(schedule, jnp.where(final, t, t_next))  # safe values when final
  alpha_s1, sigma_s1 = _dpm_alpha_sigma(schedule, jnp.maximum(t_last, 0))
  lambda_t = jnp.log(alpha_t) - jnp.log(sigma_t)
  lambda_s0 = jnp.log(alpha_s0) - jnp.log(sigma_s0)
  lambda_s1 = jnp.log(alpha_s1) - jnp.log(sigma_s1)
  h = lambda_t - lambda_s0
  h = jnp.where(final, 1.0, h)  # unused when final; keeps the arithmetic finite
  e = alpha_t * (jnp.exp(-h) - 1.0)
  first = (sigma_t / sigma_s0) * x - e * x0
  second_order = jnp.asarray(order) == 2
  r0 = jnp.where(second_order, (lambda_s0 - lambda_s1) / h, 1.0)
  d1 = (1.0 / r0) * (x0 - x0_prev)
  second = (sigma_t / sigma_s0) * x - e * x0 - 0.5 * e * d1
  x_next = jnp.where(final, x0, jnp.where(second_order, second, first))
  return x_next, x0
