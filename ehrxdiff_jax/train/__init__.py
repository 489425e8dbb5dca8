"""Training: one machinery (`loop.Trainer`, `loop.fit`, `checkpoint.Checkpointer`) and one objective per
trainer. `OBJECTIVES` maps `c.train.objective` to the module whose `make_objective(cfg)` builds it:
adding a trainer = adding a module here, not a loop."""
from __future__ import annotations

import importlib

OBJECTIVES = {
    "ldm": "ehrxdiff_jax.train.ldm",
    "clip": "ehrxdiff_jax.train.clip",
    "vae": "ehrxdiff_jax.train.vae",
    "table_classifier": "ehrxdiff_jax.train.classifier",
    "image_classifier": "ehrxdiff_jax.train.image_classifier",
    "toy": "ehrxdiff_jax.train.toy",  # a seconds-fast stand-in for machinery tests and cluster smoke tests
}


def make_objective(cfg):
  """The objective named by `cfg.train.objective`."""
  name = cfg.train.objective
  if name not in OBJECTIVES:
    raise ValueError(f"unknown train.objective {name!r}; expected one of {sorted(OBJECTIVES)}")
  return importlib.import_module(OBJECTIVES[name]).make_objective(cfg)
