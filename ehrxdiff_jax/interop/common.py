"""Shared machinery for converting PyTorch state dicts: key consumption, layout transposes, checks."""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping, Union

import jax
import numpy as np


class ConversionError(ValueError):
  """A state dict does not match the network: names the offending keys."""


def to_numpy(value) -> np.ndarray:
  if isinstance(value, np.ndarray):
    return value
  if hasattr(value, "detach"):  # a torch tensor; torch itself is not imported here
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _join(key: str, name: str) -> str:
  """'a.b' + 'c' -> 'a.b.c'; '' + 'c' -> 'c' (a key relative to the state dict's prefix)."""
  return f"{key}.{name}" if key else name


# A name table for StateDict.block, or a function (sd, key) -> parameters of the block at key.
BlockConverter = Union[Mapping[str, Any], Callable[["StateDict", str], Any]]


class StateDict:
  """A flat PyTorch state dict that is consumed key by key.

  Every `take` marks a key as used; `finish()` raises if any key under the converted prefixes was left
  over, so a checkpoint never loads with silently ignored weights. `origin` remembers which torch key
  each produced array came from, to name it in shape errors.
  """

  def __init__(self, state_dict: Mapping[str, Any], prefix: str = ""):
    self.prefix = prefix
    self._sd = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not self._sd:
      raise ConversionError(f"no key starts with {prefix!r}; first keys: {list(state_dict)[:5]}")
    self._used: set[str] = set()
    self.origin: dict[int, str] = {}

  def has(self, key: str) -> bool:
    return self.prefix + key in self._sd

  def take(self, key: str) -> np.ndarray:
    full = self.prefix + key
    if full not in self._sd:
      raise ConversionError(f"missing key {full!r} in the PyTorch state dict")
    self._used.add(full)
    array = np.asarray(to_numpy(self._sd[full]), dtype=np.float32)
    self.origin[id(array)] = full
    return array

  def _tagged(self, array: np.ndarray, key: str) -> np.ndarray:
    self.origin[id(array)] = self.prefix + key
    return array

  def skip(self, key: str) -> None:
    """Marks a key as deliberately unused (e.g. the reference's unused ln_post)."""
    if self.prefix + key in self._sd:
      self._used.add(self.prefix + key)

  def linear(self, key: str, bias: bool = True) -> dict:
    """torch Linear (out, in) -> Dense kernel (in, out)."""
    out = {"kernel": self._tagged(self.take(f"{key}.weight").T.copy(), f"{key}.weight")}
    if bias:
      out["bias"] = self.take(f"{key}.bias")
    return out

  def conv(self, key: str, bias: bool = True) -> dict:
    """torch Conv2d (out, in, kh, kw) -> NHWC conv kernel (kh, kw, in, out)."""
    out = {"kernel": self._tagged(self.take(f"{key}.weight").transpose(2, 3, 1, 0).copy(), f"{key}.weight")}
    if bias:
      out["bias"] = self.take(f"{key}.bias")
    return out

  def conv1x1_as_linear(self, key: str) -> dict:
    """A 1x1 conv or a Linear, whichever the checkpoint has, -> Dense (in, out) (diffusers proj_in/out)."""
    w = self.take(f"{key}.weight")
    w = w.reshape(w.shape[0], w.shape[1])
    return {"kernel": self._tagged(w.T.copy(), f"{key}.weight"), "bias": self.take(f"{key}.bias")}

  def norm(self, key: str) -> dict:
    """GroupNorm / LayerNorm weight, bias -> scale, bias."""
    return {"scale": self.take(f"{key}.weight"), "bias": self.take(f"{key}.bias")}

  def keys_under(self, key: str) -> list[str]:
    """The keys (without the prefix) under the module `key`, i.e. `{prefix}{key}.*` (all of them for '')."""
    start = self.prefix + _join(key, "")
    return [k[len(self.prefix):] for k in self._sd if k.startswith(start)]

  def skip_under(self, key: str) -> None:
    """Marks every key under the module `key` as deliberately unused (e.g. a VAE's training loss)."""
    for k in self.keys_under(key):
      self.skip(k)

  def indices(self, key: str) -> list[int]:
    """[0, ..., n-1]: the distinct N of the keys `{prefix}{key}.N.*` (a torch ModuleList / Sequential);
    [] when there is none. A gap is an error: a block would silently be missing."""
    rx = re.compile(re.escape(self.prefix + _join(key, "")) + r"(\d+)\.")
    found = sorted({int(m.group(1)) for k in self._sd if (m := rx.match(k))})
    if found != list(range(len(found))):
      raise ConversionError(f"indices under {self.prefix}{key} are not contiguous from 0: {found}")
    return found

  def block(self, key: str, table: Mapping[str, Any]) -> dict:
    """One block's parameters by a name table {our name: (convert, their name) | nested table}.

    `convert(sd, key)` is e.g. `StateDict.norm`, `StateDict.linear`, `StateDict.conv` or a converter
    function of the same form, called with `{key}.{their name}`. Their name may be a tuple of
    alternatives (old and new names of one library): the first present one is taken.
    """
    out = {}
    for ours, entry in table.items():
      if isinstance(entry, Mapping):
        out[ours] = self.block(key, entry)
        continue
      convert, theirs = entry
      if not isinstance(theirs, str):
        present = [t for t in theirs if self.keys_under(_join(key, t))]
        if not present:
          raise ConversionError(f"missing {self.prefix}{_join(key, theirs[0])}.* (or the alternative names "
                                f"{', '.join(theirs[1:])}) in the PyTorch state dict")
        theirs = present[0]
      out[ours] = convert(self, _join(key, theirs))
    return out

  def blocks(self, key: str, name: str, convert: BlockConverter) -> dict:
    """Every block of the list `key`: {name.format(i): its parameters} for i in `indices(key)`.
    `convert` is a name table for `block` or a function (sd, '{key}.{i}') -> parameters."""
    if isinstance(convert, Mapping):
      return {name.format(i): self.block(_join(key, str(i)), convert) for i in self.indices(key)}
    return {name.format(i): convert(self, _join(key, str(i))) for i in self.indices(key)}

  def leftover(self) -> list[str]:
    return sorted(set(self._sd) - self._used)

  def finish(self) -> None:
    left = self.leftover()
    if left:
      shown = ", ".join(left[:10]) + (f" ... ({len(left)} in all)" if len(left) > 10 else "")
      raise ConversionError(f"keys of the PyTorch state dict not used by the conversion: {shown}")


def _path_str(path) -> str:
  return "/".join(str(getattr(p, "key", p)) for p in path)


def check_against(converted: Any, expected: Any, sd: StateDict | None = None) -> Any:
  """Checks a converted tree against the expected parameter shapes (e.g. from jax.eval_shape).

  Raises ConversionError naming each missing, extra or mis-shaped parameter and its torch key.
  Returns the converted tree with float32 numpy leaves.
  """
  exp = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  got = dict(jax.tree_util.tree_flatten_with_path(converted)[0])
  exp_s = {_path_str(k): v for k, v in exp.items()}
  got_s = {_path_str(k): v for k, v in got.items()}
  problems = []
  for name in sorted(set(exp_s) - set(got_s)):
    problems.append(f"parameter {name} {tuple(exp_s[name].shape)} has no source in the state dict")
  for name in sorted(set(got_s) - set(exp_s)):
    src = sd.origin.get(id(got_s[name]), "?") if sd else "?"
    problems.append(f"converted {name} (from {src}) is not a parameter of the network")
  for name in sorted(set(exp_s) & set(got_s)):
    if tuple(exp_s[name].shape) != tuple(got_s[name].shape):
      src = sd.origin.get(id(got_s[name]), "?") if sd else "?"
      problems.append(f"shape mismatch at {name}: network {tuple(exp_s[name].shape)}, "
                      f"state dict key {src} gives {tuple(got_s[name].shape)}")
  if problems:
    raise ConversionError("; ".join(problems[:20]) + (f" ... ({len(problems)} problems)" if len(problems) > 20 else ""))
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), converted)


def load_state_dict(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a .safetensors, .pt, .pth or .ckpt file into a flat {name: tensor} dict.

  Pickle is never executed: torch files are read with `torch.load(weights_only=True)`. Lightning
  checkpoints keep their weights under 'state_dict'; that level is unwrapped.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no checkpoint file at {path}")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return dict(load_file(path))
  try:
    import torch
  except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("reading PyTorch checkpoints needs the torch extra: pip install 'ehrxdiff-jax[torch]'") from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
  return {k: v for k, v in obj.items() if hasattr(v, "shape")}
