"""Renderer of the synthetic chest radiographs of `ehrxdiff demo-data`.

A 256x256 grey image is drawn from a per-patient anatomy (body and lung size, heart position, rib
spacing, ...) and the patient's clinical state at the acquisition time (pleural effusion, lung
opacity, pulmonary oedema, cardiac size, pneumothorax, support devices), all vectorised in numpy.
The image is built as a "density" map in [0, 1] (air dark, soft tissue grey, bone bright); findings
fill the dark lung fields, so an effusion whitens the lung base, an opacity a lobe, oedema the hila.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

SIZE = 256   # output size
_RES = 128   # drawing grid; the smooth density map is upsampled to SIZE, noise is added at SIZE
_G = (np.arange(_RES, dtype=np.float32) / (_RES - 1)) * 2 - 1


def _sig(z):
  return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


def _lowfreq(rng, cells=8, size=_RES):
  """Smooth noise in about [-1, 1]: a random coarse grid upsampled bicubically."""
  small = rng.standard_normal((cells, cells)).astype(np.float32)
  big = np.asarray(Image.fromarray(small, mode='F').resize((size, size), Image.BICUBIC))
  return np.clip(big, -1.5, 1.5) / 1.5


def random_anatomy(rng, sex: str, age: float) -> dict:
  """Per-patient constants of the drawing. Demographics shift a few of them (a weak signal, smaller than
  the spread between patients, that an image classifier can learn): men get a wider body and lungs,
  women breast shadows (soft tissue over the lower lateral lung fields); bone contrast (ribs,
  clavicles, spine) falls with age."""
  male = sex == 'M'
  return dict(
      body_w=float(rng.uniform(0.80, 0.89) + 0.045 * male), lung_rx=float(rng.uniform(0.25, 0.30) + 0.015 * male),
      breast=0.0 if male else float(rng.uniform(0.05, 0.1)),
      bone=float(np.clip(1.3 - 0.008 * (age - 20) + rng.normal(0, 0.08), 0.6, 1.5)),
      lung_ry=float(rng.uniform(0.56, 0.64)), lung_cy=float(rng.uniform(-0.12, -0.02)),
      lung_gap=float(rng.uniform(0.07, 0.11)), heart_cx=float(rng.uniform(0.05, 0.12)),
      heart_cy=float(rng.uniform(0.2, 0.27)), rib_spacing=float(rng.uniform(0.11, 0.14)),
      rib_curve=float(rng.uniform(0.25, 0.45)), rib_phase=float(rng.uniform(0, 1)),
      med_w=float(rng.uniform(0.09, 0.12)), lung_dark=float(rng.uniform(0.30, 0.38)),
      tissue=float(rng.uniform(0.50, 0.60)), gamma=float(rng.uniform(0.85, 1.15)),
      opac_side=int(rng.choice([-1, 1])), opac_y=float(rng.uniform(-0.05, 0.3)),
      eff_side=int(rng.choice([-1, 1, 0])),  # 0: bilateral
      ptx_side=int(rng.choice([-1, 1])),
      nodule=(float(rng.uniform(0.25, 0.45)) * int(rng.choice([-1, 1])), float(rng.uniform(-0.3, 0.2)))
      if rng.random() < 0.12 else None,
  )


def render(anat: dict, state: dict, view: str, rng) -> np.ndarray:
  """uint8 [256, 256] image of `state` (keys effusion, opacity, edema, heart, ptx: floats in [0, 1];
  devices: bool) seen in `view` ('PA', 'AP', 'LATERAL', 'LL')."""
  # Positioning jitter: small shift, scale and rotation of the patient in the field. Kept below the size of
  # a finding's change (an effusion's meniscus moves ~0.02 per 0.1 of severity): with 3x this jitter the
  # difference between two studies of a patient was mostly repositioning, which no event explains.
  ang = rng.normal(0, 0.01)
  sc = 1 + rng.normal(0, 0.007)
  dx, dy = rng.normal(0, 0.008, size=2)
  ca, sa = np.cos(ang), np.sin(ang)
  x0, y0 = _G[None, :] - dx, _G[:, None] - dy
  x = ((ca * x0 + sa * y0) * sc).astype(np.float32)
  y = ((-sa * x0 + ca * y0) * sc).astype(np.float32)
  if view in ('LATERAL', 'LL'):
    dens = _lateral(anat, state, x, y, rng)
  else:
    dens = _frontal(anat, state, x, y, rng, ap=(view == 'AP'))
  dens = dens + 0.02 * _lowfreq(rng, 6)  # exposure non-uniformity (was 0.05: it hid mild findings)
  dens = np.asarray(Image.fromarray(dens.astype(np.float32), mode='F').resize((SIZE, SIZE), Image.BICUBIC))
  dens = dens + rng.normal(0, 0.018, size=dens.shape).astype(np.float32)
  dens = np.clip(dens, 0, 1) ** (anat['gamma'] * rng.uniform(0.97, 1.03))
  img = Image.fromarray((dens * 255).astype(np.uint8), mode='L')
  return np.asarray(img.filter(ImageFilter.GaussianBlur(0.7)))


def _frontal(a, s, x, y, rng, ap):
  mag = 1.1 if ap else 1.0  # AP films magnify the heart
  body = _sig((1 - np.abs(x / a['body_w']) ** 2.5 - np.abs((y - 0.15) / 1.35) ** 4) / 0.04)
  neck = _sig((0.16 - np.abs(x)) / 0.02) * _sig((-0.7 - y) / 0.05)
  body = np.maximum(body, neck)
  dens = 0.06 + body * (a['tissue'] - 0.06)
  fill = np.zeros_like(x)   # how much each lung pixel is filled by disease, 0..1
  lungs = np.zeros_like(x)
  lung_ext = np.zeros_like(x)
  texture = _lowfreq(rng, 14)
  for side in (-1, 1):
    cx = side * (a['lung_gap'] + a['lung_rx'])
    u = (x - cx) / a['lung_rx']
    ell = u ** 2 + ((y - a['lung_cy']) / a['lung_ry']) ** 2
    dome = a['lung_cy'] + 0.8 * a['lung_ry'] - 0.12 * (1 - np.clip(u, -1, 1) ** 2) + (0.03 if side > 0 else 0)
    ext = _sig((1 - ell) / 0.06)
    lung = ext * _sig((dome - y) / 0.015)
    lungs += lung
    lung_ext += ext
    base = a['lung_cy'] + 0.8 * a['lung_ry']
    e = s['effusion'] if (a['eff_side'] in (0, side)) else 0.5 * s['effusion'] * (s['effusion'] > 0.6)
    if e > 0.02:  # meniscus: fluid level rising laterally
      level = base - e * 1.2 * a['lung_ry'] - 0.15 * e * np.clip(side * u, 0, 1)
      fill = np.maximum(fill, ext * _sig((y - level) / 0.025))
    if side == a['opac_side'] and s['opacity'] > 0.02:
      r = 0.07 + 0.14 * s['opacity']
      ox = cx + side * 0.05
      g = np.exp(-((x - ox) ** 2 + (y - a['opac_y']) ** 2) / (2 * r * r))
      fill = np.maximum(fill, np.clip(2.2 * s['opacity'] * g * (0.75 + 0.5 * texture), 0, 1) * lung)
    hil = np.exp(-((x - side * (a['lung_gap'] + 0.06)) ** 2 + (y - 0.0) ** 2) / (2 * 0.2 ** 2))
    if s['edema'] > 0.02:  # perihilar "bat wing" haze
      fill = np.maximum(fill, np.clip(s['edema'] * 1.6 * hil * (0.8 + 0.4 * texture), 0, 1) * lung)
    # hilar vessels / vascular markings, more prominent with congestion
    dens = dens + lung * hil * (0.07 + 0.12 * s['edema']) * (0.7 + 0.3 * texture)
  lungs = np.clip(lungs, 0, 1)
  clear = lungs * (1 - fill)
  dens = dens - a['lung_dark'] * clear + 0.05 * lung_ext * fill * (1 - lungs)
  if s['ptx'] > 0.02:  # apical-lateral air without markings, with a thin visceral pleural line
    side = a['ptx_side']
    cx = side * (a['lung_gap'] + a['lung_rx'])
    edge = cx + side * a['lung_rx'] * (1 - 0.9 * s['ptx'])
    d = side * (x - edge)
    reg = lungs * _sig(d / 0.01) * _sig((0.15 - y) / 0.05)
    dens = dens - 0.08 * reg - 0.05 * reg * texture
    dens = dens + 0.12 * lungs * np.exp(-(d / 0.006) ** 2) * _sig((0.15 - y) / 0.05)
  # ribs: curved periodic bands inside the thorax
  phase = (y - a['rib_curve'] * np.abs(x) + 0.3 * x ** 2) / a['rib_spacing'] + a['rib_phase']
  ribs = _sig((0.22 - np.abs(phase - np.round(phase))) / 0.04) * _sig((0.85 - np.abs(x)) / 0.05)
  dens = dens + 0.055 * a['bone'] * ribs * np.clip(lung_ext, 0, 1) * _sig((0.55 - y) / 0.05)
  clav = np.exp(-((y - (-0.62 + 0.12 * np.abs(x))) / 0.025) ** 2) * _sig((0.6 - np.abs(x)) / 0.04)
  dens = dens + 0.12 * a['bone'] * clav
  if a['breast'] > 0:  # soft-tissue shadows over the lower lateral lung fields
    for side in (-1, 1):
      dens = dens + a['breast'] * body * _sig((1 - ((x - side * 0.42) / 0.3) ** 2 - ((y - 0.4) / 0.22) ** 2) / 0.15)
  # mediastinum, heart (size from the state), spine
  med = _sig((a['med_w'] * (1 + 0.6 * s.get('widening', 0)) - np.abs(x - 0.01)) / 0.015) * _sig((0.55 - y) / 0.03)
  hrx = (0.22 + 0.2 * s['heart']) * mag
  hry = (0.2 + 0.06 * s['heart']) * mag
  heart = _sig((1 - ((x - a['heart_cx']) / hrx) ** 2 - ((y - a['heart_cy']) / hry) ** 2) / 0.06)
  dens = np.maximum(dens, (a['tissue'] + 0.1) * np.maximum(med, heart) * body)
  spine = _sig((0.055 - np.abs(x)) / 0.01)
  vert = 0.5 + 0.5 * np.cos(2 * np.pi * (y / 0.085))
  dens = dens + (0.08 + 0.04 * vert) * a['bone'] * spine * body
  if a['nodule'] is not None:
    nx, ny = a['nodule']
    dens = dens + 0.18 * _sig((0.035 - np.hypot(x - nx, y - ny)) / 0.006) * lungs
  if s['devices']:  # endotracheal tube, a central line and ECG leads
    dens = np.maximum(dens, 0.92 * _sig((0.008 - np.abs(x - 0.01)) / 0.003) * _sig((-0.35 - y) / 0.01))
    curve = -0.45 + 1.2 * (x + 0.05) ** 2
    line = _sig((0.006 - np.abs(y - curve)) / 0.003) * _sig((x + 0.05) / 0.01) * _sig((0.6 - x) / 0.01)
    dens = np.maximum(dens, 0.85 * line)
    for lx, ly in ((-0.55, -0.55), (0.55, -0.55), (0.5, 0.55)):
      dens = np.maximum(dens, 0.95 * _sig((0.03 - np.hypot(x - lx, y - ly)) / 0.005))
  if ap:  # portable marker in a corner
    dens = np.maximum(dens, 0.97 * ((x > 0.7) & (x < 0.88) & (y > -0.92) & (y < -0.8)))
  return dens


def _lateral(a, s, x, y, rng):
  body = _sig((1 - (x / 0.78) ** 2 - np.abs((y - 0.1) / 1.3) ** 4) / 0.04)
  dens = 0.06 + body * (a['tissue'] - 0.06)
  texture = _lowfreq(rng, 20)
  ell = ((x - 0.05) / 0.47) ** 2 + ((y - a['lung_cy']) / (a['lung_ry'] + 0.03)) ** 2
  ext = _sig((1 - ell) / 0.06)
  base = a['lung_cy'] + 0.85 * a['lung_ry']
  lung = ext * _sig((base - 0.1 * (1 - x) - y) / 0.015)
  fill = np.zeros_like(x)
  e = s['effusion']
  if e > 0.02:  # fluid collects posteriorly (image right), meniscus rising to the back
    level = base - e * 1.0 * a['lung_ry'] - 0.15 * e * np.clip(x, 0, 1)
    fill = np.maximum(fill, ext * _sig((y - level) / 0.025) * _sig((x + 0.1) / 0.1))
  if s['opacity'] > 0.02:
    r = 0.07 + 0.13 * s['opacity']
    g = np.exp(-((x - 0.15) ** 2 + (y - a['opac_y']) ** 2) / (2 * r * r))
    fill = np.maximum(fill, np.clip(1.4 * s['opacity'] * g * (0.75 + 0.5 * texture), 0, 1) * lung)
  hil = np.exp(-((x - 0.05) ** 2 + (y + 0.05) ** 2) / (2 * 0.22 ** 2))
  if s['edema'] > 0.02:
    fill = np.maximum(fill, np.clip(s['edema'] * hil * (0.8 + 0.4 * texture), 0, 1) * lung)
  dens = dens - a['lung_dark'] * lung * (1 - fill) + lung * hil * (0.05 + 0.1 * s['edema'])
  hrx = 0.22 + 0.14 * s['heart']
  heart = _sig((1 - ((x + 0.25) / hrx) ** 2 - ((y - 0.22) / 0.26) ** 2) / 0.06)
  dens = np.maximum(dens, (a['tissue'] + 0.05) * heart * body)
  spine_x = 0.55 + 0.08 * y
  vert = _sig((0.3 - np.abs((y / 0.1) - np.round(y / 0.1))) / 0.05)
  spine = _sig((0.1 - np.abs(x - spine_x)) / 0.01) * (0.6 + 0.4 * vert)
  dens = dens + 0.2 * a['bone'] * spine * body
  sternum = _sig((0.025 - np.abs(x + 0.68 + 0.05 * y)) / 0.008) * _sig((0.45 - np.abs(y + 0.1)) / 0.03)
  dens = dens + 0.15 * a['bone'] * sternum
  arms = _sig((0.12 - np.abs(y + 0.75)) / 0.05) * body
  dens = dens + 0.06 * arms
  if s['devices']:
    dens = np.maximum(dens, 0.9 * _sig((0.008 - np.abs(x + 0.15 + 0.05 * y)) / 0.003) * _sig((-0.3 - y) / 0.01))
  return dens


def encode_jpeg(img: np.ndarray, quality: int = 90) -> bytes:
  """Deterministic baseline JPEG bytes of a uint8 grey image."""
  buf = io.BytesIO()
  Image.fromarray(img, mode='L').save(buf, format='JPEG', quality=quality)
  return buf.getvalue()
