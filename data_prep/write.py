"""Output writing: ArrayRecord shards in TFDS naming, the TFDS dataset info and the manifest (the output
directory itself is atomic: ehrxdiff_jax.outputs.atomic_directory)."""
from __future__ import annotations

import json
import os
from typing import Iterable

from ehrxdiff_jax import records as rec

# group_size:1 makes every record independently addressable (fast random access for global shuffle).
DEFAULT_WRITER_OPTIONS = "group_size:1"


def write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=False, default=str)
  os.replace(tmp, path)


def write_shards(out_dir: str, split: str, payloads: Iterable[bytes], num_records: int,
                 records_per_shard: int = 2048, options: str = DEFAULT_WRITER_OPTIONS) -> list[dict]:
  """Write `num_records` serialized records into ceil(n / records_per_shard) shards."""
  from array_record.python.array_record_module import ArrayRecordWriter
  count = max(1, -(-num_records // records_per_shard))
  shards, it, written = [], iter(payloads), 0
  for s in range(count):
    name = rec.shard_name(split, s, count)
    path = os.path.join(out_dir, name)
    w = ArrayRecordWriter(path, options)
    n = 0
    target = min(records_per_shard, num_records - written)
    for _ in range(target):
      w.write(next(it))
      n += 1
    w.close()
    written += n
    shards.append(dict(file=name, records=n, bytes=os.path.getsize(path)))
  if written != num_records:
    raise RuntimeError(f"{split}: wrote {written} records, expected {num_records}")
  return shards


def write_tfds_info(out_dir: str, shard_lengths: dict[str, list[int]], description: str = "") -> None:
  """dataset_info.json + features.json so that `tfds.builder_from_directory(out_dir)` and
  `tfds.data_source('ehrxdiff', data_dir=...)` (for the `ehrxdiff/1.0.0` layout) read the shards."""
  import numpy as np
  import tensorflow_datasets as tfds
  feats = tfds.features.FeaturesDict({"key": tfds.features.Text(),
                                      "record": tfds.features.Tensor(shape=(), dtype=np.object_)})
  ident = tfds.core.DatasetIdentity(name=rec.DATASET_NAME, version=rec.DATASET_VERSION, data_dir=out_dir,
                                    module_name=rec.DATASET_NAME)
  info = tfds.core.DatasetInfo(builder=ident, features=feats, description=description or (
      "EHRXDiff triples (I_prev, S_event, I_trg); 'record' is decoded by ehrxdiff_jax.records.decode_payload"))
  splits = []
  for split, lengths in shard_lengths.items():
    tmpl = tfds.core.ShardedFileTemplate(data_dir=out_dir, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
                                         dataset_name=rec.DATASET_NAME, split=split, filetype_suffix="array_record")
    splits.append(tfds.core.SplitInfo(name=split, shard_lengths=list(lengths), num_bytes=0, filename_template=tmpl))
  info.set_splits(tfds.core.SplitDict(splits))
  info.set_file_format("array_record")
  info.write_to_directory(out_dir)
