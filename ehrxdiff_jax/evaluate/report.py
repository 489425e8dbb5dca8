"""The paper's evaluation tables from classifier outputs, as markdown + JSON + a PNG figure.

Pure functions on numpy arrays (no networks, no files) compute the results:
  evaluate_findings     Table 2 (Chest ImaGenome, 10 findings) / Table 3 (CheXpert 4): per-label and
                        weighted-macro AUROC in All / Same / Diff for each row (GT, Previous image,
                        Previous label, baselines, models with one score array per seed)
  evaluate_demographics Table 6: age Pearson r, sex AUROC, race macro one-vs-rest AUROC per row
  evaluate_fid          FID of each row's features against the real targets' features
  evaluate_image_quality SSIM / PSNR / LPIPS (hook) of each row's images against the targets (an empty
                        LPIPS column shows the reason given as results['meta']['LPIPS'])
  evaluate_generated    all of the above into one `results` dict
`build_tables(results)` renders the markdown tables; `write_report(out_dir, results, images)` writes
report.md, metrics.json and figure.png.

Arrays: scores / labels [N, L] (labels 1 / 0 / NaN); a model row may carry seeds as [S, N, L] (or a list),
reported as mean +- std over seeds.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from ehrxdiff_jax.evaluate import metrics as M

REFERENCE_ROWS = ("GT", "Previous image", "Previous label")
FIGURE_NAME = "figure.png"
OUTPUT_FILES = ("report.md", "metrics.json", FIGURE_NAME)


def _seeds(x, trailing_ndim: int) -> np.ndarray:
  """Stacks a row's values into [S, ...] with `trailing_ndim` dims per seed."""
  if isinstance(x, (list, tuple)):
    x = np.stack([np.asarray(v, np.float64) for v in x])
  x = np.asarray(x, np.float64)
  if x.ndim == trailing_ndim:
    x = x[None]
  if x.ndim != trailing_ndim + 1:
    raise ValueError(f"expected {trailing_ndim} dims (or seeds + {trailing_ndim}), got shape {x.shape}")
  return x


def _summary(values) -> dict:
  values = np.asarray(values, np.float64).ravel()
  mean, std = M.mean_std(values)
  return {"mean": float(mean), "std": float(std), "per_seed": [float(v) for v in values], "n_seeds": int(values.size)}


# -------------------------------------------------------------------------------- findings
def reference_rows(gt_scores=None, prev_image_scores=None, prev_labels=None, prev_nan_as: float = 0.0) -> dict:
  """The reference rows of Tables 2 / 3: the classifier on the real target (GT) and on I_prev (Previous
  image), and the previous labels used as the prediction (NaN -> `prev_nan_as`, as the reference)."""
  rows = {}
  if gt_scores is not None:
    rows["GT"] = np.asarray(gt_scores, np.float64)
  if prev_image_scores is not None:
    rows["Previous image"] = np.asarray(prev_image_scores, np.float64)
  if prev_labels is not None:
    p = np.asarray(prev_labels, np.float64)
    rows["Previous label"] = np.where(np.isnan(p), prev_nan_as, p)
  return rows


def evaluate_findings(target_labels, prev_labels, rows: Mapping[str, Any], label_names: Sequence[str], *,
                      weighting: str = "positives", prev_nan_as: float | None = 0.0) -> dict:
  """Per-label AUROC and macro / weighted-macro averages in All / Same / Diff for every row.

  rows: {name: scores [N, L] or [S, N, L] / list of [N, L] (seeds)}. Returns a JSON-ready dict
  {'label_names', 'weighting', 'prev_nan_as', 'rows': {name: {group: {'auroc': {label: mean},
  'auroc_std': {...}, 'n_samples': {...}, 'n_pos': {...}, 'macro', 'macro_std', 'weighted_macro',
  'weighted_macro_std', 'n_seeds'}}}}.
  """
  target = np.asarray(target_labels, np.float64)
  if target.ndim != 2 or target.shape[1] != len(label_names):
    raise ValueError(f"target labels {target.shape} do not match {len(label_names)} label names")
  out = {"label_names": list(label_names), "weighting": weighting, "prev_nan_as": prev_nan_as, "rows": {}}
  for name, scores in rows.items():
    s = _seeds(scores, 2)
    if s.shape[1:] != target.shape:
      raise ValueError(f"row {name!r}: scores {s.shape[1:]} vs labels {target.shape}")
    r = M.seeded_grouped_auroc(s, target, prev_labels, weighting=weighting, prev_nan_as=prev_nan_as)
    row = {}
    for g in M.GROUPS:
      res = r[g]
      row[g] = {
          "auroc": dict(zip(label_names, map(float, res["auroc"]))),
          "auroc_std": dict(zip(label_names, map(float, res["auroc_std"]))),
          "n_samples": dict(zip(label_names, map(int, res["n_samples"]))),
          "n_pos": dict(zip(label_names, map(int, res["n_pos"]))),
          "macro": float(res["macro"]), "macro_std": float(res["macro_std"]),
          "weighted_macro": float(res["weighted_macro"]), "weighted_macro_std": float(res["weighted_macro_std"]),
          "n_seeds": int(res["n_seeds"]),
      }
    out["rows"][name] = row
  return out


def chexpert_scores_from_xrv(outputs, targets: Sequence[str] | None = None, *, softmax_over_outputs: bool = True):
  """XRV DenseNet outputs [..., 18] -> the paper's CheXpert-4 scores [..., 4] (Cardiomegaly,
  Consolidation, Edema, Pleural Effusion).

  softmax_over_outputs: the reference script applies a softmax across all 18 outputs of a sample before
  picking columns (its per-label AUROCs therefore depend on the other outputs); True reproduces that,
  False scores the outputs directly.
  """
  from ehrxdiff_jax.evaluate.densenet import XRV_PATHOLOGIES, chexpert4_indices
  x = np.asarray(outputs, np.float64)
  if softmax_over_outputs:
    x = np.exp(x - x.max(axis=-1, keepdims=True))
    x = x / x.sum(axis=-1, keepdims=True)
  return x[..., chexpert4_indices(targets or XRV_PATHOLOGIES)]


# ---------------------------------------------------------------------------- demographics
def evaluate_demographics(*, age_true=None, age_preds: Mapping[str, Any] | None = None,
                          sex_true=None, sex_scores: Mapping[str, Any] | None = None,
                          race_true=None, race_probs: Mapping[str, Any] | None = None,
                          race_ignore: int | None = -1) -> dict:
  """Table 6 per row: age Pearson r, sex AUROC, race macro one-vs-rest AUROC (race `race_ignore`, the
  reference's 'other' = -1, dropped). Each row may carry seeds ([S, N] / [S, N, C]).
  Returns {'rows': {name: {'age_r': summary, 'sex_auroc': summary, 'race_auroc': summary}}} where a
  summary is {'mean', 'std', 'per_seed', 'n_seeds'}."""
  rows: dict[str, dict] = {}
  if age_preds:
    for name, p in age_preds.items():
      rows.setdefault(name, {})["age_r"] = _summary([M.pearson_r(s, age_true) for s in _seeds(p, 1)])
  if sex_scores:
    for name, p in sex_scores.items():
      rows.setdefault(name, {})["sex_auroc"] = _summary([M.sex_auroc(sex_true, s) for s in _seeds(p, 1)])
  if race_probs:
    for name, p in race_probs.items():
      rows.setdefault(name, {})["race_auroc"] = _summary(
          [M.ovr_macro_auroc(race_true, s, ignore=race_ignore) for s in _seeds(p, 2)])
  return {"rows": rows}


# ----------------------------------------------------------------------------- image quality
def evaluate_fid(real_features, generated: Mapping[str, Any]) -> dict:
  """FID of each row's features ([N, D] or [S, N, D]) against the real targets' features [M, D]."""
  mu_r, sig_r = M.feature_statistics(real_features)
  out = {}
  for name, feats in generated.items():
    vals = [M.frechet_distance(*M.feature_statistics(f), mu_r, sig_r) for f in _seeds(feats, 2)]
    out[name] = _summary(vals)
  return out


def evaluate_image_quality(target_images, predictions: Mapping[str, Any], *, data_range: float = 2.0,
                           lpips_fn: M.LpipsFn | None = None) -> dict:
  """SSIM / PSNR (/ LPIPS via `lpips_fn`) of each row's images ([N, H, W, C] or [S, N, H, W, C], in
  [-1, 1]) against the targets [N, H, W, C]."""
  target = np.asarray(target_images, np.float64)
  out = {}
  for name, imgs in predictions.items():
    imgs = np.asarray(imgs, np.float64)
    per_seed = imgs[None] if imgs.ndim == target.ndim else imgs
    q = [M.image_quality(p, target, data_range=data_range, lpips_fn=lpips_fn) for p in per_seed]
    out[name] = {k: (_summary([x[k] for x in q]) if q[0][k] is not None else None) for k in ("ssim", "psnr", "lpips")}
  return out


def evaluate_generated(*, imagenome: Mapping[str, Any] | None = None, chexpert: Mapping[str, Any] | None = None,
                       demographics: Mapping[str, Any] | None = None, fid: Mapping[str, Any] | None = None,
                       image_quality: Mapping[str, Any] | None = None, meta: Mapping[str, Any] | None = None) -> dict:
  """Everything into one `results` dict for `write_report`.

  imagenome / chexpert: kwargs of `evaluate_findings` plus optional `gt_scores`, `prev_image_scores`
    (turned into the reference rows by `reference_rows`, placed first) and `rows` (baselines, models).
  demographics: kwargs of `evaluate_demographics`. fid: {'real_features', 'generated'}.
  image_quality: kwargs of `evaluate_image_quality`. meta: free-form (config, paths, seeds).
  """
  results: dict[str, Any] = {"meta": dict(meta or {})}
  for key, spec in (("chest_imagenome", imagenome), ("chexpert", chexpert)):
    if spec is None:
      continue
    spec = dict(spec)
    prev_nan_as = spec.get("prev_nan_as", 0.0)
    rows = reference_rows(spec.pop("gt_scores", None), spec.pop("prev_image_scores", None),
                          spec["prev_labels"], prev_nan_as if prev_nan_as is not None else 0.0)
    rows.update(spec.pop("rows", {}) or {})
    results[key] = evaluate_findings(spec.pop("target_labels"), spec.pop("prev_labels"), rows,
                                     spec.pop("label_names"), **spec)
  if demographics is not None:
    results["demographics"] = evaluate_demographics(**demographics)
  if fid is not None:
    results["fid"] = evaluate_fid(fid["real_features"], fid["generated"])
  if image_quality is not None:
    results["image_quality"] = evaluate_image_quality(**image_quality)
  return results


# ---------------------------------------------------------------------------------- tables
def _fmt(mean, std=None, n_seeds: int = 1, digits: int = 3) -> str:
  if mean is None or (isinstance(mean, float) and math.isnan(mean)):
    return "–"
  s = f"{mean:.{digits}f}"
  if n_seeds > 1 and std is not None and not math.isnan(std):
    s += f" ± {std:.{digits}f}"
  return s


def _md(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def findings_tables(section: Mapping[str, Any], title: str) -> str:
  """Markdown: weighted-macro (and macro) AUROC in All / Same / Diff per row, then per-label AUROC
  tables for each group with the label support."""
  names = section["label_names"]
  parts = [f"### {title}: weighted macro AUROC (weights: {section['weighting']})"]
  rows = []
  for row, r in section["rows"].items():
    rows.append([row] + [_fmt(r[g]["weighted_macro"], r[g]["weighted_macro_std"], r[g]["n_seeds"]) for g in M.GROUPS]
                + [_fmt(r[g]["macro"], r[g]["macro_std"], r[g]["n_seeds"]) for g in M.GROUPS])
  parts.append(_md(["Method", "All", "Same", "Diff", "All (macro)", "Same (macro)", "Diff (macro)"], rows))
  for g in M.GROUPS:
    parts.append(f"\n#### {title}: per-label AUROC, {g.capitalize()}")
    first = next(iter(section["rows"].values()), None)
    rows = []
    for row, r in section["rows"].items():
      rows.append([row] + [_fmt(r[g]["auroc"][n], r[g]["auroc_std"][n], r[g]["n_seeds"]) for n in names])
    if first is not None:
      rows.append(["support (n / pos)"] + [f"{first[g]['n_samples'][n]} / {first[g]['n_pos'][n]}" for n in names])
    parts.append(_md(["Method"] + list(names), rows))
  return "\n".join(parts)


def demographics_table(section: Mapping[str, Any]) -> str:
  cols = (("age_r", "Age (Pearson r)"), ("sex_auroc", "Sex (AUROC)"), ("race_auroc", "Race (macro OvR AUROC)"))
  rows = []
  for name, r in section["rows"].items():
    rows.append([name] + [_fmt(r[k]["mean"], r[k]["std"], r[k]["n_seeds"]) if k in r else "–" for k, _ in cols])
  return "### Table 6: demographics\n" + _md(["Method"] + [c for _, c in cols], rows)


def quality_table(results: Mapping[str, Any]) -> str:
  fid = results.get("fid", {}) or {}
  iq = results.get("image_quality", {}) or {}
  rows = []
  for name in list(dict.fromkeys(list(fid) + list(iq))):
    cells = [name, _fmt(fid[name]["mean"], fid[name]["std"], fid[name]["n_seeds"], 2) if name in fid else "–"]
    for k, d in (("ssim", 3), ("psnr", 2), ("lpips", 3)):
      v = (iq.get(name) or {}).get(k)
      cells.append(_fmt(v["mean"], v["std"], v["n_seeds"], d) if v else "–")
    rows.append(cells)
  text = "### Image quality (FID on XRV DenseNet-121 features vs the real targets)\n" + _md(
      ["Method", "FID", "SSIM", "PSNR (dB)", "LPIPS"], rows)
  why = (results.get("meta") or {}).get("LPIPS")
  if why and not any((v or {}).get("lpips") for v in iq.values()):  # an empty column says why
    text += f"\n\nLPIPS: {why}"
  return text


def build_tables(results: Mapping[str, Any]) -> dict[str, str]:
  """Markdown tables: 'table2' (Chest ImaGenome), 'table3' (CheXpert 4), 'table6' (demographics),
  'quality' (FID, SSIM, PSNR, LPIPS); only those whose results are present."""
  tables = {}
  if "chest_imagenome" in results:
    tables["table2"] = findings_tables(results["chest_imagenome"], "Table 2: Chest ImaGenome")
  if "chexpert" in results:
    tables["table3"] = findings_tables(results["chexpert"], "Table 3: CheXpert")
  if "demographics" in results:
    tables["table6"] = demographics_table(results["demographics"])
  if results.get("fid") or results.get("image_quality"):
    tables["quality"] = quality_table(results)
  return tables


def render_markdown(results: Mapping[str, Any], figure: str | None = None) -> str:
  meta = results.get("meta", {}) or {}
  lines = ["# EHRXDiff-JAX evaluation report", ""]
  for k, v in meta.items():
    lines.append(f"- {k}: {v}")
  lines += ["", "AUROC groups: All = every known target label; Same = target label equals the previous "
            "label; Diff = it differs (unknown previous labels count as 0, as the reference). A label is "
            "scored only where both classes occur. Values are mean ± std over sampling seeds where a row has "
            "several.", ""]
  if figure:
    lines += [f"![previous | predicted | target]({figure})", ""]
  for t in build_tables(results).values():
    lines += [t, ""]
  return "\n".join(lines)


def to_jsonable(x):
  """numpy -> python; NaN / inf -> None (strict JSON)."""
  if isinstance(x, Mapping):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return to_jsonable(x.tolist())
  if isinstance(x, (np.floating, float)):
    x = float(x)
    return x if math.isfinite(x) else None
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.bool_):
    return bool(x)
  return x


# ---------------------------------------------------------------------------------- figure
def _to_uint8(img) -> np.ndarray:
  a = np.asarray(img, np.float64)
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  return np.clip(np.round((a + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _positive(labels, names) -> str:
  if labels is None:
    return ""
  pos = [n for n, v in zip(names, np.asarray(labels, np.float64)) if v == 1]
  return ", ".join(pos) if pos else "no finding"


def make_figure(images: Mapping[str, Any], path: str, max_samples: int = 4, tile: int = 256) -> str:
  """A grid: one row per sample, columns previous | predicted | target, each with its positive labels
  written below (previous / target: recorded labels; predicted: `pred_scores` >= 0.5 when given).

  images: 'prev', 'pred', 'target' [K, H, W, C] in [-1, 1] ('pred' may be [S, K, ...]: seed 0 is
  shown); optional 'label_names', 'prev_labels', 'target_labels', 'pred_scores' [K, L], 'keys' [K].
  """
  from PIL import Image, ImageDraw, ImageFont

  prev, target = np.asarray(images["prev"]), np.asarray(images["target"])
  pred = np.asarray(images["pred"])
  if pred.ndim == prev.ndim + 1:
    pred = pred[0]
  k = min(max_samples, prev.shape[0])
  names = list(images.get("label_names") or [])
  try:
    font = ImageFont.load_default(size=12)
  except TypeError:  # Pillow < 10.1
    font = ImageFont.load_default()
  text_h, pad, title_h = 58, 6, 20
  width = 3 * tile + 4 * pad
  height = title_h + k * (tile + text_h + pad) + pad
  canvas = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(canvas)
  for c, title in enumerate(("previous", "predicted", "target")):
    draw.text((pad + c * (tile + pad), 4), title, fill="black", font=font)

  def wrap(text, chars=40):
    words, lines, cur = text.split(" "), [], ""
    for w in words:
      if len(cur) + len(w) + 1 > chars and cur:
        lines.append(cur)
        cur = w
      else:
        cur = f"{cur} {w}".strip()
    return "\n".join((lines + [cur])[:4])

  for i in range(k):
    y = title_h + i * (tile + text_h + pad)
    pred_labels = None
    if images.get("pred_scores") is not None:
      ps = np.asarray(images["pred_scores"], np.float64)
      ps = ps[0] if ps.ndim == 3 else ps
      pred_labels = (ps[i] >= 0.5).astype(np.float64)
    texts = [_positive(images["prev_labels"][i], names) if images.get("prev_labels") is not None else "",
             _positive(pred_labels, names) if pred_labels is not None else "",
             _positive(images["target_labels"][i], names) if images.get("target_labels") is not None else ""]
    for c, img in enumerate((prev[i], pred[i], target[i])):
      tile_img = Image.fromarray(_to_uint8(img)).convert("RGB").resize((tile, tile), Image.BILINEAR)
      x = pad + c * (tile + pad)
      canvas.paste(tile_img, (x, y))
      draw.multiline_text((x, y + tile + 2), wrap(texts[c]), fill="black", font=font)
    if images.get("keys") is not None:
      draw.text((pad + 2, y + 2), str(images["keys"][i])[:48], fill="yellow", font=font)
  canvas.save(path)
  return path


# ----------------------------------------------------------------------------------- write
def write_report(out_dir: str | os.PathLike, results: Mapping[str, Any], images: Mapping[str, Any] | None = None,
                 overwrite: bool = False) -> dict[str, str]:
  """Writes report.md, metrics.json and (when `images` is given) figure.png into `out_dir`.

  Refuses (FileExistsError) when any of them already exists, unless overwrite=True. Returns the paths.
  """
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  existing = [f for f in OUTPUT_FILES if os.path.exists(os.path.join(out_dir, f))]
  if existing and not overwrite:
    raise FileExistsError(f"{out_dir} already holds {', '.join(existing)}; pass overwrite=True to replace")
  paths = {"report": os.path.join(out_dir, "report.md"), "metrics": os.path.join(out_dir, "metrics.json")}
  figure = None
  if images is not None:
    paths["figure"] = make_figure(images, os.path.join(out_dir, FIGURE_NAME))
    figure = FIGURE_NAME
  elif os.path.exists(os.path.join(out_dir, FIGURE_NAME)):
    os.remove(os.path.join(out_dir, FIGURE_NAME))  # overwrite: a stale figure would not match the numbers
  with open(paths["metrics"], "w") as f:
    json.dump(to_jsonable(results), f, indent=1, allow_nan=False, default=str)
  with open(paths["report"], "w") as f:
    f.write(render_markdown(results, figure))
  return paths
