"""CLIP pretraining of the conditioner's image and table towers on (I_prev, S_event) pairs.

    ehrxdiff train --config configs/clip.py --data DIR --workdir runs/clip \
        [--config.train.clip_vision_init=clip-vit-base-patch32.safetensors]
    ehrxdiff train --config configs/clip.py:tiny --data DIR --workdir runs/clip_tiny     # CPU tests
    ehrxdiff train --config configs/clip.py:demo ...     # the towers of configs/demo.py (`ehrxdiff demo`)

Then initialise the diffusion model's conditioner from it: `--config.train.init_from=runs/clip`.

Reference settings (model-facts.md): global batch 1024, AdamW lr 5e-4, betas (0.9, 0.98), eps 1e-6,
weight decay 0.2, 100 epochs (~99 steps per epoch on the paper's 101,819 training pairs), logit scale
init ln(1/0.07) clamped at ln 100, RandomResizedCrop(256, scale 0.75-1, ratio 1) on I_prev, table
embedding = mean over the valid event tokens. The schedule is the reference's: cycles of 500 optimisation
steps (`train.restart_every`), each a linear warm-up over 100 steps then a cosine decay to 0, restarting
(`train.schedule='cosine_restarts'`; 'cosine' decays once over `num_steps` instead).

CLIP options (train.clip_*):
  clip_vision_init   '' (random image tower) or a transformers CLIPVisionModel / CLIPModel state dict
                     (.safetensors / .bin / .pt) or an OpenAI-CLIP `visual.*` one; the reference starts
                     from OpenAI ViT-B/32 (224 px). Nothing is downloaded: pass the file.
  clip_pos_embed     'interpolate' (bicubic 7x7+1 -> 8x8+1) | 'reinit' (the reference: keep a fresh one)
  clip_pool          'mean' (mean over valid tokens) | 'reference_sum' (the reference's sum over all 1024
                     slots, padding included, divided by the valid count)
  clip_augment, clip_crop_scale   the RandomResizedCrop on the image (training only)
"""
import math

from configs import base, demo, tiny

BASES = {None: base.get_config, "": base.get_config, "tiny": tiny.get_config, "demo": demo.get_config}


def get_config(arg: str | None = None):
  if arg not in BASES:
    raise ValueError(f"unknown clip config variant {arg!r}; expected 'tiny', 'demo' or nothing")
  c = BASES[arg]()
  c.name = f"clip_{arg}" if arg else "clip"
  c.data.cached_latents = False  # CLIP reads the images
  t = c.train
  t.objective = "clip"
  t.learning_rate = 5e-4
  t.b1, t.b2, t.eps = 0.9, 0.98, 1e-6
  t.weight_decay = 0.2
  t.schedule = "cosine_restarts"
  t.clip_vision_init = ""
  t.clip_pos_embed = "interpolate"
  t.clip_pool = "mean"
  t.clip_augment = True
  t.clip_crop_scale = (0.75, 1.0)
  t.clip_logit_scale_init = math.log(1 / 0.07)
  t.clip_max_logit_scale = math.log(100.0)
  if arg == "tiny":
    t.batch_size = 16
    t.num_steps = 100
    t.warmup_steps = 10
    t.restart_every = 50         # the reference's cycle shape (warm-up 1/5 of the cycle), scaled down
    t.learning_rate = 1e-3
    t.log_every = 10
    t.eval_every = 50
    t.ckpt_every = 50
  elif arg == "demo":   # one cosine decay over 150 steps: lr 1e-3 at batch 16 stayed at chance
    t.batch_size = 32
    t.num_steps = 150
    t.learning_rate = 3e-4
    t.schedule = "cosine"
    t.warmup_steps = 15
    t.log_every = 25
    t.eval_every = 75
    t.ckpt_every = 75
  else:
    t.batch_size = 1024
    t.num_steps = 10_000
    t.warmup_steps = 100
    t.restart_every = 500
    t.eval_every = 500
    t.ckpt_every = 1000
  return c
