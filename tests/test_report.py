"""The report on a tiny synthetic run: files exist, tables carry the expected numbers, no overwrite."""
import json
import os

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ehrxdiff_jax.evaluate import metrics as M
from ehrxdiff_jax.evaluate import report as R

NAMES = ["lung opacity", "pleural effusion", "pneumothorax"]


def _synthetic(n=60, seeds=2, seed=0):
  rng = np.random.default_rng(seed)
  prev = (rng.random((n, 3)) < 0.4).astype(float)
  flip = rng.random((n, 3)) < 0.25
  target = np.where(flip, 1 - prev, prev)
  target[rng.random((n, 3)) < 0.1] = np.nan
  prev[rng.random((n, 3)) < 0.05] = np.nan
  t0 = np.nan_to_num(target)
  gt = t0 + rng.normal(0, 0.5, (n, 3))
  prev_img = np.nan_to_num(prev) + rng.normal(0, 0.5, (n, 3))
  model = np.stack([0.5 * t0 + 0.5 * np.nan_to_num(prev) + rng.normal(0, 0.6, (n, 3)) for _ in range(seeds)])
  return prev, target, gt, prev_img, model


def _results(seed=0):
  prev, target, gt, prev_img, model = _synthetic(seed=seed)
  rng = np.random.default_rng(seed + 1)
  n = target.shape[0]
  age = rng.uniform(20, 90, n)
  sex = (rng.random(n) < 0.5).astype(float)
  race = rng.integers(-1, 3, n)
  race_p = rng.dirichlet(np.ones(3), size=n)
  real_f = rng.normal(size=(40, 4))
  imgs = np.clip(rng.normal(0, 0.4, (2, 4, 32, 32, 3)), -1, 1)
  tgt_imgs = np.clip(imgs[0] + rng.normal(0, 0.1, imgs.shape[1:]), -1, 1)
  results = R.evaluate_generated(
      imagenome=dict(target_labels=target, prev_labels=prev, label_names=NAMES, gt_scores=gt,
                     prev_image_scores=prev_img, rows={"EHRXDiff": model}),
      chexpert=dict(target_labels=target, prev_labels=prev, label_names=NAMES, gt_scores=gt,
                    rows={"EHRXDiff": model[0]}),
      demographics=dict(age_true=age, age_preds={"GT": age + rng.normal(0, 10, n),
                                                 "EHRXDiff": np.stack([age + rng.normal(0, 20, n)] * 2)},
                        sex_true=sex, sex_scores={"GT": sex + rng.normal(0, 0.5, n)},
                        race_true=race, race_probs={"GT": race_p}),
      fid=dict(real_features=real_f, generated={"EHRXDiff": np.stack([real_f + 0.5, real_f + 1.0])}),
      image_quality=dict(target_images=tgt_imgs, predictions={"EHRXDiff": imgs}),
      meta={"split": "test", "seeds": 2})
  return results, dict(prev=prev, target=target, gt=gt, prev_img=prev_img, model=model, age=age, sex=sex,
                       race=race, race_p=race_p, real_f=real_f, imgs=imgs, tgt_imgs=tgt_imgs)


def test_evaluate_generated_numbers():
  res, d = _results()
  t2 = res["chest_imagenome"]
  assert list(t2["rows"]) == ["GT", "Previous image", "Previous label", "EHRXDiff"]
  # GT row, All group, each label against sklearn on the known targets
  for j, name in enumerate(NAMES):
    k = ~np.isnan(d["target"][:, j])
    assert t2["rows"]["GT"]["all"]["auroc"][name] == pytest.approx(roc_auc_score(d["target"][k, j], d["gt"][k, j]))
  # model row: mean / std over the 2 seeds of the weighted macro in Diff
  per_seed = [M.grouped_auroc(s, d["target"], d["prev"])["diff"]["weighted_macro"] for s in d["model"]]
  row = t2["rows"]["EHRXDiff"]["diff"]
  assert row["weighted_macro"] == pytest.approx(np.mean(per_seed))
  assert row["weighted_macro_std"] == pytest.approx(np.std(per_seed))
  assert row["n_seeds"] == 2
  # previous label row: NaN previous labels count as 0 -> perfect on Same, 0 on Diff
  pl = t2["rows"]["Previous label"]
  assert pl["same"]["weighted_macro"] == pytest.approx(1.0) and pl["diff"]["weighted_macro"] == pytest.approx(0.0)
  assert res["chexpert"]["rows"]["EHRXDiff"]["all"]["n_seeds"] == 1
  demo = res["demographics"]["rows"]
  assert demo["EHRXDiff"]["age_r"]["n_seeds"] == 2 and "sex_auroc" not in demo["EHRXDiff"]
  k = d["race"] != -1
  assert demo["GT"]["race_auroc"]["mean"] == pytest.approx(
      roc_auc_score(d["race"][k], d["race_p"][k], multi_class="ovr", average="macro", labels=[0, 1, 2]))
  fid = res["fid"]["EHRXDiff"]
  assert fid["per_seed"][0] == pytest.approx(4 * 0.25, rel=1e-6)  # shifted copy: FID = ||shift||^2
  assert fid["per_seed"][1] == pytest.approx(4 * 1.0, rel=1e-6)
  assert res["image_quality"]["EHRXDiff"]["ssim"]["per_seed"][0] == pytest.approx(M.ssim(d["imgs"][0], d["tgt_imgs"]))
  assert res["image_quality"]["EHRXDiff"]["lpips"] is None


def test_build_tables_contents():
  res, d = _results()
  tables = R.build_tables(res)
  assert set(tables) == {"table2", "table3", "table6", "quality"}
  t2 = res["chest_imagenome"]["rows"]
  gt_all = t2["GT"]["all"]["weighted_macro"]
  assert f"| GT | {gt_all:.3f} |" in tables["table2"]
  m = t2["EHRXDiff"]["all"]
  assert f"{m['weighted_macro']:.3f} ± {m['weighted_macro_std']:.3f}" in tables["table2"]
  for name in NAMES:
    assert name in tables["table2"]
  assert "| Previous label |" in tables["table2"] and "support (n / pos)" in tables["table2"]
  assert "Age (Pearson r)" in tables["table6"]
  assert f"{res['fid']['EHRXDiff']['mean']:.2f} ± {res['fid']['EHRXDiff']['std']:.2f}" in tables["quality"]


def test_lpips_column_values_or_reason():
  rng = np.random.default_rng(5)
  tgt = np.clip(rng.normal(0, 0.4, (3, 16, 16, 3)), -1, 1)
  pred = np.clip(tgt + rng.normal(0, 0.2, tgt.shape), -1, 1)
  # the LPIPS hook's distances are averaged into the column
  res = R.evaluate_generated(image_quality=dict(target_images=tgt, predictions={"m": pred},
                                                lpips_fn=lambda a, b: np.abs(a - b).mean(axis=(1, 2, 3))),
                             meta={"LPIPS": "not computed: ignored when values exist"})
  lp = res["image_quality"]["m"]["lpips"]["mean"]
  assert lp == pytest.approx(np.abs(pred - tgt).mean())
  table = R.build_tables(res)["quality"]
  assert f"| {lp:.3f} |" in table and "LPIPS: " not in table
  # without a hook the column is empty and says why
  res = R.evaluate_generated(image_quality=dict(target_images=tgt, predictions={"m": pred}),
                             meta={"LPIPS": "not computed: no weights"})
  table = R.build_tables(res)["quality"]
  assert table.splitlines()[-1] == "LPIPS: not computed: no weights" and table.count("| – |") == 2


def test_unscorable_label_shows_dash():
  target = np.array([[1, 0], [0, 0], [1, 0], [0, 0]], float)  # second label never positive
  prev = np.zeros_like(target)
  res = R.evaluate_findings(target, prev, {"m": np.random.default_rng(0).random((4, 2))}, ["a", "b"])
  assert res["rows"]["m"]["all"]["auroc"]["b"] != res["rows"]["m"]["all"]["auroc"]["b"]  # NaN
  assert "–" in R.findings_tables(res, "T")


def test_write_report_files_and_no_overwrite(tmp_path):
  res, d = _results()
  images = dict(prev=d["imgs"][1], pred=d["imgs"], target=d["tgt_imgs"], label_names=NAMES,
                prev_labels=d["prev"][:4], target_labels=d["target"][:4], pred_scores=d["model"][0][:4] > 0.5,
                keys=[f"p1_s{i}_s{i + 1}" for i in range(4)])
  out = os.path.join(tmp_path, "eval")
  paths = R.write_report(out, res, images)
  for f in R.OUTPUT_FILES:
    assert os.path.getsize(os.path.join(out, f)) > 0
  metrics = json.load(open(paths["metrics"]))
  assert metrics["chest_imagenome"]["rows"]["GT"]["all"]["weighted_macro"] == pytest.approx(
      res["chest_imagenome"]["rows"]["GT"]["all"]["weighted_macro"])
  text = open(paths["report"]).read()
  assert "Table 2: Chest ImaGenome" in text and "Table 3: CheXpert" in text and "figure.png" in text
  from PIL import Image
  with Image.open(paths["figure"]) as im:
    assert im.size[0] == 3 * 256 + 4 * 6 and im.size[1] > 4 * 256
  with pytest.raises(FileExistsError):
    R.write_report(out, res, images)
  R.write_report(out, res, None, overwrite=True)
  assert not os.path.exists(os.path.join(out, "figure.png"))


def test_chexpert_scores_from_xrv():
  rng = np.random.default_rng(0)
  out = rng.random((5, 18))
  raw = R.chexpert_scores_from_xrv(out, softmax_over_outputs=False)
  np.testing.assert_array_equal(raw, out[:, [10, 1, 4, 7]])
  sm = R.chexpert_scores_from_xrv(out)
  full = np.exp(out) / np.exp(out).sum(1, keepdims=True)
  np.testing.assert_allclose(sm, full[:, [10, 1, 4, 7]])
