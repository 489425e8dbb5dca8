"""The sampler core: every denoising step in one `lax.scan`, plus `make_generate_fn` (conditioner once ->
scan -> VAE decode, one jitted XLA program).

Reproducibility contract: sample i draws its randomness only from its own key `keys[i]`:
    x_T            = normal(fold_in(keys[i], 0),     latent_shape)
    noise of step j = normal(fold_in(keys[i], j + 1), latent_shape)     (j = 0 .. steps-1)
drawn per sample under `vmap`, so a sample's result does not depend on the batch size, on its place in
the batch, or on how many devices the batch is sharded over. `per_sample_keys(seed, ids)` derives the
keys from a seed and stable sample ids (e.g. the sample key strings), which is what the CLI uses.

Denoiser contract for `sample_latents`: `denoise_fn(z_t [B,h,w,c] f32, t [B] int32) -> out`, the UNet
output in the `prediction` parameterisation ('epsilon' or 'v', diffusion.py); with `guidance_scale != 1`
it is called as `denoise_fn(z_t, t, cond)` with the Python bool `cond` (True: conditional, False:
unconditional) and out = out_u + s (out_c - out_u) (linear in the output, so the same in eps and v).
"""
from __future__ import annotations

import zlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ehrxdiff_jax import batch_format
from ehrxdiff_jax import diffusion as dfn
from ehrxdiff_jax.nn.vae import downsample_factor

# ------------------------------------------------------------------------------------------- keys


def per_sample_keys(seed: int, ids: Sequence[Any]) -> jax.Array:
  """[B] PRNG keys, key_i = fold_in(key(seed), id_i); string / bytes ids are hashed with crc32."""
  base = jax.random.key(int(seed))
  data = []
  for i in ids:
    if isinstance(i, str):
      i = i.encode("utf-8")
    if isinstance(i, (bytes, bytearray, np.bytes_)):
      i = zlib.crc32(bytes(i))
    data.append(int(i) & 0xFFFFFFFF)
  data = jnp.asarray(np.asarray(data, np.uint32))
  return jax.vmap(lambda d: jax.random.fold_in(base, d))(data)


def step_noise(keys: jax.Array, index, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """Standard normal [B, *shape]: sample i from fold_in(keys[i], index). index 0 is x_T; step j uses j+1."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, index), tuple(shape), dtype))(keys)


# ------------------------------------------------------------------------------------------- core


def _constrain(x, sharding):
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def sample_latents(denoise_fn: Callable, shape: Sequence[int], keys: jax.Array, *, schedule: dfn.Schedule,
                   sampler: str = "ddim", steps: int = 100, eta: float = 1.0, guidance_scale: float = 1.0,
                   x_T: jax.Array | None = None, sharding=None, return_intermediates: bool = False,
                   prediction: str = "epsilon", spacing: str = "leading"):
  """Runs the whole reverse trajectory in one `lax.scan`; traceable (call it under `jax.jit`).

  shape: the latent shape of one sample (h, w, c) (a leading batch dim equal to len(keys) is accepted).
  keys: [B] PRNG keys, one per sample (see the module docstring for how they are used).
  sampler / steps / eta / guidance_scale / prediction / spacing: static Python values. eta is used by
    'ddim' only; spacing ('leading' | 'trailing') by 'ddim' and 'ddpm' (diffusion.timesteps).
  x_T: optional starting latents [B, h, w, c] (default: drawn from the keys).
  sharding: optional `NamedSharding` whose spec names the batch axis (e.g. P('data')); latents are
    constrained to it at every step.
  Returns z_0 [B, h, w, c] float32, or (z_0, xs [steps, B, h, w, c]) with return_intermediates, where
  xs[j] is the sample after step j (xs[-1] == z_0).
  """
  sampler = dfn.canonical_sampler(sampler)
  batch = keys.shape[0]
  shape = tuple(int(s) for s in shape)
  if len(shape) == 4:
    if shape[0] != batch:
      raise ValueError(f"shape {shape} does not match {batch} keys")
    shape = shape[1:]
  ts = dfn.timesteps(sampler, steps, schedule.num_timesteps, spacing)
  ts_next = dfn.next_timesteps(ts)
  ts_last = np.concatenate([ts[:1], ts[:-1]]).astype(np.int32)
  orders = dfn.dpm_orders(len(ts)) if sampler == "dpmpp_2m" else np.ones(len(ts), np.int32)
  stochastic = sampler == "ddpm" or (sampler == "ddim" and float(eta) != 0.0)
  guided = float(guidance_scale) != 1.0

  if x_T is None:
    x_T = step_noise(keys, 0, shape)
  x = _constrain(jnp.asarray(x_T, jnp.float32), sharding)

  def model_eps_x0(z, t):
    tb = jnp.full((batch,), t, jnp.int32)
    if not guided:
      out = denoise_fn(z, tb).astype(jnp.float32)
    else:
      out_c = denoise_fn(z, tb, True).astype(jnp.float32)
      out_u = denoise_fn(z, tb, False).astype(jnp.float32)
      out = dfn.guidance(out_u, out_c, jnp.float32(guidance_scale))
    return dfn.model_output_to_eps_x0(schedule, z, t, out, prediction)

  def body(carry, step):
    z, x0_prev = carry
    j, t, t_next, t_last, order = step
    eps, x0_model = model_eps_x0(z, t)
    # With v prediction the model's x0 is used directly (an x0 implied by eps is infinite at SNR 0).
    x0_arg = x0_model if prediction == "v" else None
    noise = _constrain(step_noise(keys, j + 1, shape), sharding) if stochastic else None
    if sampler == "ddim":
      z_next, x0 = dfn.ddim_step(schedule, z, eps, t, t_next, eta=float(eta), noise=noise, x0=x0_arg)
    elif sampler == "ddpm":
      z_next, x0 = dfn.ddpm_step(schedule, z, eps, t, t_next, noise=noise, x0=x0_arg)
    else:
      z_next, x0 = dfn.dpmpp_2m_step(schedule, z, eps, x0_prev, t, t_next, t_last, order)
    z_next = _constrain(z_next.astype(jnp.float32), sharding)
    x0 = _constrain(x0.astype(jnp.float32), sharding)
    return (z_next, x0), (z_next if return_intermediates else None)

  xs = (jnp.arange(len(ts), dtype=jnp.int32), jnp.asarray(ts), jnp.asarray(ts_next), jnp.asarray(ts_last),
        jnp.asarray(orders))
  (z0, _), inter = jax.lax.scan(body, (x, jnp.zeros_like(x)), xs)
  return (z0, inter) if return_intermediates else z0


# ------------------------------------------------------------------------------------------- generate

BATCH_KEYS = ("prev_image", "events", "event_mask", "prev_mean")


def events_removed(events, event_mask, config):
  """(events, event_mask) of the no-events condition the model was trained with: zero events, and a
  mask all False (`train.event_dropout`) or, for a w_null model, all True (the reference's no-change
  samples carry zero rows marked valid). numpy in -> numpy out (host batches), else jax."""
  xp = np if isinstance(events, np.ndarray) else jnp
  mask_value = bool(config.data.get("w_null", False))
  return xp.zeros_like(events), xp.full(event_mask.shape, mask_value, dtype=bool)


def make_generate_fn(unet_apply: Callable, conditioner_apply: Callable, vae_decode: Callable, config, *,
                     vae_encode_mean: Callable | None = None, sampler: str | None = None,
                     steps: int | None = None, eta: float | None = None, guidance_scale: float | None = None,
                     null_context: str | Callable | None = None, sharding=None,
                     schedule: dfn.Schedule | None = None):
  """Builds `generate(params, batch, keys) -> images [B, H, W, 3] float32 in [-1, 1]`.

  The callables (plain functions of explicit parameters; wrap Flax modules with `module.apply`):
    unet_apply(unet_params, x [B,h,w,cin], t [B] int32, context [B,N,D]) -> eps [B,h,w,c]
    conditioner_apply(conditioner_params, prev_image, prev_mean, events, event_mask) -> context [B,N,D]
    vae_decode(vae_params, z [B,h,w,c]) -> image [B,H,W,3]
    vae_encode_mean(vae_params, image) -> VAE posterior mean [B,h,w,c] (needed unless the batch
      carries 'prev_mean', the cached latent)
  params: {'unet', 'conditioner', 'vae'}; batch: the pipeline's host batch or a device batch (only prev_image,
  events, event_mask and the optional prev_mean are read, through batch_format.to_device; host-only
  entries such as 'key' are ignored).
  keys: [B] PRNG keys (`per_sample_keys`).

  One jitted program: conditioner (once) -> all denoising steps in a scan -> decode of z/scale_factor
  -> clamp. Sampler settings default to `config.sample`; `c.model.conditioner.vae_concat` feeds
  concat(z_t, prev_mean * scale_factor) to the UNet. With guidance_scale != 1 the unconditional
  branch uses `null_context` (default `config.sample.guidance_null`): 'zeros' (an all-zero context,
  the trainer's `train.cond_dropout`), 'no_events' (the conditioner on the same I_prev with every event
  removed: the trainer's `train.event_dropout`, so guidance amplifies what the events change) or a
  function context -> null context; it must match how the trainer dropped conditions.
  `events_removed` gives the events-removed condition (`ehrxdiff sample --events none`). `sharding` (a NamedSharding over the batch axis)
  places the batch and constrains latents and images; parameters keep whatever sharding they have.
  """
  s = config.sample
  sampler = dfn.canonical_sampler(sampler if sampler is not None else s.sampler)
  steps = int(steps if steps is not None else s.steps)
  eta = float(eta if eta is not None else s.eta)
  guidance_scale = float(guidance_scale if guidance_scale is not None else s.guidance_scale)
  schedule = schedule if schedule is not None else dfn.make_schedule(config.diffusion)
  scale_factor = float(config.diffusion.scale_factor)
  vae_concat = bool(config.model.conditioner.get("vae_concat", False))
  prediction = dfn.prediction_type(config.diffusion)
  spacing = str(s.get("timestep_spacing", "leading"))
  null_context = s.get("guidance_null", "zeros") if null_context is None else null_context
  if not (callable(null_context) or null_context in ("zeros", "no_events")):
    raise ValueError(f"null_context must be 'zeros', 'no_events' or a callable, got {null_context!r}")
  if sampler == "dpmpp_2m" and float(schedule.alphas_cumprod[-1]) == 0.0:
    raise ValueError("dpmpp_2m needs alpha_bar > 0 at every step; a zero-terminal-SNR schedule "
                     "samples with ddim or ddpm")
  f = downsample_factor(config.model.vae.ch_mult)
  z_channels = int(config.model.vae.embed_dim)

  def _generate(params, batch, keys):
    batch = batch_format.to_device(batch)
    prev_image = _constrain(jnp.asarray(batch["prev_image"], jnp.float32), sharding)
    if "prev_mean" in batch:
      prev_mean = jnp.asarray(batch["prev_mean"], jnp.float32)
    elif vae_encode_mean is not None:
      prev_mean = vae_encode_mean(params["vae"], prev_image).astype(jnp.float32)
    else:
      raise ValueError("the batch has no 'prev_mean' and no vae_encode_mean was given")
    prev_mean = _constrain(prev_mean, sharding)
    context = conditioner_apply(params["conditioner"], prev_image, prev_mean, batch["events"],
                                batch["event_mask"])
    uncond = None
    if guidance_scale != 1.0 and null_context == "zeros":
      uncond = jnp.zeros_like(context)
    elif guidance_scale != 1.0 and null_context == "no_events":
      uncond = conditioner_apply(params["conditioner"], prev_image, prev_mean,
                                 *events_removed(batch["events"], batch["event_mask"], config))
    elif guidance_scale != 1.0:
      uncond = null_context(context)
    concat = prev_mean * scale_factor if vae_concat else None

    def denoise(z, t, cond=True):
      x_in = jnp.concatenate([z, concat.astype(z.dtype)], axis=-1) if vae_concat else z
      return unet_apply(params["unet"], x_in, t, context if cond else uncond)

    h, w = prev_image.shape[1] // f, prev_image.shape[2] // f
    z0 = sample_latents(denoise, (h, w, z_channels), keys, schedule=schedule, sampler=sampler, steps=steps,
                        eta=eta, guidance_scale=guidance_scale, sharding=sharding, prediction=prediction,
                        spacing=spacing)
    images = vae_decode(params["vae"], z0 / scale_factor).astype(jnp.float32)
    return _constrain(jnp.clip(images, -1.0, 1.0), sharding)

  jitted = jax.jit(_generate)

  def generate(params, batch, keys):
    arrays = {k: batch[k] for k in BATCH_KEYS if k in batch}
    if sharding is not None:
      arrays = {k: v if isinstance(v, jax.Array) else jax.device_put(np.asarray(v), sharding)
                for k, v in arrays.items()}
      if not isinstance(keys, jax.Array) or keys.sharding != sharding:
        keys = jax.device_put(keys, sharding)
    return jitted(params, arrays, keys)

  generate.jitted = jitted
  generate.settings = dict(sampler=sampler, steps=steps, eta=eta, guidance_scale=guidance_scale,
                           vae_concat=vae_concat, scale_factor=scale_factor, prediction=prediction,
                           timestep_spacing=spacing,
                           guidance_null=null_context if isinstance(null_context, str) else "custom")
  return generate
