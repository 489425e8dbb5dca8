"""THE record schema shared by the writer (`data_prep/write.py`) and the reader (`ehrxdiff_jax/pipeline.py`).

One sample = one ArrayRecord record. Each record is a serialized `tf.train.Example` with two bytes
features, so that the shards are a plain TFDS ArrayRecord dataset (readable by `tfds.data_source`
without TensorFlow) and by grain's `ArrayRecordDataSource`:

    'key'     the sample key, e.g. b'p10000032_s50414267_s53189527'
    'record'  the payload below

Payload (never pickle; little-endian):

    b'EHRX' | uint32 SCHEMA_VERSION | uint32 header_len | header (UTF-8 JSON) | blob_0 | blob_1 | ...

The JSON header holds `meta` (scalars: key, subject_id, hadm_id, study and dicom ids, interval_h, and where known
the demographics age (float years), sex (F | M), race; a missing key means unknown)
and `arrays`, a list of {name, dtype, shape, codec, nbytes} describing the blobs in order.
Codecs: 'raw' (C-order bytes of dtype/shape), 'png' (8-bit grey PNG; decodes to uint8 [H, W]),
'zlib' (zlib-compressed raw bytes).

Layout chosen by measurement (bench/bench_loader.py, paper-scale sample: two 256x256 images, 713 valid
of 1024 event rows x 1536): naive (float32 images + padded float16 events) 3,674 kB; valid float16
rows + raw uint8 images 2,327 kB; + PNG 2,290 kB (PNG decode 10x slower than raw); + zstd:1 shards
2,142 kB; ids into one shared event table (`prepare --event-layout table`, the default) 131 kB per
sample plus 3 kB per distinct event text once for the dataset. Dense embedding rows do not compress;
the overlapping windows of pairs of one admission share most of their events, so deduplication is
what pays. Defaults of `prepare`: raw images, shared event table, zstd:1 ArrayRecord compression.

Array fields:
    prev_image, target_image   uint8 [H, W]   grey X-ray (codec png or raw)
    events                     float16 [n, D] only the n valid event rows, oldest first (n <= max_events)
    event_ids                  int32 [n]      instead of `events` when the dataset stores one shared
                                               event table (`event_table.npy`, float16 [U, D])
    prev_labels_<set>, target_labels_<set>  float32 [L]  raw label values (1, 0, -1 uncertain, NaN unknown)
                                               for <set> in ('chexpert', 'imagenome')
    target_moments             float16 [h, w, 2z] optional cached VAE moments of I_trg
    prev_mean                  float16 [h, w, z]  optional cached VAE mean of I_prev
    prev_logvar                float16 [h, w, z]  optional cached VAE logvar of I_prev (w_null targets)
"""
from __future__ import annotations

import io
import json
import struct
import zlib
from typing import Any, NamedTuple

import numpy as np

SCHEMA_VERSION = 1
MAGIC = b"EHRX"
DATASET_NAME = "ehrxdiff"
DATASET_VERSION = "1.0.0"
LABEL_SETS = ("chexpert", "imagenome")
CODECS = ("raw", "png", "zlib")


class RecordError(ValueError):
  """A record (or the shard holding it) cannot be decoded."""


# ----------------------------------------------------------------------------- array codecs
def _encode_array(arr: np.ndarray, codec: str) -> bytes:
  arr = np.ascontiguousarray(arr)
  if codec == "raw":
    return arr.tobytes()
  if codec == "zlib":
    return zlib.compress(arr.tobytes(), 1)
  if codec == "png":
    from PIL import Image
    if arr.dtype != np.uint8 or arr.ndim != 2:
      raise ValueError(f"png codec needs uint8 [H, W], got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
  raise ValueError(f"unknown codec {codec!r}; one of {CODECS}")


def _decode_array(blob: bytes | memoryview, dtype: str, shape: list[int], codec: str) -> np.ndarray:
  if codec == "raw":
    return np.frombuffer(blob, dtype=dtype).reshape(shape)
  if codec == "zlib":
    return np.frombuffer(zlib.decompress(blob), dtype=dtype).reshape(shape)
  if codec == "png":
    from PIL import Image
    img = Image.open(io.BytesIO(bytes(blob)))
    out = np.asarray(img.convert("L"), dtype=np.uint8)
    if list(out.shape) != list(shape):
      raise RecordError(f"png image has shape {out.shape}, header says {shape}")
    return out
  raise RecordError(f"unknown codec {codec!r}")


class Encoded(NamedTuple):
  """An array already encoded (e.g. an image cached as PNG): passed through by `encode_payload`."""
  blob: bytes
  dtype: str
  shape: tuple
  codec: str


def encode_payload(meta: dict[str, Any], arrays: dict[str, Any],
                   codecs: dict[str, str] | None = None) -> bytes:
  """meta: JSON-able scalars; arrays: name -> numpy array (or `Encoded`); codecs: name -> codec (default raw)."""
  codecs = codecs or {}
  blobs, specs = [], []
  for name, arr in arrays.items():
    if isinstance(arr, Encoded):
      specs.append(dict(name=name, dtype=np.dtype(arr.dtype).str, shape=list(arr.shape), codec=arr.codec,
                        nbytes=len(arr.blob)))
      blobs.append(arr.blob)
      continue
    arr = np.asarray(arr)
    blob = _encode_array(arr, codecs.get(name, "raw"))
    specs.append(dict(name=name, dtype=arr.dtype.str, shape=list(arr.shape),
                      codec=codecs.get(name, "raw"), nbytes=len(blob)))
    blobs.append(blob)
  header = json.dumps(dict(meta=meta, arrays=specs), separators=(",", ":")).encode()
  return b"".join([MAGIC, struct.pack("<II", SCHEMA_VERSION, len(header)), header, *blobs])


def decode_payload(payload: bytes) -> dict[str, Any]:
  """-> {'meta': {...}, name: np.ndarray, ...}. Raises RecordError on anything malformed."""
  mv = memoryview(payload)
  if len(mv) < 12 or bytes(mv[:4]) != MAGIC:
    raise RecordError("not an EHRXDiff record (bad magic)")
  version, hlen = struct.unpack("<II", mv[4:12])
  if version != SCHEMA_VERSION:
    raise RecordError(f"record schema version {version}, this code reads {SCHEMA_VERSION}; re-run prepare")
  try:
    header = json.loads(bytes(mv[12:12 + hlen]))
  except ValueError as e:
    raise RecordError(f"corrupted record header: {e}") from None
  out: dict[str, Any] = {"meta": header["meta"]}
  pos = 12 + hlen
  for spec in header["arrays"]:
    end = pos + spec["nbytes"]
    if end > len(mv):
      raise RecordError(f"truncated record: field {spec['name']!r} needs {end} bytes, record has {len(mv)}")
    try:
      out[spec["name"]] = _decode_array(mv[pos:end], spec["dtype"], spec["shape"], spec["codec"])
    except RecordError:
      raise
    except Exception as e:  # zlib / PIL / reshape errors
      raise RecordError(f"corrupted field {spec['name']!r}: {e}") from None
    pos = end
  return out


# ----------------------------------------------------------------------------- tf.train.Example wrapper
# Hand-written protobuf wire format of Example{features{feature{key: bytes_list{value}}}} so that
# neither TensorFlow nor the protobuf runtime is needed to write or read a record.
def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    if n:
      out.append(b | 0x80)
    else:
      out.append(b)
      return bytes(out)


def _field(num: int, payload: bytes) -> bytes:
  return _varint((num << 3) | 2) + _varint(len(payload)) + payload


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
  shift = result = 0
  while True:
    if pos >= len(buf):
      raise RecordError("truncated varint in Example")
    b = buf[pos]
    pos += 1
    result |= (b & 0x7F) << shift
    if not b & 0x80:
      return result, pos
    shift += 7


def _iter_fields(buf: memoryview):
  pos = 0
  while pos < len(buf):
    tag, pos = _read_varint(buf, pos)
    if tag & 7 != 2:
      raise RecordError(f"unexpected wire type {tag & 7} in Example")
    n, pos = _read_varint(buf, pos)
    if pos + n > len(buf):
      raise RecordError("truncated Example")
    yield tag >> 3, buf[pos:pos + n]
    pos += n


def encode_example(features: dict[str, bytes]) -> bytes:
  """dict of name -> bytes as a serialized tf.train.Example (one bytes value per feature)."""
  entries = b""
  for name, value in sorted(features.items()):
    feature = _field(1, _field(1, value))  # Feature.bytes_list(1) -> BytesList.value(1)
    entries += _field(1, _field(1, name.encode()) + _field(2, feature))
  return _field(1, entries)


def decode_example(serialized: bytes) -> dict[str, bytes]:
  out = {}
  for num, features in _iter_fields(memoryview(serialized)):
    if num != 1:
      continue
    for _, entry in _iter_fields(features):
      name, value = None, b""
      for fnum, fval in _iter_fields(entry):
        if fnum == 1:
          name = bytes(fval).decode()
        elif fnum == 2:
          for lnum, lval in _iter_fields(fval):
            if lnum == 1:  # bytes_list
              for _, v in _iter_fields(lval):
                value = bytes(v)
      if name is not None:
        out[name] = value
  return out


def encode_record(meta: dict[str, Any], arrays: dict[str, np.ndarray],
                  codecs: dict[str, str] | None = None) -> bytes:
  """The bytes stored in the shards for one sample."""
  return encode_example({"key": str(meta["key"]).encode(), "record": encode_payload(meta, arrays, codecs)})


def decode_record(serialized: bytes) -> dict[str, Any]:
  ex = decode_example(serialized)
  if "record" not in ex:
    raise RecordError("Example without a 'record' feature")
  return decode_payload(ex["record"])


# ----------------------------------------------------------------------------- file layout
def shard_name(split: str, index: int, count: int) -> str:
  """TFDS ArrayRecord naming, so that `tfds.builder_from_directory(dir)` finds the shards."""
  return f"{DATASET_NAME}-{split}.array_record-{index:05d}-of-{count:05d}"


MANIFEST = "manifest.json"
EVENT_TABLE = "event_table.npy"


def index_name(split: str) -> str:
  """Per-split sample index (JSON lines: key, ids, times, demographics) in record order."""
  return f"index-{split}.jsonl"
