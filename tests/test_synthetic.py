"""`ehrxdiff demo-data`: the synthetic MIMIC-IV / MIMIC-CXR-JPG database (data_prep.synthetic)."""
import csv
import gzip
import json
import os
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_prep import imagenome, schema, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA_MD = os.path.join(os.path.dirname(ROOT), "shared", "reference", "mimic-schema.md")
PATIENTS = 10


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("synthetic") / "demo")
  summary = synthetic.generate(out, patients=PATIENTS, seed=3, progress=False)
  return out, summary


def _iv(root, table, **kw):
  return pd.read_csv(schema.mimic_path(os.path.join(root, "mimic-iv"), table), **kw)


def _cxr(root, name, **kw):
  return pd.read_csv(os.path.join(root, "mimic-cxr", name + ".csv.gz"), **kw)


def _header(path, sep=","):
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", newline="") as f:
    return next(csv.reader(f, delimiter=sep))


def _frontal(root):
  meta = _cxr(root, "mimic-cxr-2.0.0-metadata", dtype={"StudyTime": str})
  t = meta.StudyTime.astype(float).astype(int).map("{:06d}".format)
  meta["time"] = pd.to_datetime(meta.StudyDate.astype(str) + " " + t, format="%Y%m%d %H%M%S")
  return meta


def test_every_file_has_the_schema_columns_in_order(demo):
  root, _ = demo
  for table, cols in schema.MIMIC_COLUMNS.items():
    path = schema.mimic_path(os.path.join(root, "mimic-iv"), table)
    assert _header(path) == cols, table
  for name in ("mimic-cxr-2.0.0-metadata", "mimic-cxr-2.0.0-chexpert", "mimic-cxr-2.0.0-split"):
    assert _header(os.path.join(root, "mimic-cxr", name + ".csv.gz")) == schema.CXR_COLUMNS[name]
  ig = os.path.join(root, schema.IMAGENOME_DIR)
  assert _header(os.path.join(ig, schema.IMAGENOME_SILVER), "\t") == schema.IMAGENOME_SILVER_COLUMNS
  assert _header(os.path.join(ig, schema.IMAGENOME_GOLD), "\t") == schema.IMAGENOME_GOLD_COLUMNS
  assert len(schema.CHEXPERT_LABELS) == 14 and len(schema.IMAGENOME_LABELS) == 10
  assert "ORIGINALAMOUNT" in schema.MIMIC_COLUMNS["icu/procedureevents"]


@pytest.mark.skipif(not os.path.exists(SCHEMA_MD), reason="shared reference not present")
def test_schema_matches_the_reference_document():
  text = open(SCHEMA_MD).read()
  for table, cols in schema.MIMIC_COLUMNS.items():
    m = re.search(r"^- " + re.escape(table) + r": ([^\n(]+)", text, re.M)
    assert m, table
    assert [c.strip() for c in m.group(1).split(",")] == cols, table


def test_every_table_has_rows_and_times_are_in_the_future(demo):
  root, s = demo
  for table in schema.MIMIC_COLUMNS:
    assert s["rows"][table] > 0, table
  adm = _iv(root, "hosp/admissions")
  years = pd.to_datetime(adm.admittime).dt.year
  assert years.between(2100, 2200).all()
  lab = _iv(root, "hosp/labevents", usecols=["charttime"])
  t = pd.to_datetime(lab.charttime, errors="coerce", format="%Y-%m-%d %H:%M:%S")
  assert t.dropna().dt.year.between(2100, 2200).all()
  assert s["frontal_pairs_48h"] > 0 and s["images"] >= s["studies"]


def test_deterministic_per_seed(tmp_path):
  root, again = str(tmp_path / "first"), str(tmp_path / "again")
  synthetic.generate(root, patients=4, seed=3, progress=False)
  synthetic.generate(again, patients=4, seed=3, progress=False)
  files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)
  assert files == sorted(os.path.relpath(os.path.join(d, f), again) for d, _, fs in os.walk(again) for f in fs)
  csvs = [f for f in files if ".csv" in f or f.endswith(".txt")]
  assert len(csvs) == len(schema.MIMIC_COLUMNS) + 3 + 2   # + 3 MIMIC-CXR csvs + Chest ImaGenome silver and gold
  for f in csvs + [f for f in files if f.endswith(".jpg")][:20]:
    assert open(os.path.join(root, f), "rb").read() == open(os.path.join(again, f), "rb").read(), f
  other = str(tmp_path / "other")
  synthetic.generate(other, patients=4, seed=4, progress=False)
  f = "mimic-iv/hosp/labevents.csv.gz"
  assert open(os.path.join(root, f), "rb").read() != open(os.path.join(other, f), "rb").read()


def test_refuses_a_non_empty_out_unless_overwrite(tmp_path):
  out = tmp_path / "busy"
  out.mkdir()
  (out / "keep.txt").write_text("x")
  with pytest.raises(FileExistsError):
    synthetic.generate(str(out), patients=2, seed=0, progress=False)
  from ehrxdiff_jax import cli
  assert cli.main(["demo-data", "--out", str(out), "--patients", "2", "--no-progress"]) == 1
  assert (out / "keep.txt").exists()
  assert cli.main(["demo-data", "--out", str(out), "--patients", "2", "--overwrite", "--no-progress"]) == 0
  assert not (out / "keep.txt").exists() and (out / "mimic-iv" / "hosp" / "patients.csv.gz").exists()
  assert sorted(os.listdir(tmp_path)) == ["busy"]  # no temporary folders left
  empty = tmp_path / "empty"
  empty.mkdir()
  synthetic.generate(str(empty), patients=2, seed=0, progress=False)  # an empty folder is fine


def test_edge_cases_are_present(demo):
  root, s = demo
  pat = _iv(root, "hosp/patients")
  adm = _iv(root, "hosp/admissions", parse_dates=["admittime", "dischtime"])
  # minors: age at admission under 18
  a = adm.merge(pat, on="subject_id")
  assert ((a.admittime.dt.year - a.anchor_year + a.anchor_age) < 18).any()
  # labs without hadm_id that fall inside an admission of the same patient
  lab = _iv(root, "hosp/labevents", usecols=["subject_id", "hadm_id", "charttime"])
  lab["t"] = pd.to_datetime(lab.charttime, errors="coerce", format="%Y-%m-%d %H:%M:%S")
  blank = lab[lab.hadm_id.isna() & lab.t.notna()].merge(adm, on="subject_id")
  assert ((blank.t >= blank.admittime) & (blank.t <= blank.dischtime)).any()
  # malformed timestamps (non-empty but unparseable) and a missing one
  assert (lab.charttime.notna() & lab.t.isna()).any() and lab.charttime.isna().any()
  ce = _iv(root, "icu/chartevents", usecols=["charttime"])
  assert pd.to_datetime(ce.charttime, errors="coerce", format="%Y-%m-%d %H:%M:%S").isna().any()
  # studies: two at the identical time, one outside every admission, one with only a lateral view
  meta = _frontal(root)
  st = meta.groupby("study_id").agg(subject_id=("subject_id", "first"), time=("time", "first"),
                                    views=("ViewPosition", lambda v: set(v)))
  assert st.duplicated(["subject_id", "time"]).any()
  inside = st.reset_index().merge(adm, on="subject_id")
  inside = inside[(inside.time >= inside.admittime) & (inside.time <= inside.dischtime)].study_id.unique()
  assert len(set(st.index) - set(inside)) > 0
  assert any(v <= {"LATERAL", "LL"} for v in st.views)
  assert any(len(t) < 6 for t in meta.StudyTime.astype(float).astype(int).astype(str))  # e.g. 5014.0


def test_filters_select_some_rows_and_drop_others(demo):
  root, _ = demo
  flt = json.load(open(os.path.join(ROOT, "data_prep", "event_filters.json")))
  tab = flt["tables"]
  lab = _iv(root, "hosp/labevents", usecols=["itemid"]).merge(_iv(root, "hosp/d_labitems"), on="itemid", how="left")
  sel = tab["labevents"]["select"]
  keep = lab.category.isin(sel["d_labitems.category"]) | lab.label.isin(sel["d_labitems.label"])
  assert 0 < keep.sum() < len(lab)
  assert lab.label.isin(sel["d_labitems.label"]).any()  # CRP
  drugs = set(flt["prescriptions"]["antibiotic"]) | set(flt["prescriptions"]["cardiac_lung"])
  rx = _iv(root, "hosp/prescriptions", usecols=["drug"]).drug
  excluded = rx.str.lower().str.contains("tobramycin|coq10")
  keep = rx.isin(drugs) & ~excluded
  assert 0 < keep.sum() < len(rx) and excluded.any() and (rx.isin(drugs) & excluded).any()
  assert rx.isin(flt["prescriptions"]["antibiotic"]).any() and rx.isin(flt["prescriptions"]["cardiac_lung"]).any()
  di = _iv(root, "icu/d_items")
  assert set(di.linksto) >= {"chartevents", "inputevents", "outputevents", "procedureevents"}
  ce = _iv(root, "icu/chartevents", usecols=["itemid"]).merge(di, on="itemid", how="left")
  sel = tab["chartevents"]["select"]
  keep = ce.linksto.isin(sel["d_items.linksto"]) & ce.category.isin(sel["d_items.category"])
  assert 0 < keep.sum() < len(ce)
  assert {"Respiratory", "Routine Vital Signs"} <= set(ce.category)
  mi = _iv(root, "hosp/microbiologyevents", usecols=["spec_type_desc"])
  keep = mi.spec_type_desc.isin(tab["microbiologyevents"]["select"]["spec_type_desc"])
  assert 0 < keep.sum() < len(mi)
  pe = _iv(root, "icu/procedureevents", usecols=["ordercategoryname"])
  keep = pe.ordercategoryname.isin(tab["procedureevents"]["select"]["ordercategoryname"])
  assert 0 < keep.sum() < len(pe)
  ie = _iv(root, "icu/inputevents", usecols=["ordercategoryname"])
  assert ie.ordercategoryname.isin(flt["input_antibiotic_ordercategories"]).any()


def test_images_are_256_grey_jpegs_at_the_mimic_paths(demo):
  root, s = demo
  meta = _frontal(root)
  assert len(meta) == s["images"]
  assert set(meta.ViewPosition) >= {"PA", "AP", "LATERAL"}
  for r in meta.itertuples():
    sub = str(r.subject_id)
    path = os.path.join(root, "mimic-cxr", "files", "p" + sub[:2], "p" + sub, f"s{r.study_id}", r.dicom_id + ".jpg")
    assert os.path.exists(path)
  im = Image.open(path)
  assert im.size == (256, 256) and im.mode == "L" and im.format == "JPEG"
  split = _cxr(root, "mimic-cxr-2.0.0-split")
  assert set(split.dicom_id) == set(meta.dicom_id) and set(split.split) <= {"train", "validate", "test"}


def test_labels_follow_the_state_and_the_pictures(demo):
  root, _ = demo
  meta = _frontal(root)
  # the Chest ImaGenome release through the real reader (every finding is mentioned: no unknown label)
  ig = imagenome.read_release(os.path.join(root, schema.IMAGENOME_DIR)).reset_index()
  ig = ig.merge(meta[["dicom_id", "subject_id"]], on="dicom_id")
  gold = imagenome.gold_subjects(os.path.join(root, schema.IMAGENOME_DIR))
  assert gold and gold <= set(meta.subject_id)
  chex = _cxr(root, "mimic-cxr-2.0.0-chexpert")
  assert set(ig.dicom_id) == set(meta.dicom_id) and set(chex.study_id) == set(meta.study_id)
  for col in schema.CHEXPERT_LABELS:
    assert set(chex[col].dropna().unique()) <= {1.0, 0.0, -1.0}
  for col in schema.IMAGENOME_LABELS:
    assert set(ig[col].unique()) <= {0, 1}
  for col in ("pleural_effusion", "lung_opacity", "enlarged_cardiac_silhouette"):
    assert 0 < ig[col].mean() < 1, col
  # CheXpert and ImaGenome come from the same state
  both = chex.merge(ig, on=["subject_id", "study_id"])
  assert (both.loc[both["Pleural Effusion"] == 1.0, "pleural_effusion"] == 1).all()
  assert (both.loc[both["Pleural Effusion"] == 0.0, "pleural_effusion"] == 0).all()
  assert (both.loc[both["No Finding"] == 1.0, schema.IMAGENOME_LABELS] == 0).all().all()
  # effusion images are brighter at the lung bases than effusion-free images of the same patient
  d = meta[meta.ViewPosition.isin(["PA", "AP"])].merge(ig, on=["dicom_id", "study_id", "subject_id"])
  diffs = []
  for sid, g in d.groupby("subject_id"):
    if g.pleural_effusion.nunique() < 2:
      continue
    base = {}
    for lab, gg in g.groupby("pleural_effusion"):
      vals = []
      for r in gg.itertuples():
        sub = str(r.subject_id)
        im = np.asarray(Image.open(os.path.join(root, "mimic-cxr", "files", "p" + sub[:2], "p" + sub,
                                                f"s{r.study_id}", r.dicom_id + ".jpg")), np.float32)
        vals.append(np.r_[im[140:178, 45:110].ravel(), im[140:178, 146:211].ravel()].mean())  # lower lung fields
      base[lab] = np.mean(vals)
    diffs.append(base[1] - base[0])
  assert len(diffs) >= 1
  assert np.mean(diffs) > 8 and np.mean(np.array(diffs) > 0) >= 0.7, diffs


def _thorax_width(img: np.ndarray) -> int:
  """Columns between the outer edges of the body (soft tissue is bright, the background dark) at mid-chest."""
  cols = np.flatnonzero(img[120:140].mean(0) > 70)
  return int(cols[-1] - cols[0])


def test_demographics_vary_and_the_images_carry_them(demo):
  root, _ = demo
  pat = _iv(root, "hosp/patients")
  adm = _iv(root, "hosp/admissions")
  assert set(pat.gender) == {"F", "M"} and pat.anchor_age.nunique() > 3
  assert set(adm.race) <= {r for r, _ in synthetic.RACES} and adm.race.nunique() >= 3
  # thorax width by sex on the frontal images (a per-patient anatomy trait)
  meta = _frontal(root)
  meta = meta[meta.ViewPosition.isin(["PA", "AP"])].merge(pat[["subject_id", "gender"]], on="subject_id")
  widths = {"F": [], "M": []}
  for r in meta.itertuples():
    sub = str(r.subject_id)
    im = np.asarray(Image.open(os.path.join(root, "mimic-cxr", "files", "p" + sub[:2], "p" + sub,
                                            f"s{r.study_id}", r.dicom_id + ".jpg")))
    widths[r.gender].append(_thorax_width(im))
  assert np.mean(widths["M"]) > np.mean(widths["F"]) + 4, {k: np.mean(v) for k, v in widths.items()}


def test_bone_contrast_falls_with_age():
  from data_prep import synthetic_images as simg
  state = dict(effusion=0.0, opacity=0.0, edema=0.0, heart=0.3, ptx=0.0, devices=False)
  diffs = []
  for k in range(4):  # the same patient and exposure at 25 and at 85 years
    young, old = (simg.render(simg.random_anatomy(np.random.default_rng(k), "F", age), state, "PA",
                              np.random.default_rng(100 + k)).astype(np.float32) for age in (25, 85))
    spine = np.s_[40:220, 122:134]
    diffs.append(young[spine].mean() - old[spine].mean())
  assert min(diffs) > 3, diffs
