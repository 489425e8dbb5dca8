"""MIMIC-CXR-JPG images -> grey uint8 size x size, cached as PNG files (one per dicom, resumable).

The reference squashes each X-ray to 256x256 without keeping the aspect ratio (`mode='squash'`,
default); `mode='pad'` pads the shorter side with black to a square first, keeping the aspect ratio.
Resizing uses PIL's antialiased bilinear filter. Missing or unreadable files are skipped and counted.
"""
from __future__ import annotations

import concurrent.futures as cf
import io
import os
from typing import Iterable

import numpy as np
from PIL import Image

from data_prep.tables import Counters


def image_path(cxr_root: str, subject_id: int, study_id: int, dicom_id: str) -> str:
  s = str(int(subject_id))
  return os.path.join(cxr_root, "files", f"p{s[:2]}", f"p{s}", f"s{int(study_id)}", f"{dicom_id}.jpg")


def load_image(path: str, size: int = 256, mode: str = "squash") -> np.ndarray:
  """uint8 [size, size] grey image."""
  with Image.open(path) as img:
    img = img.convert("L")
    if mode == "pad":
      w, h = img.size
      side = max(w, h)
      canvas = Image.new("L", (side, side), 0)
      canvas.paste(img, ((side - w) // 2, (side - h) // 2))
      img = canvas
    elif mode != "squash":
      raise ValueError(f"unknown resize mode {mode!r}: squash | pad")
    img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, np.uint8)


def png_bytes(arr: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr, mode="L").save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def _job(args):
  src, dst, size, mode = args
  if os.path.exists(dst):
    return True, ""
  try:
    arr = load_image(src, size, mode)
  except FileNotFoundError:
    return False, "missing"
  except Exception as e:  # truncated / not an image
    return False, f"unreadable: {e}"
  tmp = dst + f".tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(png_bytes(arr))
  os.replace(tmp, dst)
  return True, ""


def cache_images(items: Iterable[tuple[int, int, str]], cxr_root: str, cache_dir: str, size: int = 256,
                 mode: str = "squash", workers: int = 1, counters: Counters | None = None) -> dict[str, str]:
  """items: (subject_id, study_id, dicom_id). Returns dicom_id -> cached PNG path for every image that
  could be read; the others are counted ('images: missing files' / 'images: unreadable files')."""
  os.makedirs(cache_dir, exist_ok=True)
  jobs, dst = [], {}
  for subject, study, dicom in items:
    out = os.path.join(cache_dir, f"{dicom}.png")
    dst[dicom] = out
    jobs.append((image_path(cxr_root, subject, study, dicom), out, size, mode))
  if workers > 1 and len(jobs) > 64:
    with cf.ProcessPoolExecutor(workers) as ex:
      results = list(ex.map(_job, jobs, chunksize=32))
  else:
    results = [_job(j) for j in jobs]
  ok = {}
  for (src, out, _, _), (good, why) in zip(jobs, results):
    dicom = os.path.basename(out)[:-4]
    if good:
      ok[dicom] = out
    elif counters is not None:
      counters["images: missing files" if why == "missing" else "images: unreadable files"] += 1
  return ok
