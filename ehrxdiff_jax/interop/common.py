"""Shared machinery for PyTorch state dicts: key consumption, layout transposes, checks, and the
inverse of each converter so that one name table drives both import and export.

A name table (`StateDict.block`, `export_block`) maps our names to entries:
  (convert, their name)         a leaf converter (`StateDict.norm`, `.linear`, `.conv`,
                                `.conv1x1_as_linear`, `split_in_proj`); their name may be a tuple of
                                alternatives (old and new names of one library; export writes
                                the first)
  (table, their name)           a sub-block under `{key}.{their name}`
  table                         a sub-block of ours at the same torch key
  IfPresent(convert, name)      a leaf only some blocks have (e.g. the 1x1 shortcut of a res block
                                that changes the width)
"""
from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class IfPresent:
  """A table entry converted only where the state dict (import) or our tree (export) has it."""
  convert: Callable
  theirs: str


class StateDict:
  """A flat PyTorch state dict that is consumed key by key.

  Every `take` marks a key as used; `finish()` raises if any key under the converted prefixes was
  left over, so a checkpoint never loads with silently ignored weights. `origin` remembers which
  torch key each produced array came from, to name it in shape errors.
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
    kernel = self.take(f"{key}.weight").transpose(2, 3, 1, 0).copy()
    out = {"kernel": self._tagged(kernel, f"{key}.weight")}
    if bias:
      out["bias"] = self.take(f"{key}.bias")
    return out

  def conv1x1_as_linear(self, key: str) -> dict:
    """A 1x1 conv or a Linear, whichever the checkpoint has (diffusers proj_in/out) -> Dense."""
    w = self.take(f"{key}.weight")
    w = w.reshape(w.shape[0], w.shape[1])
    return {"kernel": self._tagged(w.T.copy(), f"{key}.weight"), "bias": self.take(f"{key}.bias")}

  def norm(self, key: str) -> dict:
    """GroupNorm / LayerNorm weight, bias -> scale, bias."""
    return {"scale": self.take(f"{key}.weight"), "bias": self.take(f"{key}.bias")}

  def keys_under(self, key: str) -> list[str]:
    """The keys `{prefix}{key}.*` without the prefix (all of them for key '')."""
    start = self.prefix + _join(key, "")
    return [k[len(self.prefix):] for k in self._sd if k.startswith(start)]

  def skip_under(self, key: str) -> None:
    """Marks every key under the module `key` as deliberately unused (e.g. a VAE's loss)."""
    for k in self.keys_under(key):
      self.skip(k)

  def indices(self, key: str) -> list[int]:
    """[0, ..., n-1]: the distinct N of the keys `{prefix}{key}.N.*` (a torch ModuleList /
    Sequential); [] when there is none. A gap is an error: a block would silently be missing."""
    rx = re.compile(re.escape(self.prefix + _join(key, "")) + r"(\d+)\.")
    found = sorted({int(m.group(1)) for k in self._sd if (m := rx.match(k))})
    if found != list(range(len(found))):
      raise ConversionError(f"indices under {self.prefix}{key} are not contiguous from 0: {found}")
    return found

  def block(self, key: str, table: Mapping[str, Any]) -> dict:
    """One block's parameters by a name table (see the module docstring), e.g.
    {'norm1': (StateDict.norm, 'norm1'), 'attn': (split_in_proj, 'attn'),
     'mid': (TABLE, 'mid.block_1')}.
    """
    out = {}
    for ours, entry in table.items():
      if isinstance(entry, Mapping):
        out[ours] = self.block(key, entry)
        continue
      if isinstance(entry, IfPresent):
        if self.keys_under(_join(key, entry.theirs)):
          out[ours] = entry.convert(self, _join(key, entry.theirs))
        continue
      convert, theirs = entry
      if not isinstance(theirs, str):
        present = [t for t in theirs if self.keys_under(_join(key, t))]
        if not present:
          others = ", ".join(theirs[1:])
          raise ConversionError(f"missing {self.prefix}{_join(key, theirs[0])}.* (or the "
                                f"alternative names {others}) in the PyTorch state dict")
        theirs = present[0]
      if isinstance(convert, Mapping):
        out[ours] = self.block(_join(key, theirs), convert)
      else:
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


def split_in_proj(sd: StateDict, key: str) -> dict:
  """torch MultiheadAttention (in_proj_weight [3W, W], in_proj_bias [3W], out_proj) -> q/k/v/out."""
  w = sd.take(f"{key}.in_proj_weight")
  b = sd.take(f"{key}.in_proj_bias")
  if w.ndim != 2 or w.shape[0] != 3 * w.shape[1] or b.shape != (w.shape[0],):
    raise ConversionError(f"{sd.prefix}{key}.in_proj_weight/bias have shapes {w.shape}/{b.shape}; "
                          "expected [3W, W] and [3W]")
  width = w.shape[1]
  out = {}
  for i, name in enumerate("qkv"):
    kernel = w[i * width:(i + 1) * width].T.copy()
    bias = b[i * width:(i + 1) * width].copy()
    sd.origin[id(kernel)] = f"{sd.prefix}{key}.in_proj_weight"
    sd.origin[id(bias)] = f"{sd.prefix}{key}.in_proj_bias"
    out[name] = {"kernel": kernel, "bias": bias}
  out["out"] = sd.linear(f"{key}.out_proj")
  return out


# ---------------------------------------------------------------------------- export (the inverses)

def _f32(a) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(a, np.float32))


def put_norm(out: dict, key: str, p: Mapping[str, Any]) -> None:
  """Inverse of StateDict.norm."""
  out[f"{key}.weight"] = _f32(p["scale"])
  out[f"{key}.bias"] = _f32(p["bias"])


def _put_weight_bias(out: dict, key: str, weight, p: Mapping[str, Any]) -> None:
  out[f"{key}.weight"] = _f32(weight)
  if "bias" in p:
    out[f"{key}.bias"] = _f32(p["bias"])


def put_linear(out: dict, key: str, p: Mapping[str, Any]) -> None:
  """Inverse of StateDict.linear: Dense (in, out) -> torch Linear (out, in)."""
  _put_weight_bias(out, key, np.asarray(p["kernel"]).T, p)


def put_conv(out: dict, key: str, p: Mapping[str, Any]) -> None:
  """Inverse of StateDict.conv: (kh, kw, in, out) -> torch Conv2d (out, in, kh, kw)."""
  _put_weight_bias(out, key, np.asarray(p["kernel"]).transpose(3, 2, 0, 1), p)


def put_conv1x1(out: dict, key: str, p: Mapping[str, Any]) -> None:
  """Inverse of StateDict.conv1x1_as_linear (and of a 1x1 conv): a 1x1 Conv2d (out, in, 1, 1)."""
  k = np.asarray(p["kernel"])
  put_conv(out, key, {**p, "kernel": k[None, None] if k.ndim == 2 else k})


def put_in_proj(out: dict, key: str, p: Mapping[str, Any]) -> None:
  """Inverse of split_in_proj: q, k, v -> in_proj_weight / in_proj_bias, out -> out_proj."""
  out[f"{key}.in_proj_weight"] = np.concatenate([_f32(np.asarray(p[n]["kernel"]).T) for n in "qkv"],
                                                axis=0)
  out[f"{key}.in_proj_bias"] = np.concatenate([_f32(p[n]["bias"]) for n in "qkv"], axis=0)
  put_linear(out, f"{key}.out_proj", p["out"])


INVERSE = {StateDict.norm: put_norm, StateDict.linear: put_linear, StateDict.conv: put_conv,
           StateDict.conv1x1_as_linear: put_conv1x1, split_in_proj: put_in_proj}


def export_block(out: dict, key: str, params: Mapping[str, Any], table: Mapping[str, Any]) -> None:
  """Writes one block of ours into `out` (torch names) by StateDict.block's name table."""
  for ours, entry in table.items():
    if isinstance(entry, Mapping):
      export_block(out, key, params[ours], entry)
      continue
    if isinstance(entry, IfPresent):
      if ours in params:
        INVERSE[entry.convert](out, _join(key, entry.theirs), params[ours])
      continue
    convert, theirs = entry
    theirs = _join(key, theirs if isinstance(theirs, str) else theirs[0])
    if isinstance(convert, Mapping):
      export_block(out, theirs, params[ours], convert)
    else:
      INVERSE[convert](out, theirs, params[ours])


def export_blocks(out: dict, tree: Mapping[str, Any], name: str, key: str,
                  table: Mapping[str, Any]) -> None:
  """Inverse of StateDict.blocks: every sub-tree `name.format(i)` of `tree` as block `{key}.{i}`."""
  rx = re.compile(re.escape(name).replace(re.escape("{}"), r"(\d+)"))
  for ours, p in tree.items():
    m = rx.fullmatch(ours)
    if m:
      export_block(out, _join(key, m.group(1)), p, table)


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
    more = f" ... ({len(problems)} problems)" if len(problems) > 20 else ""
    raise ConversionError("; ".join(problems[:20]) + more)
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
    raise ImportError("reading PyTorch checkpoints needs the torch extra: "
                      "pip install 'ehrxdiff-jax[torch]'") from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
  return {k: v for k, v in obj.items() if hasattr(v, "shape")}
