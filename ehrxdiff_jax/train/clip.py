"""CLIP pretraining of the conditioner's two towers on (I_prev, S_event) pairs (model-facts.md,
"CLIP pretraining"; the reference's CLIP_pretrain CustomTabViTCLIPWrapper).

Per (micro-)batch of GLOBAL arrays, inside the jitted step:
  image   = RandomResizedCrop(I_prev) (training only; `augment.random_resized_crop`, scale 0.75-1,
            ratio 1)
  u_i     = ln_post(CLS) of the image tower (`VisionTransformer.pooled`; no projection, as the
            reference)
  v_i     = pool of the table-tower tokens over the events: 'mean' = mean over the valid tokens
            (default), 'reference_sum' = the reference's sum over all slots (padding included) /
            valid count
  logits  = exp(clip(s, -ln 100, ln 100)) * norm(u) @ norm(v)^T      [B, B], B = the GLOBAL batch
  loss    = (CE(logits, arange B) + CE(logits^T, arange B)) / 2
Negatives span the whole global batch: the batch is one jax.Array sharded over ('data', 'fsdp'), so
the [B, B] similarity is a global computation (XLA inserts the all-gather), with no per-device loss
or mean. Metrics: loss, logit_scale (= exp of the clamped parameter), retrieval accuracy
image->events (`acc_img2ev`: argmax over each row) and events->image (`acc_ev2img`).

The logit scale s is a learnable scalar (init ln(1/0.07)), clamped to [-ln 100, ln 100] where it
is used; `post_update` also clamps the parameter after every step, as the reference (the forward
clamp alone gives the same scale; only the hidden parameter could drift above ln 100, where its
gradient is zero). Parameters: {'image_tower' (with ln_post), 'table_tower', 'logit_scale'}; all
trainable, no EMA. AdamW lr 5e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.2 on every parameter
(as the reference), per optimisation step a warm-up + cosine in cycles of 500 steps that restart
(train.schedule='cosine_restarts'): configs/clip.py.

Image-tower initialisation (`train.clip_vision_init`): a transformers `CLIPVisionModel` /
`CLIPModel` state dict (.safetensors/.bin/.pt) or an OpenAI-CLIP `visual.*` one, e.g. ViT-B/32 at
224 px; the positional embedding 7x7+1 is adapted to the config's grid (8x8+1 at 256 px) by
'interpolate' (bicubic) or 'reinit' (the reference: OpenAI's is dropped, the fresh random one kept),
`train.clip_pos_embed`. The weights enter `init_params` as constants of the jitted initialiser.

Using the result: `load_clip_towers(workdir)` reads the latest checkpoint of a CLIP run (host
numpy) and `clip_init_state(state, workdir, part)` puts its towers into a fresh TrainState: the LDM
conditioner (`train.init_from`) and the table classifier.
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from ehrxdiff_jax import models
from ehrxdiff_jax.augment import random_resized_crop
from ehrxdiff_jax.nn.table import pool_tokens
from ehrxdiff_jax.train.checkpoint import (CheckpointError, resolve_step_dir, restore_run_params,
                                           saved_param_parts)
from ehrxdiff_jax.train.objective import Objective
from ehrxdiff_jax.train.state import put_params, replace_in_boxed, replace_part

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)
POS_EMBED_MODES = ("interpolate", "reinit")


# ------------------------------------------------------------------ the loss


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along the last axis (torch F.normalize)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def clamp_logit_scale(s: jax.Array, max_value: float = LOGIT_SCALE_MAX) -> jax.Array:
  return jnp.clip(jnp.asarray(s, jnp.float32), -max_value, max_value)


def contrastive_loss(image_emb: jax.Array, table_emb: jax.Array, logit_scale: jax.Array,
                     max_logit_scale: float = LOGIT_SCALE_MAX) -> tuple[jax.Array, dict]:
  """Symmetric InfoNCE over the whole (global) batch. image_emb, table_emb [B, D] (unnormalised),
  logit_scale: the log-scale parameter (clamped here). Returns (loss, metrics)."""
  u, v = l2_normalize(image_emb), l2_normalize(table_emb)
  scale = jnp.exp(clamp_logit_scale(logit_scale, max_logit_scale))
  # [B, B]: image i against events j
  logits = scale * jnp.matmul(u, v.T, precision=jax.lax.Precision.HIGHEST)
  diag = jnp.diagonal(logits)
  loss_img = jnp.mean(jax.nn.logsumexp(logits, axis=1) - diag)                 # image -> events
  loss_ev = jnp.mean(jax.nn.logsumexp(logits, axis=0) - diag)                  # events -> image
  target = jnp.arange(logits.shape[0])
  metrics = {
      "logit_scale": scale,
      "acc_img2ev": jnp.mean((jnp.argmax(logits, axis=1) == target).astype(jnp.float32)),
      "acc_ev2img": jnp.mean((jnp.argmax(logits, axis=0) == target).astype(jnp.float32)),
  }
  return 0.5 * (loss_img + loss_ev), metrics


# ------------------------------------------------------------------ using a CLIP run


def load_clip_towers(path: str, include_ln_post: bool = False) -> dict:
  """{'image_tower', 'table_tower', 'logit_scale'} (numpy) of the latest checkpoint of a CLIP run.

  `path`: the CLIP workdir, its checkpoints/ folder, or one step folder. `include_ln_post=False`
  drops the image tower's ln_post (the conditioner does not use it)."""
  step_dir = resolve_step_dir(path)[1]   # one step for both reads, even while the run is saving
  have = saved_param_parts(step_dir)
  missing = [k for k in ("image_tower", "table_tower") if k not in have]
  if missing:
    raise CheckpointError(f"{path}: not a CLIP checkpoint (no {missing} in its params; has "
                          f"{sorted(have)})")
  parts = [k for k in ("image_tower", "table_tower", "logit_scale") if k in have]
  params = restore_run_params(step_dir, parts=parts).params
  image = dict(params["image_tower"])
  if not include_ln_post:
    image.pop("ln_post", None)
  out = {"image_tower": image, "table_tower": dict(params["table_tower"])}
  if "logit_scale" in params:
    out["logit_scale"] = np.asarray(params["logit_scale"], np.float32)
  return out


def clip_init_state(state, path: str, part: str | None = "conditioner",
                    table_encoder_only: bool = False):
  """A fresh TrainState whose params[part] (e.g. the LDM's 'conditioner'; None: the top level, e.g.
  the table classifier) takes the towers of the CLIP run at `path` (host-side, after init_state: the
  objectives' `init_from`)."""
  towers = load_clip_towers(path, include_ln_post=False)

  def fn(tree):
    new = {}
    for name in ("image_tower", "table_tower"):
      if name not in tree:
        continue
      t = towers[name]
      if name == "table_tower" and table_encoder_only:
        t = {k: v for k, v in t.items() if k != "fc"}
      if name == "image_tower" and "ln_post" not in tree[name]:
        t = {k: v for k, v in t.items() if k != "ln_post"}
      new[name] = t
    if not new:
      raise ValueError(f"no image_tower / table_tower to initialise from {path} (have "
                       f"{sorted(tree)})")
    return put_params(tree, new, part or "")
  return replace_part(state, part, fn)


# ------------------------------------------------------------------ image-tower initialisation


@functools.lru_cache(maxsize=2)
def _converted_vision(path: str, grid: int | None) -> dict:
  from ehrxdiff_jax.interop import clip as clip_interop
  from ehrxdiff_jax.interop.common import load_state_dict
  sd = load_state_dict(path)
  with jax.ensure_compile_time_eval():  # eager even when first called inside init_params' trace
    if any(k.startswith("visual.") for k in sd):
      return clip_interop.convert_openai_clip_visual(sd, include_ln_post=True, grid=grid)
    return clip_interop.convert_hf_clip_vision(sd, include_ln_post=True, grid=grid)


def vision_init_params(path: str, grid: int, pos_embed: str = "interpolate") -> dict:
  """Image-tower params (numpy, with ln_post) from a CLIP vision state dict, adapted to
  `grid`x`grid` patches: 'interpolate' resizes the positional embedding, 'reinit' leaves it out (the
  caller keeps its freshly initialised one)."""
  if pos_embed not in POS_EMBED_MODES:
    raise ValueError(f"unknown clip_pos_embed {pos_embed!r}; expected one of {POS_EMBED_MODES}")
  grid = grid if pos_embed == "interpolate" else None
  params = dict(_converted_vision(os.path.abspath(path), grid))
  if pos_embed == "reinit":
    params.pop("positional_embedding")
  return params


# ------------------------------------------------------------------ the objective


class CLIPObjective(Objective):
  name = "clip"
  trainable_keys = None        # image_tower, table_tower and logit_scale
  ema_keys = ()

  def __init__(self, cfg):
    super().__init__(cfg)
    t = cfg.train
    self.image_tower = models.build_image_tower(cfg)
    self.table_tower = models.build_table_tower(cfg)
    self.pool = str(t.get("clip_pool", "mean"))
    self.augment = bool(t.get("clip_augment", True))
    self.crop_scale = tuple(float(x) for x in t.get("clip_crop_scale", (0.75, 1.0)))
    self.vision_init = str(t.get("clip_vision_init", "") or "")
    self.pos_embed = str(t.get("clip_pos_embed", "interpolate"))
    self.logit_scale_init = float(t.get("clip_logit_scale_init", LOGIT_SCALE_INIT))
    self.max_logit_scale = float(t.get("clip_max_logit_scale", LOGIT_SCALE_MAX))
    if self.pos_embed not in POS_EMBED_MODES:
      raise ValueError(f"unknown train.clip_pos_embed {self.pos_embed!r}; expected one of "
                       f"{POS_EMBED_MODES}")

  def init_params(self, rng):
    r_img, r_tab = jax.random.split(rng)
    b = models.dummy_batch(self.cfg, 1)
    image = self.image_tower.init(r_img, b["prev_image"], method="pooled")["params"]
    table = self.table_tower.init(r_tab, b["events"], b["event_mask"])["params"]
    if self.vision_init:
      init = vision_init_params(self.vision_init, self.image_tower.grid, self.pos_embed)
      image = replace_in_boxed(image, init, "image_tower")
    return {"image_tower": image, "table_tower": table,
            "logit_scale": jnp.asarray(self.logit_scale_init, jnp.float32)}

  def embeddings(self, params, batch, rng, train: bool):
    """(image embeddings [B, width], table embeddings [B, out_dim]), unnormalised."""
    r_crop, r_drop = jax.random.split(rng)
    images = batch["prev_image"]
    if train and self.augment:
      images = random_resized_crop(images, r_crop, images.shape[1], scale=self.crop_scale)
    img = self.image_tower.apply({"params": params["image_tower"]}, images, method="pooled")
    tokens = self.table_tower.apply({"params": params["table_tower"]}, batch["events"],
                                    batch["event_mask"], deterministic=not train,
                                    rngs={"dropout": r_drop} if train else {})
    return img, pool_tokens(tokens, batch["event_mask"], self.pool)

  def loss(self, params, batch, rng, train: bool):
    img, tab = self.embeddings(params, batch, rng, train)
    return contrastive_loss(img, tab, params["logit_scale"], self.max_logit_scale)

  def post_update(self, params: dict) -> dict:
    """The reference's parameter clamp after each optimisation step (for a loop that calls it)."""
    return {**params, "logit_scale": clamp_logit_scale(params["logit_scale"], self.max_logit_scale)}

  def dummy_batch(self, batch_size):
    b = models.dummy_batch(self.cfg, batch_size)
    return {k: np.asarray(b[k]) for k in ("prev_image", "events", "event_mask")}


def make_objective(cfg) -> CLIPObjective:
  return CLIPObjective(cfg)
