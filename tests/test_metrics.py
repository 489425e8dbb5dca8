"""Metrics against sklearn / scipy (/ skimage when installed) on random inputs, grouping on handmade cases."""
import numpy as np
import pytest
from scipy import linalg, signal, stats
from sklearn.metrics import roc_auc_score

from ehrxdiff_jax.evaluate import metrics as M


def test_roc_auc_matches_sklearn_with_ties():
  rng = np.random.default_rng(0)
  for trial in range(20):
    n = int(rng.integers(5, 300))
    y = (rng.random(n) < rng.uniform(0.1, 0.9)).astype(float)
    y[:2] = [0, 1]
    # quantised scores force many ties
    s = np.round(rng.normal(size=n) + y * rng.uniform(0, 2), int(rng.integers(0, 3)))
    assert M.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_roc_auc_nan_labels_and_single_class():
  y = np.array([0, 1, np.nan, 1, 0])
  s = np.array([0.1, 0.9, 0.5, 0.3, 0.4])
  keep = ~np.isnan(y)
  assert M.roc_auc(y, s) == pytest.approx(roc_auc_score(y[keep], s[keep]))
  assert np.isnan(M.roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
  assert np.isnan(M.roc_auc([np.nan, 0, 0], [0.1, 0.2, 0.3]))


def test_macro_and_weighted_averages_match_sklearn():
  rng = np.random.default_rng(1)
  n, l = 200, 6
  y = (rng.random((n, l)) < rng.uniform(0.05, 0.6, size=l)).astype(float)
  s = rng.normal(size=(n, l)) + y
  r = M.per_label_auroc(y, s)
  np.testing.assert_allclose(r["auroc"], roc_auc_score(y, s, average=None), atol=1e-12)
  macro, weighted_pos = M.macro_averages(r, "positives")
  assert macro == pytest.approx(roc_auc_score(y, s, average="macro"), abs=1e-12)
  # sklearn's average='weighted' weights by the positives of each label
  assert weighted_pos == pytest.approx(roc_auc_score(y, s, average="weighted"), abs=1e-12)
  # the reference's weighted macro weights by the number of scored samples of each label
  y_nan = y.copy()
  y_nan[rng.random((n, l)) < 0.3] = np.nan
  r = M.per_label_auroc(y_nan, s)
  _, weighted_samples = M.macro_averages(r, "samples")
  per, counts = [], []
  for j in range(l):
    k = ~np.isnan(y_nan[:, j])
    per.append(roc_auc_score(y_nan[k, j], s[k, j]))
    counts.append(k.sum())
  assert weighted_samples == pytest.approx(np.average(per, weights=counts), abs=1e-12)
  np.testing.assert_array_equal(r["n_samples"], counts)


def test_unscorable_label_is_left_out_of_averages():
  y = np.array([[0, 1], [1, 1], [0, 1], [1, 1]], float)  # label 1 has only positives
  s = np.array([[0.1, 0.2], [0.9, 0.3], [0.2, 0.1], [0.8, 0.7]])
  r = M.per_label_auroc(y, s)
  assert r["auroc"][0] == 1.0 and np.isnan(r["auroc"][1])
  assert M.macro_averages(r, "samples") == (1.0, 1.0)


def test_group_masks_handmade():
  target = np.array([[1, 0], [1, 1], [0, np.nan], [0, 1], [1, 0]], float)
  prev = np.array([[1, 0], [0, 1], [0, 1], [np.nan, np.nan], [np.nan, 1]], float)
  m = M.group_masks(target, prev)  # previous NaN counts as 0 (reference)
  np.testing.assert_array_equal(m["all"], [[1, 1], [1, 1], [1, 0], [1, 1], [1, 1]])
  np.testing.assert_array_equal(m["same"], [[1, 1], [0, 1], [1, 0], [1, 0], [0, 0]])
  np.testing.assert_array_equal(m["diff"], [[0, 0], [1, 0], [0, 0], [0, 1], [1, 1]])
  m = M.group_masks(target, prev, prev_nan_as=None)  # unknown previous: neither same nor diff
  np.testing.assert_array_equal(m["same"], [[1, 1], [0, 1], [1, 0], [0, 0], [0, 0]])
  np.testing.assert_array_equal(m["diff"], [[0, 0], [1, 0], [0, 0], [0, 0], [0, 1]])


def test_grouped_auroc_handmade_values():
  # one label; samples 0-3 keep their label (same), 4-7 change (diff)
  target = np.array([0, 1, 0, 1, 1, 0, 1, 0], float)[:, None]
  prev = np.array([0, 1, 0, 1, 0, 1, 0, 1], float)[:, None]
  score = np.array([0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.35, 0.6])[:, None]  # perfect on same, inverted on diff
  g = M.grouped_auroc(score, target, prev)
  assert g["same"]["auroc"][0] == 1.0
  assert g["diff"]["auroc"][0] == 0.0
  assert g["all"]["auroc"][0] == pytest.approx(roc_auc_score(target[:, 0], score[:, 0]))
  assert list(g["same"]["n_samples"]) == [4] and list(g["diff"]["n_pos"]) == [2]
  # the previous label used as the prediction: perfect on same, 0 on diff
  g = M.grouped_auroc(prev, target, prev)
  assert (g["same"]["weighted_macro"], g["diff"]["weighted_macro"]) == (1.0, 0.0)


def test_seeded_mean_std():
  rng = np.random.default_rng(2)
  y = (rng.random((50, 3)) < 0.4).astype(float)
  prev = (rng.random((50, 3)) < 0.4).astype(float)
  seeds = rng.normal(size=(4, 50, 3)) + y
  out = M.seeded_grouped_auroc(seeds, y, prev)
  runs = [M.grouped_auroc(s, y, prev) for s in seeds]
  for g in M.GROUPS:
    w = [r[g]["weighted_macro"] for r in runs]
    assert out[g]["weighted_macro"] == pytest.approx(np.mean(w))
    assert out[g]["weighted_macro_std"] == pytest.approx(np.std(w))
    np.testing.assert_allclose(out[g]["auroc"], np.mean([r[g]["auroc"] for r in runs], axis=0))
    assert out[g]["n_seeds"] == 4
  one = M.seeded_grouped_auroc(seeds[0], y, prev)
  assert one["all"]["macro_std"] == 0.0


def test_demographics_match_scipy_sklearn():
  rng = np.random.default_rng(3)
  age = rng.uniform(20, 90, 100)
  pred = age + rng.normal(0, 15, 100)
  assert M.pearson_r(pred, age) == pytest.approx(stats.pearsonr(pred, age)[0], abs=1e-12)
  sex = (rng.random(100) < 0.5).astype(float)
  p = rng.random(100) + 0.3 * sex
  assert M.sex_auroc(sex, p) == pytest.approx(roc_auc_score(sex, p))
  race = rng.integers(-1, 3, 300)
  logits = rng.normal(size=(300, 3)) + np.eye(3)[np.clip(race, 0, 2)]
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  k = race != -1
  ref = roc_auc_score(race[k], probs[k], average="macro", multi_class="ovr", labels=[0, 1, 2])
  assert M.ovr_macro_auroc(race, probs) == pytest.approx(ref, abs=1e-12)


def test_fid_matches_scipy_sqrtm():
  rng = np.random.default_rng(4)
  d = 16
  a = rng.normal(size=(200, d)) @ rng.normal(size=(d, d)) * 0.3
  b = rng.normal(size=(150, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.5
  ours = M.fid(a, b)
  mu1, s1 = np.mean(a, 0), np.cov(a, rowvar=False)
  mu2, s2 = np.mean(b, 0), np.cov(b, rowvar=False)
  ref = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(np.real(linalg.sqrtm(s1 @ s2))))
  assert ours == pytest.approx(ref, rel=1e-8)
  assert M.fid(a, a) == pytest.approx(0.0, abs=1e-8)
  # rank-deficient covariances (fewer samples than dims) stay finite and non-negative
  assert np.isfinite(M.fid(a[:8], b[:8])) and M.fid(a[:8], b[:8]) > 0


def _gauss_window(size=11, sigma=1.5):
  x = np.arange(size) - (size - 1) / 2
  g = np.exp(-x ** 2 / (2 * sigma ** 2))
  g /= g.sum()
  return np.outer(g, g)


def _ssim_direct(a, b, data_range):
  """SSIM from the definition with an explicit 11x11 window convolution (symmetric borders)."""
  w = _gauss_window()
  f = lambda x: signal.convolve2d(np.pad(x, 5, mode="symmetric"), w, mode="valid")
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  ma, mb = f(a), f(b)
  va, vb, cab = f(a * a) - ma ** 2, f(b * b) - mb ** 2, f(a * b) - ma * mb
  s = (2 * ma * mb + c1) * (2 * cab + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
  return s[5:-5, 5:-5].mean()


def test_ssim_psnr_against_direct_computation():
  rng = np.random.default_rng(5)
  a = np.clip(rng.normal(0, 0.5, (3, 40, 36, 1)), -1, 1)
  b = np.clip(a + rng.normal(0, 0.2, a.shape), -1, 1)
  ref = np.mean([_ssim_direct(a[i, ..., 0], b[i, ..., 0], 2.0) for i in range(3)])
  assert M.ssim(a, b) == pytest.approx(ref, abs=1e-10)
  assert M.ssim(a, a) == pytest.approx(1.0)
  mse = np.mean((a - b) ** 2, axis=(1, 2, 3))
  assert M.psnr(a, b) == pytest.approx(np.mean(10 * np.log10(4.0 / mse)))
  q = M.image_quality(a, b, lpips_fn=lambda x, y: np.abs(x - y).mean(axis=(1, 2, 3)))
  assert q["ssim"] == pytest.approx(ref, abs=1e-10) and q["lpips"] == pytest.approx(np.abs(a - b).mean())


def test_ssim_against_skimage():
  skm = pytest.importorskip("skimage.metrics")
  rng = np.random.default_rng(6)
  a = np.clip(rng.normal(0, 0.5, (32, 30, 3)), -1, 1)
  b = np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1)
  ref = skm.structural_similarity(a, b, data_range=2.0, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, channel_axis=-1)
  assert M.ssim(a, b) == pytest.approx(ref, abs=1e-10)
  assert M.psnr(a, b) == pytest.approx(skm.peak_signal_noise_ratio(b, a, data_range=2.0))
