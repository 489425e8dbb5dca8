"""Cached VAE latents for `ehrxdiff prepare --vae-checkpoint PATH [--vae-config FILE] [--latents-batch N]`.

The frozen VAE of the LDM encodes every image of every step of every epoch when training from images;
with cached latents it encodes each distinct image once, here. Every record then carries

    target_moments  float16 [h, w, 2z]  mean and logvar of q(z | I_trg)  (the LDM samples its target from them)
    prev_mean       float16 [h, w, z]   mean of q(z | I_prev)           (the conditioner's VAE tokens)
    prev_logvar     float16 [h, w, z]   logvar of q(z | I_prev)          (the w_null target: q(z | I_prev))

of the *un-augmented* images at the dataset's image size, exactly as the images path would compute them
(the same uint8 pixels, the same [-1, 1] scaling as the pipeline's batches, the posterior's clipped
logvar). `prev_logvar` is stored so that a no-change sample (target := I_prev) draws its target latent
from the same distribution as the images path does, instead of a zero-variance stand-in.

PATH is what `ehrxdiff_jax.train.vae.load_vae_params` reads: a VAE run (`ehrxdiff train --config
configs/vae.py`), an EHRXDiff LDM run (its frozen 'vae'), or a Cheff / LDM / EHRXDiff PyTorch file.
The VAE architecture comes from `--vae-config`, else from the run's `config.json`, else the paper's
(`configs/base.py`, the Cheff autoencoder); the parameters must match it (shapes checked) and its
`data.image_size` must be the dataset's `--image-size`.

The manifest's `latents` entry records the source (path, step, a sha256 fingerprint of the parameters),
the VAE fields and the latent shape; `check_dataset_latents` is the check a trainer runs against them.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Iterable

import numpy as np

# The record fields written here (and read by ehrxdiff_jax/pipeline.py with data.cached_latents).
FIELDS = ("target_moments", "prev_mean", "prev_logvar")


def params_fingerprint(params) -> str:
  """'sha256:<hex>' over the parameter names, shapes and float32 values (boxed or unboxed, jax or numpy):
  the same weights give the same fingerprint whether read from a run, a PyTorch file or a train state."""
  import flax.linen as nn
  import jax
  leaves = jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]
  h = hashlib.sha256()
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    value = np.ascontiguousarray(np.asarray(jax.device_get(leaf), np.float32))
    h.update(f"{jax.tree_util.keystr(path)}|{value.shape}|".encode())
    h.update(value.tobytes())
  return "sha256:" + h.hexdigest()


def vae_config(path: str, config_file: str | None = None, workdir: str | None = None):
  """(ConfigDict with model.vae and data.image_size, where it came from) for the VAE at `path`; `workdir`:
  the run holding it, if it is a run."""
  from ehrxdiff_jax.config_util import load_config, read_saved_config
  if config_file:
    return load_config(config_file), config_file
  run_cfg = os.path.join(workdir, "config.json") if workdir else None
  if run_cfg and os.path.exists(run_cfg):
    return read_saved_config(workdir), run_cfg
  from configs import base
  return base.get_config(), "configs/base.py (the paper's VAE)"


class VAEEncoder:
  """The frozen VAE of `path` with a jitted batch encoder: uint8 [B, H, W] -> float32 moments [B, h, w, 2z]."""

  def __init__(self, path: str, image_size: int, config_file: str | None = None):
    import jax
    from ehrxdiff_jax import batch_format, models
    from ehrxdiff_jax.interop.vae import expected_vae_params
    from ehrxdiff_jax.train.checkpoint import resolve_step_dir
    from ehrxdiff_jax.train.vae import load_vae_params
    workdir, step = None, None
    if not os.path.isfile(path):
      workdir, _, step = resolve_step_dir(path)
    cfg, cfg_source = vae_config(path, config_file, workdir)
    size = int(cfg.data.image_size)
    if size != int(image_size):
      raise ValueError(f"the VAE config ({cfg_source}) is for {size} px images, the dataset is {image_size} px: "
                       f"prepare with --image-size {size}, or pass a --vae-config for {image_size} px")
    cfg.model.dtype = "float32"   # the cache is written once: encode in full precision (stored as float16)
    cfg.model.remat = "none"
    self.vae = models.build_vae(cfg)
    try:
      params = load_vae_params(path, expected=expected_vae_params(self.vae, size))
    except ValueError as e:  # ConversionError and CheckpointError are ValueErrors
      raise ValueError(f"{path}: the VAE weights do not fit the VAE of {cfg_source} "
                       f"(model.vae={dict(cfg.model.vae)}): {e}") from None
    self.params = jax.device_put(params)
    self.image_size = size
    self.latent_shape = tuple(int(x) for x in models.latent_shape(cfg))
    self.info = dict(source=os.path.abspath(path), step=step, fingerprint=params_fingerprint(params),
                     config=cfg_source, vae=json.loads(cfg.model.vae.to_json()), image_size=size,
                     shape=list(self.latent_shape), dtype="float16", fields=list(FIELDS))
    vae = self.vae

    @jax.jit
    def encode(p, u8):
      # The training step's conversion of the host batch's images (ehrxdiff_jax/batch_format.py).
      x = batch_format.images_to_float(u8)
      x = jax.numpy.repeat(x[..., None], vae.in_channels, axis=-1)
      return vae.apply({"params": p}, x, method=vae.encode).moments
    self._encode = encode

  def encode(self, images: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W] -> float32 moments [B, h, w, 2z] (mean, clipped logvar)."""
    return np.asarray(self._encode(self.params, np.asarray(images, np.uint8)))


def _read_png(path: str) -> np.ndarray:
  from PIL import Image
  with Image.open(path) as img:
    return np.asarray(img.convert("L"), np.uint8)


def encode_files(encoder: VAEEncoder, paths: Iterable[str], out_path: str, batch_size: int = 32,
                 progress: bool = True) -> np.ndarray:
  """Moments of the grey images at `paths` (in order) as a float16 [N, h, w, 2z] memory map at `out_path`
  (host memory stays bounded at paper scale). Batches have a fixed size (the last one is padded) so
  the encoder compiles once."""
  from tqdm import tqdm
  paths = list(paths)
  h, w, z = encoder.latent_shape
  out = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float16, shape=(len(paths), h, w, 2 * z))
  s = encoder.image_size
  bar = tqdm(total=len(paths), desc="latents", unit="img", dynamic_ncols=True, disable=not progress)
  for start in range(0, len(paths), batch_size):
    chunk = paths[start:start + batch_size]
    batch = np.zeros((batch_size, s, s), np.uint8)
    for i, p in enumerate(chunk):
      img = _read_png(p)
      if img.shape != (s, s):
        raise ValueError(f"{p}: image {img.shape}, expected {(s, s)} (the dataset's --image-size)")
      batch[i] = img
    moments = encoder.encode(batch)[:len(chunk)]
    if not np.isfinite(moments).all() or np.abs(moments).max() > np.finfo(np.float16).max:
      raise ValueError(f"the VAE gives non-finite or float16-overflowing moments for images {start}..."
                       f"{start + len(chunk) - 1} (max |x| {np.nanmax(np.abs(moments)):.3g})")
    out[start:start + len(chunk)] = moments.astype(np.float16)
    bar.update(len(chunk))
  bar.close()
  out.flush()
  return out


def record_arrays(moments: np.ndarray, prev_row: int, target_row: int) -> dict[str, np.ndarray]:
  """The cached-latent fields of one record from the rows of its two images in `encode_files`' output."""
  z = moments.shape[-1] // 2
  prev = np.asarray(moments[prev_row])
  return {"target_moments": np.asarray(moments[target_row]), "prev_mean": prev[..., :z],
          "prev_logvar": prev[..., z:]}


def latent_mean_std(moments: np.ndarray, chunk: int = 1024) -> list[float]:
  """[mean, std] of latents z ~ q(z | I) over the encoded images: the LDM's rule sets
  diffusion.scale_factor = 1 / std (unit-variance latents). Var z = Var(mean) + E[exp(logvar)].
  Image statistics only, no labels; every encoded image (all splits) counts."""
  z = moments.shape[-1] // 2
  n, total, total_sq, total_var = 0, 0.0, 0.0, 0.0
  for start in range(0, len(moments), chunk):
    m = np.asarray(moments[start:start + chunk], np.float64)
    n += m[..., :z].size
    total += m[..., :z].sum()
    total_sq += np.square(m[..., :z]).sum()
    total_var += np.exp(m[..., z:]).sum()
  mean = total / n
  return [float(mean), float(np.sqrt(total_sq / n - mean ** 2 + total_var / n))]


def cache_latents(encoder: VAEEncoder, image_files: dict[str, str], dicoms: Iterable[str], cache_dir: str,
                  batch_size: int, log=print) -> tuple[np.ndarray, dict[str, int]]:
  """Encodes each distinct image once: (float16 moments [N, h, w, 2z], dicom -> row)."""
  order = sorted(set(dicoms))
  os.makedirs(cache_dir, exist_ok=True)
  t0 = time.time()
  out = os.path.join(cache_dir, f"latents-{encoder.info['fingerprint'][7:23]}-{encoder.image_size}.npy")
  moments = encode_files(encoder, [image_files[d] for d in order], out, batch_size)
  encoder.info["mean_std"] = latent_mean_std(moments)
  log(f"latents: {len(order)} images encoded in {time.time() - t0:.1f}s, latent {encoder.latent_shape}")
  return moments, {d: i for i, d in enumerate(order)}


def check_dataset_latents(manifest: dict, cfg, vae_params=None) -> None:
  """Refuses training with `data.cached_latents` on a dataset whose cached latents do not belong to the
  model: none cached, another latent shape, or (given the model's VAE parameters) another VAE."""
  from ehrxdiff_jax import models
  lat = manifest.get("latents")
  if not lat:
    raise ValueError("data.cached_latents=True but the dataset has no cached latents: run `ehrxdiff prepare "
                     "... --vae-checkpoint PATH`, or set --config.data.cached_latents=False")
  want = list(models.latent_shape(cfg))
  if list(lat["shape"]) != want:
    raise ValueError(f"the dataset's cached latents are {lat['shape']} (VAE {lat['source']}), the model's "
                     f"latents are {want}")
  if vae_params is not None:
    got = params_fingerprint(vae_params)
    if got != lat["fingerprint"]:
      raise ValueError(f"the dataset's latents were encoded by another VAE ({lat['source']}, step "
                       f"{lat['step']}, {lat['fingerprint'][:19]}...) than the model's ({got[:19]}...): "
                       "re-run prepare with this model's VAE, or train from images (data.cached_latents=False)")
