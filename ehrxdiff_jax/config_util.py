"""Loading `get_config()` files, applying `--config.a.b=value` overrides from the command line, and
reading back the config a run saved (WORKDIR/config.json)."""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys

import ml_collections

from ehrxdiff_jax.errors import UnknownKeyError, UserError


def load_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """Loads `path` (optionally `path:arg`, passed to get_config) and applies overrides in order."""
  arg = None
  if ":" in path and not os.path.exists(path):
    path, arg = path.split(":", 1)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config file at {path}")
  repo_root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if repo_root not in sys.path:  # lets config files `from configs import base`
    sys.path.insert(0, repo_root)
  spec = importlib.util.spec_from_file_location(f"_ehrxdiff_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg is not None else module.get_config()
  for item in overrides:
    apply_override(config, item)
  return config


def tuplify(x):
  """JSON lists back to the tuples the config files use (nested)."""
  if isinstance(x, dict):
    return {k: tuplify(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(tuplify(v) for v in x)
  return x


def read_saved_config(workdir: str) -> ml_collections.ConfigDict:
  """The ConfigDict saved as WORKDIR/config.json by `ehrxdiff train` / `ehrxdiff convert`. JSON lists come
  back as the tuples the config files use, so overrides and comparisons see the same types."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config.json in {workdir}: not a run directory of `ehrxdiff train` or "
                            "`ehrxdiff convert`")
  with open(path) as f:
    return ml_collections.ConfigDict(tuplify(json.load(f)))


def _parse_value(text: str, current):
  if isinstance(current, bool):
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ValueError(f"expected a boolean, got {text!r}")
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if isinstance(current, float) and isinstance(value, int):
    value = float(value)
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  if current is not None and isinstance(current, (int, float, tuple)) and not isinstance(value, type(current)):
    raise ValueError(f"expected {type(current).__name__}, got {text!r}")
  return value


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
  """Applies one 'config.a.b=value' (or 'a.b=value') override; unknown keys are an error."""
  item = item.lstrip("-")
  if "=" not in item:
    raise UserError(f"override {item!r} is not of the form --config.key=value")
  key, text = item.split("=", 1)
  if key.startswith("config."):
    key = key[len("config."):]
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    if p not in node:
      raise UnknownKeyError(f"unknown config key {key!r} (no {p!r})")
    node = node[p]
  if leaf not in node:
    raise UnknownKeyError(f"unknown config key {key!r}")
  try:
    node[leaf] = _parse_value(text, node[leaf])
  except ValueError as e:
    raise UserError(f"--config.{key}: {e}") from None
