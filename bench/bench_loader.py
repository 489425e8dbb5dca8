"""Record layouts and loader throughput on paper-scale samples (two 256x256 images, up to 1024 x 1536
events).

    python bench/bench_loader.py [--samples 96] [--events 713] [--batch 32] [--workers 0,1,2] [--loader-only]

1. bytes per sample for candidate layouts (the issue's naive figure: 2 float32 images + 1024 x 1536
   float16 rows ~ 3.5 MB); event vectors are dense Gaussian unit vectors (like text-embedding-ada-002;
   hashing vectors are sparse and compress far better), images are smooth X-ray-like pictures with
   film-grain noise (PNG of real 256 px X-rays is in the same range);
2. decode time per record for each layout;
3. loader samples/s (make_loader: the host batches of CONTRIBUTING.md, uint8 images and float16 events) in
   process and with grain workers, and in process with the transfer to the devices (parallel.to_global,
   which sends only the valid event rows): samples/s and bytes host-to-device per sample, next to the bytes of
   the former float32 host batch (3-channel float32 images, float32 events).
Paper scale is the default: 713 valid events of 1024 x 1536, two 256 px images, batch 32.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep import write  # noqa: E402
from ehrxdiff_jax import batch_format, parallel, pipeline  # noqa: E402
from ehrxdiff_jax import records as rec  # noqa: E402


def xray_like(rng, size=256):
  y, x = np.mgrid[0:size, 0:size] / size
  body = 150 * np.exp(-((x - 0.5) ** 2) / 0.08) + 40 * np.sin(8 * np.pi * y) * (np.abs(x - 0.5) > 0.12)
  lungs = -60 * (np.exp(-((x - 0.3) ** 2 + (y - 0.5) ** 2) / 0.03) + np.exp(-((x - 0.7) ** 2 + (y - 0.5) ** 2) / 0.03))
  img = 60 + body + lungs + rng.normal(0, 6, (size, size))
  return np.clip(img, 0, 255).astype(np.uint8)


def sample_arrays(rng, n_events, dim=1536):
  ev = rng.standard_normal((n_events, dim)).astype(np.float32)
  ev /= np.linalg.norm(ev, axis=1, keepdims=True)
  return xray_like(rng), xray_like(rng), ev.astype(np.float16)


LAYOUTS = {
    # name: (image codec, event codec, events stored, shard compression)
    "naive: fp32 images + 1024 fp16 rows": ("naive", "raw", "padded", "uncompressed"),
    "raw uint8 images + valid fp16 rows": ("raw", "raw", "valid", "uncompressed"),
    "png images + valid fp16 rows": ("png", "raw", "valid", "uncompressed"),
    "png images + valid fp16 rows + zstd:1": ("png", "raw", "valid", "zstd:1"),
    "raw uint8 images + valid fp16 rows + zstd:1": ("raw", "raw", "valid", "zstd:1"),
    "png images + event ids (shared table)": ("png", "raw", "ids", "uncompressed"),
    "raw images + event ids (shared table) + zstd:1": ("raw", "raw", "ids", "zstd:1"),
}


def encode(layout, prev, trg, ev, i):
  img_codec, ev_codec, stored, _ = layout
  meta = dict(key=f"p{i}_s{i}_s{i + 1}", trg_dicom=f"t{i}")
  if img_codec == "naive":
    # naive: float32 grey images and the padded event matrix
    arrays = dict(prev_image_f32=prev.astype(np.float32), target_image_f32=trg.astype(np.float32),
                  events=np.pad(ev, ((0, 1024 - len(ev)), (0, 0))))
    return rec.encode_record(meta, arrays)
  arrays = dict(prev_image=prev, target_image=trg)
  if stored == "ids":
    arrays["event_ids"] = np.arange(len(ev), dtype=np.int32)
  else:
    arrays["events"] = ev
  arrays["prev_labels_imagenome"] = np.zeros(10, np.float32)
  arrays["target_labels_imagenome"] = np.zeros(10, np.float32)
  return rec.encode_record(meta, arrays, dict(prev_image=img_codec, target_image=img_codec, events=ev_codec))


def write_dataset(out, layout, samples, n_events, seed=0):
  rng = np.random.default_rng(seed)
  cache = [sample_arrays(rng, n_events) for _ in range(8)]  # 8 distinct samples, reused
  payloads = [encode(layout, *cache[i % 8], i) for i in range(samples)]
  shards = write.write_shards(out, "train", iter(payloads), samples, 32, f"group_size:1,{layout[3]}")
  import json
  with open(os.path.join(out, rec.index_name("train")), "w") as f:
    f.write("\n".join(json.dumps(dict(key=f"p{i}_s{i}_s{i + 1}", trg_dicom=f"t{i}", record=i)) for i in range(samples)))
  if layout[2] == "ids":
    np.save(os.path.join(out, rec.EVENT_TABLE), cache[0][2])
  man = dict(schema_version=rec.SCHEMA_VERSION, image_size=256, event_dim=1536,
             event_layout="table" if layout[2] == "ids" else "inline",
             label_sets=["imagenome"], splits=dict(train=dict(samples=samples, shards=shards, distinct_targets=samples)))
  write.write_json(os.path.join(out, rec.MANIFEST), man)
  return sum(s["bytes"] for s in shards) / samples, payloads


def _loader(data_dir, batch, workers):
  cfg = dict(image_size=256, w_null=False, augment_target=False, cached_latents=False, num_workers=workers)
  it = iter(pipeline.make_loader(data_dir, "train", global_batch_size=batch, config_data=cfg, seed=0,
                                 process_index=0, process_count=1, max_events=1024))
  next(it)  # warm-up (worker start)
  return it


def _former_bytes(host) -> int:
  """Bytes of the host batch as the loader built it before: float32 images with 3 channels, float32 events."""
  grow = {k: 3 * 4 for k in batch_format.IMAGE_KEYS} | {k: 2 for k in batch_format.EVENT_KEYS}
  return sum(v.nbytes * grow.get(k, 1) for k, v in parallel.device_batch(host).items() if k != parallel.EVENT_ROWS)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--samples", type=int, default=96)
  ap.add_argument("--events", type=int, default=713, help="valid events per sample (paper mean 713)")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--batches", type=int, default=8)
  ap.add_argument("--workers", default="0,1,2")
  ap.add_argument("--dir", default=None)
  ap.add_argument("--loader-layouts", default="raw images + event ids (shared table) + zstd:1;"
                                               "raw uint8 images + valid fp16 rows + zstd:1",
                  help="';'-separated layouts (names of the table) the loader is timed on")
  ap.add_argument("--loader-only", action="store_true", help="write and time only the --loader-layouts")
  a = ap.parse_args(argv)
  loader_layouts = a.loader_layouts.split(";")
  root = a.dir or tempfile.mkdtemp(prefix="bench_loader_")
  print(f"{'layout':<42} {'kB/sample':>10} {'decode ms':>10}")
  chosen = {}
  for name, layout in LAYOUTS.items():
    if a.loader_only and name not in loader_layouts:
      continue
    out = os.path.join(root, name.split(":")[0].replace(" ", "_").replace("+", "")[:40])
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    per, payloads = write_dataset(out, layout, a.samples, a.events)
    t = time.perf_counter()
    for p in payloads[:16]:
      rec.decode_record(p)
    ms = (time.perf_counter() - t) / 16 * 1e3
    extra = ""
    if layout[2] == "ids":
      extra = "  (+ 3 kB per distinct event text in event_table.npy)"
    print(f"{name:<42} {per / 1e3:>10.1f} {ms:>10.2f}{extra}", flush=True)
    chosen[name] = out
  import jax
  from ehrxdiff_jax.config_util import load_config
  mesh = parallel.make_mesh(load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                     "configs", "base.py")))
  for lay in loader_layouts:
    print(f"\nloader on '{lay}' ({a.events} valid events, max_events 1024, batch {a.batch}, host batches):")
    for w in [int(x) for x in a.workers.split(",")]:
      it = _loader(chosen[lay], a.batch, w)
      t, cpu = time.perf_counter(), time.process_time()
      for _ in range(a.batches):
        next(it)
      dt, cpu = time.perf_counter() - t, time.process_time() - cpu
      n = a.batches * a.batch
      print(f"  workers={w}: {n / dt:8.1f} samples/s" + (f", {cpu / n * 1e3:.2f} CPU ms per sample" if w == 0 else ""),
            flush=True)
      del it
    it, stats, former = _loader(chosen[lay], a.batch, 0), {}, 0
    jax.block_until_ready(parallel.to_global(next(it), mesh))  # warm-up: compiles the event unpacking
    t, cpu = time.perf_counter(), time.process_time()
    for _ in range(a.batches):
      host = next(it)
      former += _former_bytes(host)
      jax.block_until_ready(parallel.to_global(host, mesh, stats=stats))
    dt, cpu = time.perf_counter() - t, time.process_time() - cpu
    n = a.batches * a.batch
    print(f"  workers=0 + to_global on {mesh.devices.size} {jax.devices()[0].platform} device(s): "
          f"{n / dt:8.1f} samples/s, {cpu / n * 1e3:.2f} CPU ms per sample, "
          f"{stats['bytes'] / n / 1e6:.2f} MB host-to-device per sample "
          f"(the former float32 host batch: {former / n / 1e6:.2f} MB)", flush=True)
  if not a.dir:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
