"""`ehrxdiff convert`: a published PyTorch checkpoint -> an orbax checkpoint that this code reads.

    ehrxdiff convert --from-torch EHRXDiff.ckpt --config configs/ehrxdiff.py --out RUN
    ehrxdiff convert --from-torch cheff_autoencoder.pt --config configs/ehrxdiff.py --out VAE \
        --kind cheff-vae
    ehrxdiff convert --from-torch clip.ckpt --config configs/clip.py --out CLIP --kind clip

The file is read with torch.load(weights_only=True) (never pickle) and every key is mapped
(interop.ehrxdiff): a key left over or a weight missing is an error that names it, and the
architecture read off the weights is compared with --config field by field, head counts and
GroupNorm groups (which no weight shows) included. OUT gets the layout of a training workdir:

    OUT/config.json                 the resolved config (as `ehrxdiff train` writes it)
    OUT/checkpoints/0/state         {'step', 'params', 'ema_params'} (orbax)
    OUT/checkpoints/0/meta          {'step': 0, 'source', 'kind', 'import': details}

params by kind (the layout of the matching trainer's state):
    ehrxdiff    {'unet', 'conditioner', 'vae'}, ema_params {'unet'} (when the file has model_ema.*)
    cheff-vae   {'vae'}
    clip        {'image_tower' (with ln_post), 'table_tower', 'logit_scale'} (load_clip_towers)
so `ehrxdiff sample --checkpoint OUT` samples an imported EHRXDiff model, and `train.init_from=OUT`
can start from any of them. The directory is written under OUT.tmp-<pid> and renamed when complete.
"""
from __future__ import annotations

import json
import logging
import os
import sys

from ehrxdiff_jax import outputs

log = logging.getLogger("ehrxdiff.convert")


def add_arguments(parser) -> None:
  parser.add_argument("--from-torch", required=True, metavar="FILE",
                      help="PyTorch checkpoint (.ckpt / .pt / .pth)")
  parser.add_argument("--config", required=True,
                      help="config file (configs/*.py[:ARG]) the weights must match")
  parser.add_argument("--out", required=True, help="output directory (training-workdir layout)")
  parser.add_argument("--kind", choices=("auto", "ehrxdiff", "cheff-vae", "clip"), default="auto",
                      help="what the file holds (auto: from the key names)")
  parser.add_argument("--no-ema", action="store_true",
                      help="ehrxdiff: do not convert the model_ema.* UNet")
  parser.add_argument("--vae-mismatch", choices=("error", "warn"), default="error",
                      help="ehrxdiff: when cond_stage_model.autoencoder differs from "
                      "first_stage_model")
  parser.add_argument("--heads-from-config", action="store_true",
                      help="the checkpoint was trained with --config's head counts (no weight "
                      "shows them; without this flag they must be the reference's: 8 UNet heads, "
                      "tower head dim 64)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def write_checkpoint(out: str, cfg, params: dict, ema_params: dict | None = None,
                     meta: dict | None = None, overwrite: bool = False, step: int = 0) -> str:
  """Writes OUT/config.json and OUT/checkpoints/<step>/{state, meta} atomically
  (outputs.atomic_directory)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ehrxdiff_jax.commands.train import config_dict
  from ehrxdiff_jax.train.checkpoint import Checkpointer
  with outputs.atomic_directory(out, overwrite) as tmp:
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config_dict(cfg), f, indent=2, sort_keys=True)
    state = {"step": jnp.asarray(step, jnp.int32),
             "params": jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float32)), params),
             "ema_params": {} if ema_params is None else jax.tree.map(
                 lambda a: jnp.asarray(np.asarray(a, np.float32)), ema_params)}
    ckpt = Checkpointer(os.path.join(tmp, "checkpoints"), keep=1, async_save=False)
    ckpt.save(step, state, meta=dict(meta or {}))
    ckpt.close()
  return os.path.abspath(out.rstrip("/"))


def convert(path: str, cfg, out: str, kind: str = "auto", *, ema: bool = True,
            vae_mismatch: str = "error", heads=None, overwrite: bool = False) -> dict:
  """Imports `path` (read once, torch.load(weights_only=True)) and writes the checkpoint; returns
  the info. heads: the checkpoint's head counts if not the reference's (ehrxdiff.unseen_fields)."""
  from ehrxdiff_jax.interop import ehrxdiff as ex
  from ehrxdiff_jax.interop.common import load_state_dict
  outputs.check_writable(out, overwrite)  # before reading a multi-GB file
  sd = load_state_dict(path)
  kind = ex.detect_kind(sd) if kind == "auto" else kind
  options = {"ehrxdiff": dict(ema=ema, vae_mismatch=vae_mismatch, heads=heads),
             "clip": dict(heads=heads)}
  imported = ex.import_state_dict(sd, kind, cfg, **options.get(kind, {}))
  del sd
  info = {k: v for k, v in imported.info.items() if k != "fields"}
  meta = {"source": os.path.abspath(path), "kind": kind, "import": info}
  write_checkpoint(out, cfg, imported.params, imported.ema_params, meta=meta, overwrite=overwrite)
  return dict(info, kind=kind, out=os.path.abspath(out))


def run(args) -> int:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  from ehrxdiff_jax.config_util import load_config
  from ehrxdiff_jax.interop.common import ConversionError
  try:
    cfg = load_config(args.config, args.config_overrides)
    info = convert(args.from_torch, cfg, args.out, args.kind, ema=not args.no_ema,
                   vae_mismatch=args.vae_mismatch, overwrite=args.overwrite,
                   heads="config" if args.heads_from_config else None)
  except (ConversionError, FileExistsError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"converted {info['kind']} checkpoint {args.from_torch} ({info.get('keys')} keys) -> "
        f"{info['out']}")
  return 0
