"""Event text -> vector backends, deduplicated by text and cached on disk (resumable).

Backends (`make_embedder(spec, dim)`):
  'hashing'            offline, deterministic signed feature hashing (blake2b, independent of
                       PYTHONHASHSEED) into `dim` buckets, L2-normalised: word unigrams and bigrams, and
                       every number as soft log-scale value bins keyed by the words before it (see
                       `hashing_embed`), so that 14.2 and 14.5 mg/dL embed close and 1.0 and 100 do not.
  'local:PATH'         a local sentence-transformers or transformers model directory; mean-pooled,
                       then zero-padded (model width < dim) or projected by a fixed seeded Gaussian
                       matrix (width > dim), L2-normalised.
  'precomputed:FILE'   a user file mapping text -> vector: .npz with arrays 'texts' and 'vectors', or
                       .jsonl lines {"text": ..., "embedding": [...]} (e.g. text-embedding-ada-002
                       vectors made elsewhere, width 1536). A text missing from the file is an error.

Cache: `CACHE_DIR/<backend id>/chunk-NNNNN.npz` holding sha1 digests of texts and float16 vectors; a chunk
is written after every block, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import re
from typing import Callable, Sequence

import numpy as np

_WORD = re.compile(r"[^\s]+")


@functools.lru_cache(maxsize=1 << 20)  # the same features recur across texts (items, columns, bins)
def _h(token: str) -> int:
  return int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")


_NUMBER = re.compile(r"^[<>=]*(-?\d+(?:\.\d+)?)(%?)$")
# Value bins: log10|x| on a grid of 1/8 decade from 0.01 to 1000, each number spread over the bins within
# 3 steps by a Gaussian of one step, so that the embedding of a value moves smoothly with it (v1 hashed
# '14.2' and '14.5' to unrelated buckets: no lab value or fluid rate was learnable from its number).
_BIN_STEP, _BIN_LO, _BIN_HI, _BIN_REACH = 0.125, -2.0, 3.0, 3
_VALUE_WEIGHT = 2.0  # a value's bins weigh about as much as its text's words together


def _value_bins(x: float) -> list[tuple[str, float]]:
  """(bin name, weight) of one number; zero and the sign are bins of their own."""
  if x == 0.0:
    return [("zero", 1.0)]
  sign = "-" if x < 0 else "+"
  pos = (min(max(np.log10(abs(x)), _BIN_LO), _BIN_HI) - _BIN_LO) / _BIN_STEP
  centre = int(round(pos))
  last = int(round((_BIN_HI - _BIN_LO) / _BIN_STEP))
  bins = range(max(0, centre - _BIN_REACH), min(last, centre + _BIN_REACH) + 1)
  return [(f"{sign}{b}", float(np.exp(-0.5 * (b - pos) ** 2))) for b in bins]


def hashing_embed(texts: Sequence[str], dim: int = 1536) -> np.ndarray:
  """Signed hashing of words, word bigrams and numbers' value bins.

  A number contributes its value bins twice: keyed by the word before it (its column, e.g. 'valuenum',
  'rate') and by all the words before it (table, item and column: '... white blood cells valuenum'),
  so that a value is comparable across items and specific to its item. Its literal text still counts
  as a word (exact codes and doses stay recognisable).
  """
  out = np.zeros((len(texts), dim), np.float32)

  def add(i, feature, weight=1.0):
    h = _h(feature)
    out[i, h % dim] += weight if (h >> 32) & 1 else -weight

  for i, text in enumerate(texts):
    words = _WORD.findall(text.lower())
    for f in words + [a + " " + b for a, b in zip(words, words[1:])]:
      add(i, f)
    context = []
    for w in words:
      m = _NUMBER.match(w)
      if m is None:
        context.append(w)
        continue
      x = float(m.group(1))
      keys = ["#" + (context[-1] if context else "") + m.group(2), "#" + " ".join(context) + m.group(2)]
      for name, weight in _value_bins(x):
        for key in keys:
          add(i, f"{key} {name}", _VALUE_WEIGHT * weight)
  norm = np.linalg.norm(out, axis=1, keepdims=True)
  return out / np.maximum(norm, 1e-6)


class Embedder:
  def __init__(self, name: str, dim: int, fn: Callable[[Sequence[str]], np.ndarray], batch: int = 4096):
    self.name, self.dim, self.fn, self.batch = name, dim, fn, batch

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    return self.fn(texts)


def _fit_width(x: np.ndarray, dim: int, seed: int = 0) -> np.ndarray:
  if x.shape[1] == dim:
    y = x
  elif x.shape[1] < dim:
    y = np.pad(x, ((0, 0), (0, dim - x.shape[1])))
  else:
    proj = np.random.default_rng(seed).standard_normal((x.shape[1], dim)).astype(np.float32) / np.sqrt(dim)
    y = x @ proj
  return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-6)


def _local_backend(path: str, dim: int) -> Callable:
  try:
    from sentence_transformers import SentenceTransformer  # type: ignore
    model = SentenceTransformer(path, device="cpu")
    return lambda texts: _fit_width(np.asarray(model.encode(list(texts), batch_size=64), np.float32), dim)
  except ImportError:
    pass
  try:
    import torch  # type: ignore
    from transformers import AutoModel, AutoTokenizer  # type: ignore
  except ImportError as e:
    raise RuntimeError(f"--embedder local:{path} needs sentence-transformers or transformers+torch ({e})") from None
  tok = AutoTokenizer.from_pretrained(path)
  model = AutoModel.from_pretrained(path).eval()

  def fn(texts):
    outs = []
    for i in range(0, len(texts), 64):
      enc = tok(list(texts[i:i + 64]), padding=True, truncation=True, return_tensors="pt")
      with torch.no_grad():
        h = model(**enc).last_hidden_state
      m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
      outs.append(((h * m).sum(1) / m.sum(1).clamp(min=1)).numpy())
    return _fit_width(np.concatenate(outs).astype(np.float32), dim)
  return fn


def _precomputed_backend(path: str, dim: int) -> Callable:
  if path.endswith(".npz"):
    z = np.load(path, allow_pickle=False)
    table = dict(zip([str(t) for t in z["texts"]], np.asarray(z["vectors"], np.float32)))
  else:
    table = {}
    with open(path) as f:
      for line in f:
        if line.strip():
          d = json.loads(line)
          table[d["text"]] = np.asarray(d["embedding"], np.float32)

  def fn(texts):
    missing = [t for t in texts if t not in table]
    if missing:
      raise KeyError(f"{path}: {len(missing)} event texts have no vector, e.g. {missing[0]!r}")
    x = np.stack([table[t] for t in texts])
    if x.shape[1] != dim:
      raise ValueError(f"{path}: vectors have width {x.shape[1]}, --event-dim is {dim}")
    return x
  return fn


def make_embedder(spec: str, dim: int = 1536) -> Embedder:
  if spec == "hashing":
    return Embedder(f"hashing-{dim}-v2", dim, lambda t: hashing_embed(t, dim))
  kind, _, arg = spec.partition(":")
  if kind == "local" and arg:
    ident = hashlib.sha1(os.path.abspath(arg).encode()).hexdigest()[:12]
    return Embedder(f"local-{ident}-{dim}", dim, _local_backend(arg, dim), batch=1024)
  if kind == "precomputed" and arg:
    ident = hashlib.sha1(os.path.abspath(arg).encode()).hexdigest()[:12]
    return Embedder(f"precomputed-{ident}-{dim}", dim, _precomputed_backend(arg, dim), batch=65536)
  raise ValueError(f"unknown embedder {spec!r}: hashing | local:PATH | precomputed:FILE")


def _digest(texts: Sequence[str]) -> np.ndarray:
  return np.array([hashlib.sha1(t.encode()).digest() for t in texts], dtype="S20")


def embed_texts(texts: Sequence[str], embedder: Embedder, cache_dir: str | None = None,
                progress: Callable[[int, int], None] | None = None) -> np.ndarray:
  """float16 [len(texts), dim], each distinct text embedded once, cached under cache_dir."""
  texts = list(texts)
  out = np.zeros((len(texts), embedder.dim), np.float16)
  digests = _digest(texts)
  known: dict[bytes, np.ndarray] = {}
  cdir = os.path.join(cache_dir, embedder.name) if cache_dir else None
  if cdir:
    os.makedirs(cdir, exist_ok=True)
    wanted = set(digests.tolist())
    for f in sorted(glob.glob(os.path.join(cdir, "chunk-*.npz"))):
      try:
        z = np.load(f, allow_pickle=False)
        for d, v in zip(z["digests"].tolist(), z["vectors"]):
          if d in wanted:
            known[d] = v
      except Exception:  # a chunk cut short by an interruption: ignore it, it will be redone
        continue
  todo = [i for i, d in enumerate(digests.tolist()) if d not in known]
  for i, d in enumerate(digests.tolist()):
    if d in known:
      out[i] = known[d]
  n_chunk = len(glob.glob(os.path.join(cdir, "chunk-*.npz"))) if cdir else 0
  for b in range(0, len(todo), embedder.batch):
    idx = todo[b:b + embedder.batch]
    vec = np.asarray(embedder([texts[i] for i in idx]), np.float32).astype(np.float16)
    out[idx] = vec
    if cdir:
      tmp = os.path.join(cdir, f".chunk-{n_chunk:05d}.tmp.npz")
      np.savez(tmp, digests=digests[idx], vectors=vec)
      os.replace(tmp, os.path.join(cdir, f"chunk-{n_chunk:05d}.npz"))
      n_chunk += 1
    if progress:
      progress(min(b + embedder.batch, len(todo)), len(todo))
  return out
