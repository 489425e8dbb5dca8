"""The grain input pipeline on small datasets written with the record schema."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from data_prep import write
from ehrxdiff_jax import parallel, pipeline
from ehrxdiff_jax import records as rec

D, S = 8, 16  # event width, image size


def make_dataset(out, n=12, n_targets=None, split="train", records_per_shard=5, extra=None, random_events=False):
  """n samples; sample i has i % 7 + 1 events whose rows are all i+1 (random float16 values with
  `random_events`); target dicom t{i % n_targets}."""
  os.makedirs(out, exist_ok=True)
  n_targets = n_targets or n
  rng = np.random.default_rng(0)
  payloads, index = [], []
  for i in range(n):
    k = i % 7 + 1
    prev = (rng.random((S, S)) * 255).astype(np.uint8)
    trg = np.full((S, S), 200, np.uint8)
    events = rng.normal(size=(k, D)).astype(np.float16) if random_events else np.full((k, D), i + 1, np.float16)
    arrays = dict(prev_image=prev, target_image=trg, events=events,
                  prev_labels_chexpert=np.array([1, 0, -1, np.nan] + [0] * 10, np.float32),
                  target_labels_chexpert=np.ones(14, np.float32))
    arrays.update((extra or {}))
    meta = dict(key=f"p{i}_s{i}_s{100 + i}", trg_dicom=f"t{i % n_targets}")
    payloads.append(rec.encode_record(meta, arrays, dict(prev_image="png", target_image="raw")))
    index.append(dict(key=meta["key"], trg_dicom=meta["trg_dicom"], record=i))
  shards = write.write_shards(out, split, iter(payloads), n, records_per_shard)
  with open(os.path.join(out, rec.index_name(split)), "w") as f:
    f.write("\n".join(json.dumps(x) for x in index) + "\n")
  man = dict(schema_version=rec.SCHEMA_VERSION, image_size=S, event_dim=D, event_layout="inline",
             label_sets=["chexpert"], splits={split: dict(samples=n, shards=shards,
                                                          distinct_targets=len({x["trg_dicom"] for x in index}))})
  write.write_json(os.path.join(out, rec.MANIFEST), man)
  write.write_tfds_info(out, {split: [s["records"] for s in shards]})
  return out


CFG = dict(image_size=S, w_null=False, augment_target=False, cached_latents=False, num_workers=0)


def loader(d, bs=4, process_index=0, process_count=1, **kw):
  cfg = dict(CFG, **kw.pop("cfg", {}))
  return pipeline.make_loader(d, "train", global_batch_size=bs, config_data=cfg, seed=kw.pop("seed", 0),
                              process_index=process_index, process_count=process_count, max_events=10, **kw)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
  return make_dataset(str(tmp_path_factory.mktemp("ds")))


def test_batch_format(ds):
  b = next(iter(loader(ds)))   # the host batch (CONTRIBUTING.md)
  assert b["prev_image"].shape == (4, S, S) and b["prev_image"].dtype == np.uint8
  assert b["target_image"].shape == (4, S, S) and (b["target_image"] == 200).all()
  assert b["events"].shape == (4, 10, D) and b["events"].dtype == np.float16
  assert b["event_mask"].shape == (4, 10) and b["event_mask"].dtype == bool
  assert b["event_rows"].dtype == np.int32 and (b["event_rows"] == b["event_mask"].sum(1)).all()
  assert b["prev_labels"].shape == (4, 14) and b["target_labels"].dtype == np.float32
  assert np.isnan(b["prev_labels"][:, 2]).all() and np.isnan(b["prev_labels"][:, 3]).all()  # -1 and unknown
  assert b["is_null"].dtype == bool and not b["is_null"].any()
  assert b["key"].dtype.kind == "S"
  for j in range(4):
    i = int(b["key"][j].split(b"_")[0][1:])
    k = i % 7 + 1
    assert b["event_mask"][j].sum() == k and b["event_mask"][j, :k].all()  # valid rows first
    assert (b["events"][j, :k] == i + 1).all() and (b["events"][j, k:] == 0).all()


def _former_host_batch(b):
  """The device-format batch the loader built on the host before (pipeline._Batcher up to 04270b7)."""
  out = {}
  for k in ("prev_image", "target_image"):
    img = np.stack(b[k]).astype(np.float32)
    img *= 2.0 / 255.0
    img -= 1.0
    out[k] = np.repeat(img[..., None], 3, axis=3)
  out["events"] = b["events"].astype(np.float32)
  return out


def test_device_batch_equals_the_former_host_batch(tmp_path):
  import jax
  from ehrxdiff_jax import batch_format, parallel
  n = len(jax.devices())
  d = make_dataset(str(tmp_path / "ds"), n=3 * n, n_targets=n, random_events=True)
  host = next(iter(loader(d, bs=2 * n, cfg=dict(w_null=True, augment_target=True))))  # real and w_null samples
  assert host["is_null"].any() and (host["event_rows"][host["is_null"]] == 0).all()
  mesh = jax.make_mesh((n, 1), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  stats = {}
  arrays = parallel.to_global({k: host[k] for k in ("prev_image", "target_image", "events", "event_mask",
                                                    "event_rows")}, mesh, stats=stats)
  assert "event_rows" not in arrays and arrays["events"].shape == (2 * n, 10, D)
  device = jax.device_get(jax.jit(batch_format.to_device)(arrays))
  want = _former_host_batch(host)
  for k in ("prev_image", "target_image"):   # bit for bit
    assert device[k].dtype == np.float32 and device[k].shape == (2 * n, S, S, 3)
    np.testing.assert_array_equal(device[k].view(np.uint32), want[k].view(np.uint32))
  assert device["events"].dtype == np.float32
  np.testing.assert_array_equal(device["events"], want["events"])   # float16 values exactly, zeros after
  np.testing.assert_array_equal(device["event_mask"], host["event_mask"])
  # only the valid event rows travel (packed per device, in blocks of max_events // 8 = 1 row here)
  valid = int(host["event_rows"].sum()) * D * 2
  images = 2 * host["prev_image"].nbytes
  assert stats["bytes"] == images + valid + host["event_mask"].nbytes + host["event_rows"].nbytes
  assert stats["bytes"] < images + host["events"].nbytes
  # every uint8 value, jitted and eager, against the former formula
  u8 = np.arange(256, dtype=np.uint8)
  former = u8.astype(np.float32) * np.float32(2 / 255) - np.float32(1)
  for got in (np.asarray(jax.jit(batch_format.images_to_float)(u8)), np.asarray(batch_format.images_to_float(u8))):
    np.testing.assert_array_equal(got.view(np.uint32), former.view(np.uint32))


def keys(it, n):
  return [k for _ in range(n) for k in next(it)["key"].tolist()]


def test_epochs_shuffle_and_determinism(ds):
  a = keys(iter(loader(ds, seed=1)), 6)       # 2 epochs of 12 samples, batch 4
  b = keys(iter(loader(ds, seed=1)), 6)
  c = keys(iter(loader(ds, seed=2)), 6)
  assert a == b and a != c
  assert sorted(a[:12]) == sorted(a[12:]) and len(set(a[:12])) == 12 and a[:12] != a[12:]
  plain = keys(iter(loader(ds, shuffle=False)), 3)
  assert plain == [f"p{i}_s{i}_s{100 + i}".encode() for i in range(12)]
  finite = list(loader(ds, num_epochs=1, bs=5))  # 12 samples, batch 5, drop remainder
  assert len(finite) == 2


def test_process_sharding(ds):
  k0 = keys(iter(loader(ds, bs=4, process_index=0, process_count=2)), 3)
  k1 = keys(iter(loader(ds, bs=4, process_index=1, process_count=2)), 3)
  assert len(k0) == len(k1) == 6 and not set(k0) & set(k1) and len(set(k0) | set(k1)) == 12


def test_state_restore(ds):
  it = iter(loader(ds, seed=3))
  next(it), next(it)
  state = it.get_state()
  want = [next(it) for _ in range(4)]
  it2 = iter(loader(ds, seed=3))
  it2.set_state(json.loads(json.dumps(state)))  # the state survives JSON
  got = [next(it2) for _ in range(4)]
  for w, g in zip(want, got):
    assert (w["key"] == g["key"]).all() and np.array_equal(w["target_image"], g["target_image"])


def test_w_null_and_augmentation(tmp_path):
  d = make_dataset(str(tmp_path / "ds"), n=12, n_targets=4)  # 4 distinct targets -> 4 null samples
  it = iter(loader(d, bs=16, cfg=dict(w_null=True, augment_target=True), num_epochs=1))
  b = next(it)
  null = b["is_null"]
  assert null.sum() == 4 and len(set(b["key"].tolist())) == 16
  assert b["event_mask"][null].all() and (b["events"][null] == 0).all() and (b["event_rows"][null] == 0).all()
  assert np.array_equal(b["target_labels"][null], b["prev_labels"][null], equal_nan=True)
  # real targets (constant 200) are rotated/scaled: black (fill) pixels appear in the corners
  real_t = b["target_image"][~null]
  assert (real_t == 0).any() and (real_t == 200).mean() > 0.5
  # null targets are the (augmented) prev image: mostly equal pixels, not identical
  for j in np.flatnonzero(null):
    same = (b["target_image"][j] == b["prev_image"][j]).mean()
    assert 0.05 < same < 1.0 or np.array_equal(b["target_image"][j], b["prev_image"][j])
  # deterministic per seed and sample
  b2 = next(iter(loader(d, bs=16, cfg=dict(w_null=True, augment_target=True), num_epochs=1)))
  assert np.array_equal(b["target_image"], b2["target_image"])
  # the prev image is never augmented
  src = pipeline.data_source(d, "train")
  j = int(np.flatnonzero(~null)[0])
  i = int(b["key"][j].split(b"_")[0][1:])
  assert np.array_equal(b["prev_image"][j], src[i]["prev_image"])


def test_random_affine_conventions():
  img = np.zeros((9, 9), np.uint8)
  img[4, 6] = 255  # a dot right of the centre (4.5, 4.5)
  rng = np.random.default_rng(0)
  assert np.array_equal(pipeline.random_affine(img, rng, degrees=0, scale=(1, 1)), img)
  class R:  # a fixed +90 degree angle: clockwise on screen, as torchvision's F.affine
    def uniform(self, a, b):
      return 90.0 if b == 90 else 1.0
  out = pipeline.random_affine(img, R(), degrees=90, scale=(1, 1))
  ys, xs = np.nonzero(out)
  assert (ys[0], xs[0]) == (6, 4)  # moved below the centre


def test_cached_latents_with_augmentation_is_refused(ds):
  with pytest.raises(ValueError, match="cached latents"):
    loader(ds, cfg=dict(cached_latents=True, augment_target=True))


def test_cached_latents(tmp_path):
  d = make_dataset(str(tmp_path / "ds"), n=4, extra=dict(target_moments=np.ones((2, 2, 6), np.float16),
                                                         prev_mean=np.zeros((2, 2, 3), np.float16)))
  b = next(iter(loader(d, bs=2, cfg=dict(cached_latents=True))))
  assert b["target_moments"].shape == (2, 2, 2, 6) and b["prev_mean"].dtype == np.float32


def test_corrupted_shard_is_named(tmp_path):
  d = make_dataset(str(tmp_path / "ds"))
  shard = os.path.join(d, rec.shard_name("train", 1, 3))
  with open(shard, "r+b") as f:  # same size, garbage inside
    f.seek(40)
    f.write(b"\xff" * 200)
  with pytest.raises(ValueError, match=rec.shard_name("train", 1, 3)):
    src = pipeline.data_source(d, "train")
    for i in range(len(src)):
      src[i]
  with open(shard, "r+b") as f:
    f.truncate(100)
  with pytest.raises(ValueError, match=r"truncated shard .*" + rec.shard_name("train", 1, 3)):
    loader(d)


def test_tfds_and_grain_sources(ds):
  import grain.python as gp
  t = pipeline.tfds_source(ds, "train")
  g = gp.ArrayRecordDataSource([os.path.join(ds, rec.shard_name("train", i, 3)) for i in range(3)])
  assert len(t) == len(g) == 12
  assert rec.decode_payload(t[3]["record"])["meta"]["key"] == rec.decode_record(g[3])["meta"]["key"] == "p3_s3_s103"


def test_workers_match_in_process(ds):
  a = keys(iter(loader(ds, seed=5)), 3)
  it = iter(loader(ds, seed=5, cfg=dict(num_workers=1)))
  assert keys(it, 3) == a


def test_to_global_on_mesh(ds):
  import jax
  from jax.sharding import Mesh
  mesh = Mesh(np.array(jax.devices()).reshape(-1, 1), ("data", "fsdp"))
  n = len(jax.devices())
  b = next(iter(loader(ds, bs=n)))
  g = parallel.to_global(b, mesh)
  assert "key" not in g and g["events"].shape == (n, 10, D)
  assert len(g["events"].sharding.device_set) == n
  assert np.array_equal(np.asarray(g["event_mask"]), b["event_mask"])


def test_damaged_dataset_files_are_named(tmp_path):
  """A torn manifest.json, a truncated event_table.npy, a shard that matches an edited manifest but does not
  open: each error names the file and says to re-run prepare."""
  d = make_dataset(str(tmp_path / "ds"))
  man_path = os.path.join(d, rec.MANIFEST)
  text = open(man_path).read()
  open(man_path, "w").write(text[:len(text) // 2])
  with pytest.raises(ValueError, match=f"{man_path} is not valid JSON .*re-run `ehrxdiff prepare`"):
    pipeline.read_manifest(d)
  man = json.loads(text)
  # a table-layout dataset whose event table lost its end
  table = os.path.join(d, rec.EVENT_TABLE)
  np.save(table, np.zeros((64, D), np.float16))
  open(table, "r+b").truncate(os.path.getsize(table) - 100)
  write.write_json(man_path, dict(man, event_layout="table"))
  with pytest.raises(ValueError, match=f"corrupted or truncated event table {table} .*re-run `ehrxdiff prepare`"):
    pipeline.data_source(d, "train")
  # shard 1 cut to 100 bytes, the manifest edited to match: it does not open
  shard = os.path.join(d, rec.shard_name("train", 1, 3))
  open(shard, "r+b").truncate(100)
  man["splits"]["train"]["shards"][1]["bytes"] = 100
  write.write_json(man_path, man)
  with pytest.raises(ValueError, match=f"corrupted shard {shard}: it does not open") as e:
    pipeline.data_source(d, "train")
  assert rec.shard_name("train", 0, 3) not in str(e.value) and rec.shard_name("train", 2, 3) not in str(e.value)
