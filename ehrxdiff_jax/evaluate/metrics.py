"""Evaluation metrics of the paper, in numpy/scipy (no sklearn, no torch, no jax).

Diagnosis (Tables 2 and 3): per-label AUROC of a classifier's scores against the target labels, in the
groups All / Same (target label == previous label) / Diff, with macro and weighted-macro averages, and
the mean and standard deviation over sampling seeds.
Demographics (Table 6): Pearson r (age), AUROC (sex), macro one-vs-rest AUROC (race).
Image quality: Frechet distance between feature statistics (FID), SSIM, PSNR; LPIPS through a hook
(`lpips_fn`) because it needs a network.

Conventions
- Labels are float arrays, 1 / 0, NaN where unknown. A NaN target label excludes that (sample, label)
  pair. A label is scored in a group only where both classes occur in it; otherwise its AUROC is NaN
  and it is left out of the averages (the reference ImaGenome script does the same).
- `weighting='positives'` (default) weights a label's AUROC by its support, the number of positives in
  the group (the brief's "weights = label support", sklearn's `average='weighted'`).
  `weighting='samples'` weights by the number of scored samples of that label instead, which is what
  the reference script behind the paper's tables computes (`weighted_macro_auc_attr`, weights =
  num_sample): use it to reproduce the paper's numbers exactly (`ehrxdiff evaluate --weighting samples`).
- Previous labels that are NaN count as 0 for the Same/Diff split and for the "Previous label" row
  (the reference applies nan_to_num(0) to them); `prev_nan_as=None` instead drops such pairs from Same
  and Diff.
"""
from __future__ import annotations

import warnings
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import linalg, ndimage, stats

GROUPS = ("all", "same", "diff")
WEIGHTINGS = ("samples", "positives")


# ------------------------------------------------------------------------------------------ AUROC
def roc_auc(y_true, y_score) -> float:
  """Binary AUROC by the rank-sum (Mann-Whitney U) identity; ties count 1/2 (as sklearn).

  NaN labels are dropped. Returns NaN when fewer than two classes remain.
  """
  y = np.asarray(y_true, np.float64).ravel()
  s = np.asarray(y_score, np.float64).ravel()
  if y.shape != s.shape:
    raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
  keep = ~np.isnan(y)
  y, s = y[keep], s[keep]
  if np.any((y != 0) & (y != 1)):
    raise ValueError("binary AUROC needs labels in {0, 1} (or NaN)")
  n_pos = int(np.sum(y == 1))
  n_neg = y.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  ranks = stats.rankdata(s, method="average")
  u = np.sum(ranks[y == 1]) - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def ovr_macro_auroc(labels, probs, classes: Sequence[int] | None = None, ignore: int | None = -1) -> float:
  """Macro one-vs-rest AUROC of a multi-class prediction (race): mean over classes c of
  AUROC(labels == c, probs[:, c]). Samples whose label equals `ignore` are dropped (the reference drops
  race -1, 'other'). `classes` defaults to range(probs.shape[1]); a class without both outcomes is NaN
  and left out of the mean."""
  labels = np.asarray(labels).ravel()
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
    raise ValueError(f"probs must be [N, C] with N = {labels.shape[0]}, got {probs.shape}")
  if ignore is not None:
    keep = labels != ignore
    labels, probs = labels[keep], probs[keep]
  classes = list(range(probs.shape[1])) if classes is None else list(classes)
  aucs = [roc_auc((labels == c).astype(np.float64), probs[:, i]) for i, c in enumerate(classes)]
  return _nanmean(aucs)


def _nanmean(values) -> float:
  values = np.asarray(values, np.float64)
  values = values[~np.isnan(values)]
  return float(np.mean(values)) if values.size else float("nan")


def weighted_mean(values, weights) -> float:
  """Weighted mean over entries whose value is not NaN (NaN if none or all weights are 0)."""
  values = np.asarray(values, np.float64)
  weights = np.asarray(weights, np.float64)
  keep = ~np.isnan(values)
  if not np.any(keep) or np.sum(weights[keep]) <= 0:
    return float("nan")
  return float(np.sum(values[keep] * weights[keep]) / np.sum(weights[keep]))


def per_label_auroc(labels, scores, mask=None) -> dict:
  """AUROC of each column of `scores` [N, L] against `labels` [N, L] over the pairs where `mask`
  [N, L] (default: all) is True and the label is not NaN.

  Returns {'auroc': [L] (NaN where not scorable), 'n_samples': [L], 'n_pos': [L]}.
  """
  labels = np.asarray(labels, np.float64)
  scores = np.asarray(scores, np.float64)
  if labels.ndim != 2 or labels.shape != scores.shape:
    raise ValueError(f"labels {labels.shape} and scores {scores.shape} must both be [N, L]")
  valid = ~np.isnan(labels)
  if mask is not None:
    valid &= np.asarray(mask, bool)
  aucs, n, n_pos = [], [], []
  for j in range(labels.shape[1]):
    y, s = labels[valid[:, j], j], scores[valid[:, j], j]
    aucs.append(roc_auc(y, s))
    n.append(int(y.size))
    n_pos.append(int(np.sum(y == 1)))
  return {"auroc": np.asarray(aucs), "n_samples": np.asarray(n), "n_pos": np.asarray(n_pos)}


def macro_averages(result: Mapping[str, np.ndarray], weighting: str = "positives") -> tuple[float, float]:
  """(macro, weighted macro) of a `per_label_auroc` result; labels with NaN AUROC are left out."""
  if weighting not in WEIGHTINGS:
    raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
  weights = result["n_samples"] if weighting == "samples" else result["n_pos"]
  return _nanmean(result["auroc"]), weighted_mean(result["auroc"], weights)


# --------------------------------------------------------------------------------- grouping
def group_masks(target_labels, prev_labels, prev_nan_as: float | None = 0.0) -> dict[str, np.ndarray]:
  """[N, L] bool masks of the groups: 'all' (target known), 'same' (target == previous), 'diff'.

  `prev_nan_as`: value an unknown previous label takes (reference: 0); None drops those pairs from
  'same' and 'diff' (they stay in 'all').
  """
  target = np.asarray(target_labels, np.float64)
  prev = np.asarray(prev_labels, np.float64)
  if target.shape != prev.shape:
    raise ValueError(f"target labels {target.shape} and previous labels {prev.shape} differ in shape")
  known = ~np.isnan(target)
  if prev_nan_as is None:
    prev_known = ~np.isnan(prev)
  else:
    prev = np.where(np.isnan(prev), prev_nan_as, prev)
    prev_known = np.ones_like(known)
  same = known & prev_known & (target == prev)
  diff = known & prev_known & (target != prev)
  return {"all": known, "same": same, "diff": diff}


def grouped_auroc(scores, target_labels, prev_labels, *, weighting: str = "positives",
                  prev_nan_as: float | None = 0.0) -> dict:
  """Per-label AUROC and its averages in the groups All / Same / Diff for one set of scores [N, L].

  Returns {group: {'auroc': [L], 'n_samples': [L], 'n_pos': [L], 'macro': float, 'weighted_macro': float}}.
  """
  masks = group_masks(target_labels, prev_labels, prev_nan_as)
  out = {}
  for g in GROUPS:
    r = per_label_auroc(target_labels, scores, masks[g])
    r["macro"], r["weighted_macro"] = macro_averages(r, weighting)
    out[g] = r
  return out


def mean_std(values) -> tuple[np.ndarray, np.ndarray]:
  """Mean and population standard deviation (ddof 0) over seeds (axis 0), ignoring NaN entries; one
  seed gives std 0, all-NaN gives NaN."""
  values = np.asarray(values, np.float64)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return np.nanmean(values, axis=0), np.nanstd(values, axis=0)


def seeded_grouped_auroc(scores, target_labels, prev_labels, *, weighting: str = "positives",
                         prev_nan_as: float | None = 0.0) -> dict:
  """`grouped_auroc` over seeds: `scores` is [N, L] (one run) or [S, N, L] (S sampling seeds).

  Returns {group: {'auroc', 'auroc_std' [L], 'macro', 'macro_std', 'weighted_macro',
  'weighted_macro_std', 'n_samples', 'n_pos' [L], 'n_seeds'}}; means and std are over seeds.
  """
  scores = np.asarray(scores, np.float64)
  if scores.ndim == 2:
    scores = scores[None]
  if scores.ndim != 3:
    raise ValueError(f"scores must be [N, L] or [S, N, L], got {scores.shape}")
  runs = [grouped_auroc(s, target_labels, prev_labels, weighting=weighting, prev_nan_as=prev_nan_as)
          for s in scores]
  out = {}
  for g in GROUPS:
    res = {"n_samples": runs[0][g]["n_samples"], "n_pos": runs[0][g]["n_pos"], "n_seeds": len(runs)}
    for key in ("auroc", "macro", "weighted_macro"):
      m, s = mean_std([r[g][key] for r in runs])
      res[key], res[key + "_std"] = m, s
    out[g] = res
  return out


# ------------------------------------------------------------------------------- demographics
def pearson_r(x, y) -> float:
  """Pearson correlation coefficient (age: predicted vs recorded); NaN pairs are dropped."""
  x = np.asarray(x, np.float64).ravel()
  y = np.asarray(y, np.float64).ravel()
  keep = ~(np.isnan(x) | np.isnan(y))
  x, y = x[keep] - np.mean(x[keep]), y[keep] - np.mean(y[keep])
  denom = np.sqrt(np.sum(x * x) * np.sum(y * y))
  return float(np.sum(x * y) / denom) if denom > 0 else float("nan")


def sex_auroc(sex_true, score) -> float:
  """AUROC of a sex classifier's score (probability of the class coded 1) against the recorded sex."""
  return roc_auc(sex_true, score)


# ----------------------------------------------------------------------------------------- FID
def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and covariance [D, D] (N-1 normalisation, as np.cov) of features [N, D], in float64."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"features must be [N >= 2, D], got {f.shape}")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((matrix + matrix.T) / 2.0)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1, sigma2) -> float:
  """tr(sqrt(sigma1 sigma2)) for symmetric PSD sigma1, sigma2, computed stably as
  sum(sqrt(eig(sqrt(sigma1) sigma2 sqrt(sigma1)))): that product is symmetric PSD and has the same
  eigenvalues as sigma1 sigma2, so no complex square root or eps-jitter is needed."""
  s1 = _sqrt_psd(np.asarray(sigma1, np.float64))
  m = s1 @ np.asarray(sigma2, np.float64) @ s1
  w = np.linalg.eigvalsh((m + m.T) / 2.0)
  return float(np.sum(np.sqrt(np.clip(w, 0.0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2))."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError("mean vectors / covariances of the two sets differ in shape")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


def fid(features_a, features_b) -> float:
  """FID between two feature sets [N, D] (e.g. 1024-d XRV DenseNet features of generated and real)."""
  return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


def fid_scipy_reference(features_a, features_b) -> float:
  """The common pytorch-fid computation (scipy.linalg.sqrtm of sigma1 sigma2), for cross-checks."""
  mu1, s1 = feature_statistics(features_a)
  mu2, s2 = feature_statistics(features_b)
  covmean = linalg.sqrtm(s1 @ s2)
  covmean = np.real(covmean)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


# ---------------------------------------------------------------------------- image quality
def _as_images(x) -> np.ndarray:
  """[H, W], [H, W, C], [B, H, W] or [B, H, W, C] -> [B, H, W, C] float64."""
  x = np.asarray(x, np.float64)
  if x.ndim == 2:
    x = x[None, ..., None]
  elif x.ndim == 3:
    x = x[..., None] if x.shape[-1] not in (1, 3, 4) else x[None]
  if x.ndim != 4:
    raise ValueError(f"expected images [B, H, W(, C)], got shape {x.shape}")
  return x


def ssim(pred, target, *, data_range: float = 2.0, sigma: float = 1.5, win_size: int = 11,
         k1: float = 0.01, k2: float = 0.03, per_image: bool = False):
  """Structural similarity (Wang et al. 2004): gaussian window 11x11, sigma 1.5, population covariances.

  Same as skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=data_range, channel_axis=-1): filters with 'reflect' borders,
  the mean is taken over the map with (win_size-1)/2 pixels cropped at each border, channels averaged.
  Images are [B, H, W, C] (or [H, W(, C)]); default data_range 2 is for images in [-1, 1].
  Returns the mean over images, or the [B] values when per_image.
  """
  a, b = _as_images(pred), _as_images(target)
  if a.shape != b.shape:
    raise ValueError(f"prediction {a.shape} and target {b.shape} differ in shape")
  truncate = ((win_size - 1) // 2) / sigma  # so that the gaussian's radius is (win_size-1)//2
  filt = lambda x: ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), truncate=truncate, mode="reflect")
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  mu_a, mu_b = filt(a), filt(b)
  var_a = filt(a * a) - mu_a * mu_a
  var_b = filt(b * b) - mu_b * mu_b
  cov = filt(a * b) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
  pad = (win_size - 1) // 2
  values = s[:, pad:s.shape[1] - pad, pad:s.shape[2] - pad, :].mean(axis=(1, 2, 3))
  return values if per_image else float(np.mean(values))


def psnr(pred, target, *, data_range: float = 2.0, per_image: bool = False):
  """Peak signal-to-noise ratio 10 log10(data_range^2 / MSE) per image; mean over images (or [B])."""
  a, b = _as_images(pred), _as_images(target)
  if a.shape != b.shape:
    raise ValueError(f"prediction {a.shape} and target {b.shape} differ in shape")
  mse = np.mean((a - b) ** 2, axis=(1, 2, 3))
  with np.errstate(divide="ignore"):
    values = 10.0 * np.log10(data_range ** 2 / mse)
  return values if per_image else float(np.mean(values))


LpipsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""LPIPS hook: f(pred [B, H, W, 3] in [-1, 1], target [B, H, W, 3] in [-1, 1]) -> [B] distances."""


def image_quality(pred, target, *, data_range: float = 2.0, lpips_fn: LpipsFn | None = None,
                  batch_size: int = 64) -> dict:
  """Mean SSIM / PSNR (and LPIPS when `lpips_fn` is given, else None) of predictions vs targets."""
  a, b = _as_images(pred), _as_images(target)
  ss, ps, lp = [], [], []
  for i in range(0, a.shape[0], batch_size):
    ss.append(ssim(a[i:i + batch_size], b[i:i + batch_size], data_range=data_range, per_image=True))
    ps.append(psnr(a[i:i + batch_size], b[i:i + batch_size], data_range=data_range, per_image=True))
    if lpips_fn is not None:
      lp.append(np.asarray(lpips_fn(a[i:i + batch_size], b[i:i + batch_size]), np.float64).ravel())
  out = {"ssim": float(np.mean(np.concatenate(ss))), "psnr": float(np.mean(np.concatenate(ps))),
         "lpips": float(np.mean(np.concatenate(lp))) if lp else None, "n": int(a.shape[0])}
  return out
