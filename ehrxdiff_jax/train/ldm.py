"""The latent diffusion objective of EHRXDiff (model-facts.md, "Diffusion" and "Training").

Per (micro-)batch, inside the jitted step:
  z0      = sample of q(z | I_trg) x scale_factor   (frozen VAE; or from cached `target_moments`)
  prev    = mean of q(z | I_prev), unscaled          (frozen VAE; or cached `prev_mean`)
  context = Conditioner(I_prev, prev, events, mask)  (trainable; table-tower dropout active in training)
            with probability `train.cond_dropout` per sample replaced by zeros (classifier-free guidance;
            0 = the reference)
            with probability `train.event_dropout` per sample computed with every event removed (the
            no-events condition that `sample.guidance_null='no_events'` guides against; 0 = reference)
  t ~ U{0..T-1}, eps ~ N(0, I), z_t = q_sample(z0, t, eps),
  loss = mean w(t) (UNet(z_t, t, context) - target)^2; target eps (the paper) or v
  (`diffusion.prediction`), w = 1 (the paper) or min-SNR (`diffusion.loss_weighting`)
Trainable: 'unet' and 'conditioner'; frozen: 'vae'; EMA: 'unet'.
"""
from __future__ import annotations

import jax
import jax.experimental.multihost_utils
import jax.numpy as jnp
import numpy as np

from ehrxdiff_jax import batch_format, diffusion, models
from ehrxdiff_jax.train.objective import Objective


class LDMObjective(Objective):
  name = "ldm"
  trainable_keys = ("unet", "conditioner")
  ema_keys = ("unet",)

  def __init__(self, cfg):
    super().__init__(cfg)
    self.vae = models.build_vae(cfg)
    self.unet = models.build_unet(cfg)
    self.unet_apply = models.make_unet_apply(cfg, self.unet)
    self.conditioner = models.build_conditioner(cfg)
    self.schedule = diffusion.make_schedule(cfg.diffusion)
    self.scale_factor = float(cfg.diffusion.scale_factor)
    self.num_timesteps = int(cfg.diffusion.num_timesteps)
    self.cond_dropout = float(cfg.train.cond_dropout)
    self.event_dropout = float(cfg.train.get("event_dropout", 0.0))
    self.prediction = diffusion.prediction_type(cfg.diffusion)
    self.loss_weighting = str(cfg.diffusion.get("loss_weighting", "uniform"))
    self.min_snr_gamma = float(cfg.diffusion.get("min_snr_gamma", 5.0))
    self.loss_buckets = int(cfg.diffusion.get("loss_buckets", 0))

  def init_params(self, rng):
    return models.init_ldm(self.cfg, rng)

  # ---------------------------------------------------------------- pieces (also used by sampling)
  def latents(self, vae_params, batch, rng):
    """(z0 scaled target latent, unscaled prev mean), from cached moments when the batch has them."""
    if "target_moments" in batch:
      from ehrxdiff_jax.nn.vae import DiagonalGaussian
      target = DiagonalGaussian.from_moments(batch["target_moments"].astype(jnp.float32))
    else:
      target = self.vae.apply({"params": vae_params}, batch["target_image"], method=self.vae.encode)
    if "prev_mean" in batch:
      prev_mean = batch["prev_mean"].astype(jnp.float32)
    else:
      prev_mean = self.vae.apply({"params": vae_params}, batch["prev_image"], method=self.vae.encode).mean
    z0 = target.sample(rng) * self.scale_factor
    return jax.lax.stop_gradient(z0), jax.lax.stop_gradient(prev_mean)

  def context(self, cond_params, batch, prev_mean, rng, train: bool):
    return self.conditioner.apply({"params": cond_params}, batch.get("prev_image"), prev_mean,
                                  batch.get("events"), batch.get("event_mask"), deterministic=not train,
                                  rngs={"dropout": rng} if train else {})

  def loss(self, params, batch, rng, train: bool, stratified: bool = False):
    """The weighted diffusion loss and, per t bucket k (`diffusion.loss_buckets`), `loss_t{k}`: the
    unweighted squared error of the samples whose t fell in bucket k (NaN when none did; the loop
    averages with nanmean). `stratified` draws sample i's t inside bucket i mod K, so every bucket
    is measured on every validation batch."""
    r_lat, r_t, r_eps, r_drop, r_cfg, r_ev = jax.random.split(rng, 6)
    z0, prev_mean = self.latents(params["vae"], batch, r_lat)
    b = z0.shape[0]
    events, event_mask = batch.get("events"), batch.get("event_mask")
    if train and self.event_dropout > 0 and events is not None:
      keep = jax.random.uniform(r_ev, (b,)) >= self.event_dropout
      events = events * keep[:, None, None].astype(events.dtype)
      event_mask = jnp.logical_and(event_mask, keep[:, None])
    context = self.context(params["conditioner"], {**batch, "events": events, "event_mask": event_mask},
                           prev_mean, r_drop, train)
    if train and self.cond_dropout > 0 and context is not None:
      keep = jax.random.uniform(r_cfg, (b,)) >= self.cond_dropout
      context = context * keep[:, None, None].astype(context.dtype)
    k = self.loss_buckets
    if stratified:
      bucket = jnp.arange(b) % k
      u = jax.random.uniform(r_t, (b,))
      t = jnp.minimum(((bucket + u) * self.num_timesteps / k).astype(jnp.int32), self.num_timesteps - 1)
    else:
      t = jax.random.randint(r_t, (b,), 0, self.num_timesteps)
    eps = jax.random.normal(r_eps, z0.shape, jnp.float32)
    z_t = diffusion.q_sample(self.schedule, z0, t, eps)
    x_in = models.unet_input(z_t, prev_mean, self.cfg)
    pred = self.unet_apply(params["unet"], x_in, t, context).astype(jnp.float32)
    target = diffusion.training_target(self.schedule, z0, t, eps, self.prediction)
    per_sample = jnp.mean(jnp.square(pred - target), axis=(1, 2, 3))
    weights = diffusion.loss_weights(self.schedule, t, self.loss_weighting, self.prediction,
                                     self.min_snr_gamma)
    loss = jnp.mean(weights * per_sample)
    aux = {}
    if k:
      bucket = jnp.minimum(t * k // self.num_timesteps, k - 1)
      onehot = jax.nn.one_hot(bucket, k, dtype=jnp.float32)             # [B, K]
      sums, counts = per_sample @ onehot, jnp.sum(onehot, axis=0)
      for i in range(k):
        aux[f"loss_t{i}"] = jnp.where(counts[i] > 0, sums[i] / jnp.maximum(counts[i], 1.0), jnp.nan)
    return loss, aux

  def eval_metrics(self, params, ema_params, batch, rng):
    loss, buckets = self.loss(params, batch, rng, train=False, stratified=True)
    out = {"loss": loss, **buckets}
    if ema_params:
      loss_ema, _ = self.loss({**params, **ema_params}, batch, rng, train=False, stratified=True)
      out["loss_ema"] = loss_ema
    return out

  def dummy_batch(self, batch_size):
    """The entries the step consumes: images + events, or with `data.cached_latents` the cached VAE
    moments of I_trg and mean of I_prev instead of the target image (I_prev still feeds the CLIP tower)."""
    batch = {k: np.asarray(v) for k, v in models.dummy_batch(self.cfg, batch_size).items()}
    if self.cfg.data.cached_latents:
      h, w, c = models.latent_shape(self.cfg)
      del batch["target_image"]
      batch["target_moments"] = np.zeros((batch_size, h, w, 2 * c), np.float32)
      batch["prev_mean"] = np.zeros((batch_size, h, w, c), np.float32)
    return batch


  # ---------------------------------------------------------------- periodic sample grids
  def generate_fn(self, sharding=None):
    """`generate(params, batch, keys)` of ehrxdiff_jax/sample.py for this objective's networks."""
    from ehrxdiff_jax import sample as sample_lib
    vae, cond = self.vae, self.conditioner
    return sample_lib.make_generate_fn(
        self.unet_apply,
        lambda p, *a: cond.apply({"params": p}, *a),
        lambda p, z: vae.apply({"params": p}, z, method=vae.decode), self.cfg,
        vae_encode_mean=lambda p, x: vae.apply({"params": p}, x, method=vae.encode).mean, sharding=sharding)

  def sample_hook(self, trainer, batches, every: int):
    """A `fit` hook writing [I_prev | prediction (EMA UNet) | I_trg] rows of the first batch of `batches`
    to TensorBoard every `every` steps."""
    from ehrxdiff_jax import parallel
    from ehrxdiff_jax import sample as sample_lib
    host_batch = next(batches)
    n = next(iter(host_batch.values())).shape[0] * jax.process_count()
    generate = self.generate_fn(parallel.batch_sharding(trainer.mesh))
    batch = parallel.to_global({k: v for k, v in host_batch.items()
                                if k in ("prev_image", "events", "event_mask", "prev_mean")}, trainer.mesh, n)
    keys = sample_lib.per_sample_keys(int(self.cfg.seed), list(range(n)))
    use_ema = bool(self.cfg.sample.use_ema)

    def hook(step, state, writer):
      if every <= 0 or step % every:
        return
      params = {**state.params, **state.ema_params} if use_ema else state.params
      with jax.set_mesh(trainer.mesh):
        images = jax.device_get(jax.experimental.multihost_utils.process_allgather(
            generate(params, batch, keys), tiled=True))
      prev = np.asarray(batch_format.device_images(host_batch["prev_image"]))
      target = np.asarray(batch_format.device_images(host_batch["target_image"])) if "target_image" in host_batch \
          else np.zeros_like(prev)
      rows = [np.concatenate([prev[i], images[i], target[i]], axis=1) for i in range(prev.shape[0])]
      writer.image(step, "samples/prev_pred_target", np.clip((np.concatenate(rows, 0) + 1) / 2, 0, 1))
    return hook


  def init_from(self, state, path: str, trainer=None):
    """`train.init_from` for the LDM: a CLIP run (its towers -> the conditioner), a VAE run (-> the frozen
    VAE), or a whole EHRXDiff checkpoint (an LDM run or `ehrxdiff convert` output: every part, and the
    EMA UNet where it has one)."""
    from ehrxdiff_jax.train.checkpoint import resolve_step_dir, saved_param_parts
    from ehrxdiff_jax.train.clip import clip_init_state
    from ehrxdiff_jax.train.state import init_parts_from_run
    step_dir = resolve_step_dir(path)[1]   # one step for every read below
    have = saved_param_parts(step_dir)
    if {"image_tower", "table_tower"} & have:
      return clip_init_state(state, step_dir, part="conditioner")
    if have == {"vae"}:
      from ehrxdiff_jax.train.vae import vae_init_state
      return vae_init_state(state, step_dir)
    parts = ("unet", "conditioner", "vae")
    missing = set(parts) - have
    if missing:
      raise ValueError(f"{path}: not a CLIP, VAE or EHRXDiff checkpoint (parts {sorted(have)}; "
                       f"missing {sorted(missing)})")
    return init_parts_from_run(state, step_dir, parts)


def make_objective(cfg) -> LDMObjective:
  return LDMObjective(cfg)

