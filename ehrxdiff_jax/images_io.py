"""Writing generated X-rays: 8-bit grey PNGs and the labelled comparison grid (PIL only).

    png_name(key)                      a sample's PNG file stem (`sample` writes, `evaluate` reads)
    to_uint8(img)                      [-1, 1] float [H, W] or [H, W, C] -> uint8 grey [H, W]
    write_png(path, img, size=None)    one 8-bit grey PNG (optionally resized to size x size),
                                       atomically
    make_grid(columns, ...)            columns [(title, [N, H, W(, C)] in [-1, 1])] -> uint8 grid
                                       with the titles above the columns and optional row labels
    write_grid(path, columns, ...)     the same, saved as PNG

Grey = mean over the channels (the networks work on the grey image replicated to 3 channels);
uint8 = round((x + 1) * 127.5) after clipping to [-1, 1] (the inverse of the pipeline's
x / 127.5 - 1).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np


def png_name(key: str) -> str:
  """File stem of a sample key: characters other than letters, digits, '-', '_', '.' become '_'."""
  name = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
  return name or "sample"


def to_uint8(img) -> np.ndarray:
  """[-1, 1] float image [H, W] or [H, W, C] (C = 1 or 3) -> uint8 grey [H, W]."""
  x = np.asarray(img, np.float32)
  if x.ndim == 3:
    x = x.mean(axis=-1)
  if x.ndim != 2:
    raise ValueError(f"expected an image [H, W] or [H, W, C], got shape {x.shape}")
  x = np.nan_to_num(x, nan=-1.0)
  return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def _pil(img, size: int | None = None):
  from PIL import Image
  pixels = np.asarray(img) if np.asarray(img).dtype == np.uint8 else to_uint8(img)
  im = Image.fromarray(pixels, mode="L")
  if size is not None and im.size != (size, size):
    im = im.resize((size, size), Image.BICUBIC)
  return im


def write_png(path: str, img, size: int | None = None) -> None:
  """Writes one 8-bit grey PNG; written to `path.tmp` and renamed (never a half-written file)."""
  tmp = f"{path}.tmp"
  _pil(img, size).save(tmp, format="PNG")
  os.replace(tmp, path)


def read_png(path: str) -> np.ndarray:
  """uint8 [H, W] of a grey PNG (for tests and evaluation)."""
  from PIL import Image
  with Image.open(path) as im:
    return np.asarray(im.convert("L"), np.uint8)


def _font():
  from PIL import ImageFont
  try:
    return ImageFont.load_default()
  except Exception:  # noqa: BLE001 - very old Pillow
    return None


def make_grid(columns: Sequence[tuple[str, np.ndarray]], row_labels: Sequence[str] | None = None,
              cell: int | None = None, pad: int = 2, header: int = 14,
              label_height: int = 12) -> np.ndarray:
  """A uint8 grey grid: a column per (title, images [N, H, W(, C)] in [-1, 1]), a row per sample.

  Titles are drawn above the columns; `row_labels` (e.g. sample keys, shortened) under each row.
  `cell`: resize every image to cell x cell (default: the first column's height)."""
  from PIL import Image, ImageDraw
  if not columns:
    raise ValueError("make_grid needs at least one column")
  n = len(columns[0][1])
  if any(len(imgs) != n for _, imgs in columns):
    raise ValueError(f"columns have different numbers of images: {[len(c[1]) for c in columns]}")
  cell = int(cell or np.asarray(columns[0][1][0]).shape[0])
  lab = label_height if row_labels is not None else 0
  width = len(columns) * (cell + pad) + pad
  height = header + n * (cell + lab + pad) + pad
  canvas = Image.new("L", (width, height), color=0)
  draw = ImageDraw.Draw(canvas)
  font = _font()
  max_chars = max(1, (cell + pad) // 6)
  for j, (title, imgs) in enumerate(columns):
    x = pad + j * (cell + pad)
    draw.text((x + 1, 1), str(title)[:max_chars], fill=255, font=font)
    for i in range(n):
      y = header + i * (cell + lab + pad)
      canvas.paste(_pil(imgs[i], cell), (x, y))
  if row_labels is not None:
    chars = max(1, width // 6)
    for i, label in enumerate(row_labels):
      y = header + i * (cell + lab + pad) + cell
      text = str(label)
      text = text if len(text) <= chars else text[:chars - 1] + "~"
      draw.text((pad, y), text, fill=200, font=font)
  return np.asarray(canvas, np.uint8)


def write_grid(path: str, columns: Sequence[tuple[str, np.ndarray]],
               row_labels: Sequence[str] | None = None, **kwargs) -> np.ndarray:
  """make_grid(...) saved as an 8-bit grey PNG at `path`; returns the grid array."""
  grid = make_grid(columns, row_labels, **kwargs)
  write_png(path, grid)
  return grid
