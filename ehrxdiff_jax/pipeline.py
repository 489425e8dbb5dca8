"""The grain input pipeline over the shards written by `ehrxdiff prepare`.

    loader = make_loader(data_dir, 'train', global_batch_size=128, config_data=cfg.data, seed=0,
                         max_events=1024)
    it = iter(loader)              # a grain DatasetIterator
    batch = next(it)               # dict of numpy arrays, CONTRIBUTING.md's host batch (local batch)
    state = it.get_state()         # JSON-able; it.set_state(state) resumes exactly (save it with the
                                   # model checkpoint, e.g. grain.PyGrainCheckpointHandler or as JSON)

Order: the sample space (real samples, then one w_null sample per distinct target image) is permuted
per epoch by `np.random.default_rng([seed, epoch])`; position p of the permutation goes to process
p % process_count, so every process reads only its own records (random access into the shards) and
the processes together see every sample once per epoch (up to total % process_count samples per
epoch are left out so that all processes make the same number of steps). Without shuffle the order is
the record order. Batches are per-process: global_batch_size / process_count samples.

w_null (config_data.w_null): for every distinct target image of the split one no-change sample is
added: the prev image of the first record (in record order) with that target is used as both prev and
target, its prev labels as both label vectors, the events are `max_events` zero rows and the
`event_mask` is all True (the reference has no padding mask for them); is_null is True.

augment_target: RandomAffine(degrees=10, scale=(0.9, 1.1)) on every target image (real or null), with
torchvision's conventions (angle ~ U(-10, 10), positive = clockwise on screen as in F.affine, scale ~ U(0.9, 1.1), about the image
centre (W/2, H/2), nearest neighbour, fill 0 = black, which is -1 after scaling to [-1, 1]); the
parameters come from `np.random.default_rng([seed, epoch, sample, 1])`, so a sample is augmented the
same way on a resumed run and differently in every epoch.

Cached latents (config_data.cached_latents; `ehrxdiff prepare --vae-checkpoint`): the records carry
`target_moments` and `prev_mean` (and `prev_logvar`); they are returned in the batch as float32. They were
computed from the un-augmented images, so they cannot be augmented: cached_latents with augment_target
raises ValueError (EHRXDiff_w_null from cached latents: --config.data.augment_target=False, a deviation
from the reference; or train from images). A w_null sample's target is I_prev, so its `target_moments`
are the cached moments of I_prev: [prev_mean, prev_logvar].

Host batch (CONTRIBUTING.md): the images stay grey uint8 [B, H, W] and the events float16 [B, E, D] as the
records hold them, with `event_rows` [B] int32 (rows that can be non-zero: the valid events, 0 for a w_null
sample); the jitted functions turn them into the device batch (float32, [-1, 1], 3 channels:
ehrxdiff_jax/batch_format.py) and `parallel.to_global` sends only the first `event_rows` rows of each sample.

Labels: config_data.labels ('imagenome' | 'chexpert'; default: imagenome when the dataset has it);
CheXpert's -1 (uncertain) becomes NaN like an unknown label.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from ehrxdiff_jax import records as rec
from ehrxdiff_jax.errors import UserError
from ehrxdiff_jax.evaluate import demographics

REPREPARE = "re-run `ehrxdiff prepare` (with --overwrite) to rewrite the dataset"


# ----------------------------------------------------------------------------- dataset files
def read_manifest(data_dir: str) -> dict:
  path = os.path.join(data_dir, rec.MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {data_dir} is not a dataset written by `ehrxdiff prepare` "
                            "(or the run was interrupted)")
  try:
    with open(path) as f:
      man = json.load(f)
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not valid JSON ({e}): the dataset is damaged; {REPREPARE}") from None
  if man.get("schema_version") != rec.SCHEMA_VERSION:
    raise UserError(f"{path}: schema version {man.get('schema_version')}, this code reads "
                    f"{rec.SCHEMA_VERSION}; re-run `ehrxdiff prepare`")
  return man


def read_index(data_dir: str, split: str):
  """The per-record index of a split as a pandas DataFrame (key, ids, times, demographics...)."""
  import pandas as pd
  return pd.read_json(os.path.join(data_dir, rec.index_name(split)), lines=True, dtype={"key": str, "prev_dicom": str, "trg_dicom": str})


class ShardedSource:
  """Random access over one split's shards: `src[i]` -> decoded record dict (see records.py).

  Shard sizes and record counts are checked against the manifest when opened, and read / decode
  errors name the shard, so a corrupted or truncated shard is reported as such. With the shared event table
  the record's `event_ids` become its `events` rows, unless `gather_events=False` (the loader gathers them
  straight into its batch)."""

  def __init__(self, data_dir: str, split: str, decode: bool = True, gather_events: bool = True):
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    self.data_dir, self.split, self.decode, self.gather_events = data_dir, split, decode, gather_events
    man = read_manifest(data_dir)
    if split not in man["splits"]:
      raise UserError(f"{data_dir}: no split {split!r}; splits are {sorted(man['splits'])}")
    self.manifest = man
    shards = man["splits"][split]["shards"]
    self.paths = [os.path.join(data_dir, s["file"]) for s in shards]
    for s, p in zip(shards, self.paths):
      if not os.path.exists(p):
        raise FileNotFoundError(f"missing shard {p}; {REPREPARE}")
      size = os.path.getsize(p)
      if size != s["bytes"]:
        raise UserError(f"corrupted or truncated shard {p}: {size} bytes, the manifest says {s['bytes']}; {REPREPARE}")
    self.bounds = np.cumsum([0] + [s["records"] for s in shards])
    try:
      self._src = ArrayRecordDataSource(self.paths)
    except Exception:  # noqa: BLE001 - find and name the shard that does not open
      for s, p in zip(shards, self.paths):
        _check_shard(ArrayRecordDataSource, p, s["records"])
      raise
    if len(self._src) != self.bounds[-1]:
      for s, p in zip(shards, self.paths):
        _check_shard(ArrayRecordDataSource, p, s["records"])
    self.event_table = None
    if man.get("event_layout") == "table":
      path = os.path.join(data_dir, rec.EVENT_TABLE)
      try:
        self.event_table = np.load(path, mmap_mode="r")
      except FileNotFoundError:
        raise FileNotFoundError(f"missing event table {path}; {REPREPARE}") from None
      except (ValueError, OSError, EOFError) as e:  # a truncated file: "mmap length is greater than file size"
        raise UserError(f"corrupted or truncated event table {path} ({e}); {REPREPARE}") from None

  def shard_of(self, index: int) -> str:
    return self.paths[int(np.searchsorted(self.bounds, index, "right") - 1)]

  def __len__(self) -> int:
    return int(self.bounds[-1])

  def __getitem__(self, index: int):
    index = int(index)
    try:
      raw = self._src[index]
    except Exception as e:
      raise UserError(f"corrupted shard {self.shard_of(index)}: cannot read record {index}: {e}; {REPREPARE}") from None
    if not self.decode:
      return raw
    try:
      r = rec.decode_record(raw)
    except rec.RecordError as e:
      raise UserError(f"corrupted shard {self.shard_of(index)}: record {index}: {e}; {REPREPARE}") from None
    if "event_ids" in r and self.event_table is not None and self.gather_events:
      r["events"] = np.asarray(self.event_table[r.pop("event_ids")])
    return r

  def __repr__(self):
    return f"ShardedSource({self.data_dir!r}, {self.split!r}, {len(self)} records)"


def _check_shard(open_source, path: str, records: int) -> None:
  """UserError naming `path` if it does not open or holds another number of records than the manifest."""
  try:
    n = len(open_source([path]))
  except Exception as e:  # noqa: BLE001 - array_record raises plain RuntimeErrors
    raise UserError(f"corrupted shard {path}: it does not open ({e}); {REPREPARE}") from None
  if n != records:
    raise UserError(f"corrupted shard {path}: {n} records, the manifest says {records}; {REPREPARE}")


def data_source(data_dir: str, split: str, decode: bool = True) -> ShardedSource:
  """grain-compatible random-access source of a split (decoded record dicts, or raw bytes)."""
  return ShardedSource(data_dir, split, decode)


def tfds_source(data_dir: str, split: str):
  """The same split through TFDS: elements {'key': bytes, 'record': bytes}; decode 'record' with
  `records.decode_payload` (with the default `event_layout='table'` the record holds `event_ids`: the
  vectors are rows of DATA_DIR/event_table.npy, np.load(..., mmap_mode='r')[ids]). Equivalent: tfds.data_source('ehrxdiff', split=..., data_dir=PARENT) when
  the dataset lives in PARENT/ehrxdiff/1.0.0/."""
  import tensorflow_datasets as tfds
  return tfds.builder_from_directory(data_dir).as_data_source(split=split)


# ----------------------------------------------------------------------------- transforms
def _cfg(config_data, name, default=None):
  if config_data is None:
    return default
  if isinstance(config_data, Mapping):
    return config_data.get(name, default)
  return getattr(config_data, name, default) if hasattr(config_data, name) else default


def random_affine(img: np.ndarray, rng: np.random.Generator, degrees: float = 10.0,
                  scale=(0.9, 1.1)) -> np.ndarray:
  """torchvision RandomAffine(degrees, scale=scale, interpolation=NEAREST, fill=0) on uint8 [H, W]."""
  from PIL import Image
  angle = float(rng.uniform(-degrees, degrees))
  s = float(rng.uniform(*scale))
  h, w = img.shape
  cx, cy = w * 0.5, h * 0.5
  a = np.deg2rad(angle)
  # inverse map (output pixel -> input pixel), as torchvision's _get_inverse_affine_matrix
  m = np.array([np.cos(a), np.sin(a), 0.0, -np.sin(a), np.cos(a), 0.0]) / s
  m[2] = m[0] * -cx + m[1] * -cy + cx
  m[5] = m[3] * -cx + m[4] * -cy + cy
  out = Image.fromarray(img).transform((w, h), Image.AFFINE, tuple(m), resample=Image.NEAREST, fillcolor=0)
  return np.asarray(out, np.uint8)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
  if img.shape[0] != size or img.shape[1] != size:
    from PIL import Image
    img = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR), np.uint8)
  return img


class _Maker:
  """Index in the repeated sample space -> one example dict (runs in grain workers; picklable)."""

  def __init__(self, data_dir, split, *, seed, shuffle, n_real, null_src, local_len, process_index,
               process_count, max_events, image_size, augment, label_set, cached_latents):
    self.data_dir, self.split = data_dir, split
    self.seed, self.shuffle, self.n_real = seed, shuffle, n_real
    self.null_src = np.asarray(null_src, np.int64)
    self.total = n_real + len(self.null_src)
    self.local_len, self.pi, self.pc = local_len, process_index, process_count
    self.max_events, self.image_size, self.augment = max_events, image_size, augment
    self.label_set, self.cached_latents = label_set, cached_latents
    self._src = None
    self._perm_epoch, self._perm = None, None

  def __getstate__(self):
    d = dict(self.__dict__)
    d["_src"], d["_perm"], d["_perm_epoch"] = None, None, None
    return d

  @property
  def src(self):
    if self._src is None:
      self._src = ShardedSource(self.data_dir, self.split, gather_events=False)  # _Batcher gathers in place
    return self._src

  def sample_index(self, i: int) -> tuple[int, int]:
    epoch, pos = divmod(int(i), self.local_len)
    g = pos * self.pc + self.pi
    if self.shuffle:
      if self._perm_epoch != epoch:
        self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.total)
        self._perm_epoch = epoch
      g = int(self._perm[g])
    return epoch, g

  def _labels(self, r, which):
    if not self.label_set:
      return np.zeros((0,), np.float32)
    x = np.array(r[f"{which}_labels_{self.label_set}"], np.float32)
    x[x == -1] = np.nan
    return x

  def __call__(self, i, _=None) -> dict[str, Any]:
    epoch, g = self.sample_index(i)
    is_null = g >= self.n_real
    r = self.src[int(self.null_src[g - self.n_real]) if is_null else g]
    prev = r["prev_image"]
    trg = prev if is_null else r["target_image"]
    if self.augment:
      trg = random_affine(trg, np.random.default_rng([self.seed, epoch, g, 1]))
    # Images stay uint8 and events float16 (valid rows only, or their ids in the shared event table);
    # `_Batcher` stacks and gathers them into the host batch.
    ev = None if is_null else np.asarray((r["events"] if "events" in r else r["event_ids"])[-self.max_events:])
    out = dict(prev_image=_resize(prev, self.image_size), target_image=_resize(trg, self.image_size),
               events=ev, prev_labels=self._labels(r, "prev"),
               target_labels=self._labels(r, "prev" if is_null else "target"), is_null=np.bool_(is_null),
               key=np.bytes_(("null_" if is_null else "") + r["meta"]["key"]),
               imagenome_gold=np.bool_(r["meta"].get("imagenome_gold", False)),  # findings classifier: no training
               **demographics.encode_meta(r["meta"]))  # age, sex, race: the demographic classifier's labels
    if self.cached_latents:
      for k in ("target_moments", "prev_mean") + (("prev_logvar",) if is_null else ()):
        if k not in r:
          raise ValueError(f"{self.data_dir}: records have no {k!r}; prepare with --vae-checkpoint or set "
                           "data.cached_latents=False")
      out["prev_mean"] = np.asarray(r["prev_mean"], np.float32)
      out["target_moments"] = np.asarray(np.concatenate([r["prev_mean"], r["prev_logvar"]], axis=-1)
                                         if is_null else r["target_moments"], np.float32)
    return out


class _Batcher:
  """Stacks examples into the host batch: uint8 grey images [B, H, W], zero-padded float16 events
  [B, max_events, D] with the mask (all True for null samples) and `event_rows` (0 for null samples). An
  example's events are rows, or (event_layout 'table') ids gathered from `event_table` straight into the batch."""

  def __init__(self, max_events: int, event_dim: int, event_table: str | None = None):
    self.max_events, self.event_dim, self.event_table = max_events, event_dim, event_table
    self._table = None

  def __getstate__(self):
    return dict(self.__dict__, _table=None)

  @property
  def table(self) -> np.ndarray:
    if self._table is None:
      self._table = np.load(self.event_table, mmap_mode="r")
    return self._table

  def __call__(self, elements):
    b, e, dim = len(elements), self.max_events, self.event_dim
    events = np.zeros((b, e, dim), np.float16)   # calloc: the padding pages are never written
    mask = np.zeros((b, e), bool)
    rows = np.zeros((b,), np.int32)
    for i, x in enumerate(elements):
      if x["events"] is None:
        mask[i] = True
      else:
        rows[i] = n = len(x["events"])
        if x["events"].ndim == 1:
          np.take(self.table, x["events"], axis=0, out=events[i, :n], mode="clip")   # prepare's ids: in range
        else:
          events[i, :n] = x["events"]
        mask[i, :n] = True
    out = {k: np.stack([x[k] for x in elements]) for k in ("prev_image", "target_image")}
    out["events"], out["event_mask"], out["event_rows"] = events, mask, rows   # parallel.EVENT_ROWS
    for k in elements[0]:
      if k not in out:
        out[k] = np.stack([x[k] for x in elements])
    return out


def null_sources(data_dir: str, split: str) -> np.ndarray:
  """Record index of the first record of every distinct target image (the w_null samples)."""
  idx = read_index(data_dir, split)
  first = idx.drop_duplicates("trg_dicom", keep="first")
  return first["record"].to_numpy(np.int64)


def make_loader(data_dir: str, split: str, *, global_batch_size: int, config_data=None, seed: int = 0,
                shuffle: bool = True, num_epochs: int | None = None, process_index: int | None = None,
                process_count: int | None = None, drop_remainder: bool = True, max_events: int = 1024):
  """A grain IterDataset of per-process batches (see module docstring); `iter()` it for a checkpointable
  DatasetIterator (get_state / set_state)."""
  import grain
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}")
  local_bs = global_batch_size // process_count
  man = read_manifest(data_dir)
  src = ShardedSource(data_dir, split)  # validates the shards now, in this process
  w_null = bool(_cfg(config_data, "w_null", False))
  augment = bool(_cfg(config_data, "augment_target", False))
  cached = bool(_cfg(config_data, "cached_latents", False))
  if cached and augment:
    raise ValueError("cached latents cannot be combined with augment_target: the stored VAE moments belong "
                     "to the un-augmented target; set data.augment_target=False or data.cached_latents=False")
  label_set = _cfg(config_data, "labels", None)
  sets = man.get("label_sets", [])
  if label_set is None:
    label_set = "imagenome" if "imagenome" in sets else (sets[0] if sets else "")
  elif label_set and label_set not in sets:
    raise ValueError(f"{data_dir}: label set {label_set!r} not in the dataset ({sets})")
  image_size = int(_cfg(config_data, "image_size", man["image_size"]))
  null_src = null_sources(data_dir, split) if w_null else np.zeros(0, np.int64)
  total = len(src) + len(null_src)
  local_len = total // process_count
  if local_len == 0:
    raise ValueError(f"split {split!r} has {total} samples, fewer than {process_count} processes")
  maker = _Maker(data_dir, split, seed=seed, shuffle=shuffle, n_real=len(src), null_src=null_src,
                 local_len=local_len, process_index=process_index, process_count=process_count,
                 max_events=max_events, image_size=image_size, augment=augment, label_set=label_set,
                 cached_latents=cached)
  ds = grain.MapDataset.range(local_len).repeat(num_epochs).map_with_index(maker)
  table = os.path.join(data_dir, rec.EVENT_TABLE) if man.get("event_layout") == "table" else None
  ds = ds.batch(local_bs, drop_remainder=drop_remainder, batch_fn=_Batcher(max_events, int(man["event_dim"]), table))
  num_workers = int(_cfg(config_data, "num_workers", 0) or 0)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(_cfg(config_data, "read_threads", 0) or 0) or 1,
                                               prefetch_buffer_size=int(_cfg(config_data, "prefetch", 2) or 2)))
  if num_workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                           per_worker_buffer_size=2))
  return it_ds


def steps_per_epoch(data_dir: str, split: str, global_batch_size: int, w_null: bool = False) -> int:
  man = read_manifest(data_dir)
  n = man["splits"][split]["samples"] + (man["splits"][split]["distinct_targets"] if w_null else 0)
  return n // global_batch_size
