"""The offline preprocessor on small handmade MIMIC-format tables (and on the synthetic demo database
when `data_prep.synthetic` exists)."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_prep import cohort, events, prepare, tables
from data_prep.schema import (CXR_COLUMNS, IMAGENOME_ATTRIBUTES, IMAGENOME_GOLD, IMAGENOME_LABELS, IMAGENOME_SILVER,
                              IMAGENOME_SILVER_COLUMNS, MIMIC_COLUMNS)
from ehrxdiff_jax import records as rec

# ----------------------------------------------------------------------------- handmade database
T0 = pd.Timestamp("2150-01-01 00:00:00")


def ts(hours: float) -> str:
  return (T0 + pd.Timedelta(hours=hours)).strftime("%Y-%m-%d %H:%M:%S")


def _write(root, name, rows, columns):
  path = os.path.join(root, *name.split("/")) + ".csv.gz"
  os.makedirs(os.path.dirname(path), exist_ok=True)
  df = pd.DataFrame([{c: r.get(c, "") for c in columns} for r in rows], columns=columns)
  df.to_csv(path, index=False)
  return path


def make_db(root, n_labs_extra=0, drop_column=None):
  """Subject 10000001 (adult): admission 0h..200h, frontal images at 10h (study 1), 20h (study 2,
  two frontal images + one lateral), 20h again in study 3 (identical time), 80h (study 4: 60h after 20h),
  58h (study 5: exactly 48h after 10h), 300h (outside the admission).
  Subject 10000002 (minor, 16): two images in one admission -> no pair.
  """
  iv, cxr = os.path.join(root, "mimic-iv"), os.path.join(root, "mimic-cxr")
  col = lambda n: [c for c in MIMIC_COLUMNS[n] if c != drop_column]  # noqa: E731
  _write(iv, "hosp/patients", [dict(subject_id=10000001, gender="F", anchor_age=60, anchor_year=2150),
                               dict(subject_id=10000002, gender="M", anchor_age=16, anchor_year=2150)],
         col("hosp/patients"))
  _write(iv, "hosp/admissions", [
      dict(subject_id=10000001, hadm_id=20000001, admittime=ts(0), dischtime=ts(200), race="WHITE"),
      dict(subject_id=10000002, hadm_id=20000002, admittime=ts(0), dischtime=ts(100), race="ASIAN")],
      col("hosp/admissions"))
  _write(iv, "hosp/d_labitems", [dict(itemid=50800, label="pH", category="Blood Gas"),
                                 dict(itemid=50889, label="C-Reactive Protein", category="Chemistry"),
                                 dict(itemid=50912, label="Creatinine", category="Chemistry")],
         col("hosp/d_labitems"))
  labs = [
      dict(labevent_id=1, subject_id=10000001, hadm_id=20000001, itemid=50800, charttime=ts(12), value="7.41",
           valuenum="7.41", valueuom="units", flag=""),
      dict(labevent_id=2, subject_id=10000001, hadm_id=20000001, itemid=50912, charttime=ts(13), value="1.1"),  # filtered
      dict(labevent_id=3, subject_id=10000001, hadm_id="", itemid=50889, charttime=ts(15), value="12.3456789"),  # empty hadm
      dict(labevent_id=4, subject_id=10000001, hadm_id="", itemid=50889, charttime=ts(500), value="9"),  # outside
      dict(labevent_id=5, subject_id=10000001, hadm_id=20000001, itemid=50800, charttime="not a time", value="7"),
      dict(labevent_id=6, subject_id=10000001, hadm_id=20000001, itemid=50800, charttime=ts(10), value="7.30"),  # == t_prev
      dict(labevent_id=7, subject_id=10000001, hadm_id=20000001, itemid=50800, charttime=ts(20), value="7.35"),  # == t_trg
  ]
  for i in range(n_labs_extra):  # many events between 20h and 80h for the truncation test
    labs.append(dict(labevent_id=100 + i, subject_id=10000001, hadm_id=20000001, itemid=50800,
                     charttime=ts(21 + i * 0.01), value=str(i)))
  lab_path = _write(iv, "hosp/labevents", labs, col("hosp/labevents"))
  import gzip
  with gzip.open(lab_path, "at") as f:  # one malformed line (too many fields)
    f.write("99,10000001,20000001,1,50800,P,2150-01-01 12:00:00,,7.1,7.1,u,,,,,,EXTRA,FIELDS\n")
  _write(iv, "hosp/prescriptions", [
      dict(subject_id=10000001, hadm_id=20000001, starttime=ts(11), drug="Meropenem", route="IV", dose_val_rx="1"),
      dict(subject_id=10000001, hadm_id=20000001, starttime=ts(11), drug="Tobramycin-Dexamethasone Ophth Susp"),
      dict(subject_id=10000001, hadm_id=20000001, starttime=ts(11), drug="Acetaminophen")], col("hosp/prescriptions"))
  _write(iv, "hosp/microbiologyevents", [
      dict(microevent_id=1, subject_id=10000001, hadm_id=20000001, chartdate=ts(14), charttime=ts(14),
           spec_type_desc="SPUTUM", test_name="GRAM STAIN"),
      dict(microevent_id=2, subject_id=10000001, hadm_id=20000001, chartdate=ts(14), charttime="",
           spec_type_desc="SPUTUM", test_name="CULTURE"),
      dict(microevent_id=3, subject_id=10000001, hadm_id=20000001, charttime=ts(14), spec_type_desc="URINE")],
      col("hosp/microbiologyevents"))
  _write(iv, "icu/icustays", [], col("icu/icustays"))
  _write(iv, "icu/d_items", [
      dict(itemid=220045, label="Heart Rate", linksto="chartevents", category="Routine Vital Signs"),
      dict(itemid=220046, label="HR Alarm", linksto="chartevents", category="Other"),
      dict(itemid=225158, label="NaCl 0.9%", linksto="inputevents", category="Fluids"),
      dict(itemid=226559, label="Foley", linksto="outputevents", category="Output"),
      dict(itemid=225792, label="Invasive Ventilation", linksto="procedureevents", category="Ventilation")],
      col("icu/d_items"))
  _write(iv, "icu/chartevents", [
      dict(subject_id=10000001, hadm_id=20000001, stay_id=1, charttime=ts(16), itemid=220045, value="88", valuenum="88", valueuom="bpm"),
      dict(subject_id=10000001, hadm_id=20000001, stay_id=1, charttime=ts(16), itemid=220046, value="1")],
      col("icu/chartevents"))
  _write(iv, "icu/inputevents", [
      dict(subject_id=10000001, hadm_id=20000001, stay_id=1, starttime=ts(17), itemid=225158, amount="100", amountuom="ml")],
      col("icu/inputevents"))
  _write(iv, "icu/outputevents", [
      dict(subject_id=10000001, hadm_id=20000001, stay_id=1, charttime=ts(18), itemid=226559, value="300", valueuom="ml")],
      col("icu/outputevents"))
  _write(iv, "icu/procedureevents", [
      dict(subject_id=10000001, hadm_id=20000001, stay_id=1, starttime=ts(19), itemid=225792, value="1",
           ordercategoryname="Ventilation"),
      dict(subject_id=10000001, hadm_id=20000001, stay_id=1, starttime=ts(19), itemid=225792, value="1",
           ordercategoryname="Peripheral Lines")], col("icu/procedureevents"))
  images = [  # dicom, subject, study, view, hours
      ("d1", 10000001, 1, "PA", 10), ("d2a", 10000001, 2, "AP", 20), ("d2b", 10000001, 2, "AP", 20),
      ("d2l", 10000001, 2, "LATERAL", 20), ("d3", 10000001, 3, "AP", 20), ("d4", 10000001, 4, "AP", 80),
      ("d5", 10000001, 5, "AP", 58), ("d6", 10000001, 6, "AP", 300),
      ("m1", 10000002, 7, "AP", 10), ("m2", 10000002, 8, "AP", 20)]
  meta = []
  for dicom, subj, study, view, h in images:
    t = T0 + pd.Timedelta(hours=h)
    meta.append(dict(dicom_id=dicom, subject_id=subj, study_id=study, ViewPosition=view,
                     StudyDate=t.strftime("%Y%m%d"), StudyTime=str(float(t.strftime("%H%M%S")))))
    d = os.path.join(cxr, "files", f"p{str(subj)[:2]}", f"p{subj}", f"s{study}")
    os.makedirs(d, exist_ok=True)
    arr = (np.random.default_rng(study).random((40, 32)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(os.path.join(d, f"{dicom}.jpg"))
  _write(cxr, "mimic-cxr-2.0.0-metadata", meta, CXR_COLUMNS["mimic-cxr-2.0.0-metadata"])
  _write(cxr, "mimic-cxr-2.0.0-chexpert",
         [dict(subject_id=s, study_id=st, **{"Edema": 1.0, "Cardiomegaly": -1.0}) for _, s, st, _, _ in images],
         CXR_COLUMNS["mimic-cxr-2.0.0-chexpert"])
  # Chest ImaGenome 1.0.0 (its own release next to mimic-cxr/): finding i of every image but d5 is i % 2
  # (d1 spelled with .dcm); the gold set holds subject 10000001 and a patient outside the cohort.
  names = {col: name for name, col in IMAGENOME_ATTRIBUTES.items()}
  silver = [dict(study_id=st, image_id=d + (".dcm" if d == "d1" else ""), row_id=f"{st}|{i}", bbox="left lung",
                 relation=i % 2, label_name=names[l], categoryID="anatomicalfinding", sentence="")
            for d, _, st, _, _ in images if d != "d5" for i, l in enumerate(IMAGENOME_LABELS)]
  ig = os.path.join(root, "chest-imagenome")
  for name, extra, rows in ((IMAGENOME_SILVER, [], silver),
                            (IMAGENOME_GOLD, ["patient_id"], [dict(silver[0], patient_id=p) for p in (10000001, 19)])):
    os.makedirs(os.path.dirname(os.path.join(ig, name)), exist_ok=True)
    pd.DataFrame(rows, columns=extra + IMAGENOME_SILVER_COLUMNS).to_csv(os.path.join(ig, name), sep="\t", index=False)
  return iv, cxr


def run_prepare(iv, cxr, out, *extra):
  import argparse
  p = argparse.ArgumentParser()
  prepare.add_arguments(p)
  imagenome = os.path.join(os.path.dirname(cxr), "chest-imagenome")   # as make_db and demo-data write it
  args = p.parse_args(["--mimic-iv", iv, "--mimic-cxr", cxr, "--out", out, "--image-size", "32",
                       "--event-dim", "16", "--workers", "1", "--chest-imagenome", imagenome, *extra])
  args.config_overrides = []
  return prepare.run(args)


@pytest.fixture(scope="module")
def db(tmp_path_factory):
  root = tmp_path_factory.mktemp("db")
  return make_db(str(root))


def _cohort(iv, cxr, **kw):
  c = tables.Counters()
  pat = tables.read_table(iv, "hosp/patients", ["subject_id", "gender", "anchor_age", "anchor_year"])
  adm = tables.read_table(iv, "hosp/admissions", ["subject_id", "hadm_id", "admittime", "dischtime", "race"])
  meta = tables.read_table(cxr, "mimic-cxr-2.0.0-metadata", ["dicom_id", "subject_id", "study_id", "ViewPosition",
                                                             "StudyDate", "StudyTime"])
  a = cohort.admissions_with_age(pat, adm, c)
  im = cohort.frontal_images(meta, counters=c)
  return cohort.build_pairs(a, im, counters=c, **kw), c


def test_cohort_rules(db):
  iv, cxr = db
  pairs, c = _cohort(iv, cxr)
  got = set(zip(pairs["prev_dicom"], pairs["trg_dicom"]))
  # 10h->20h (d2a, d2b, d3), 10h->58h (exactly 48h: kept), 20h->58h, 58h->80h; 20h->80h is 60h (dropped);
  # d2a/d2b/d3 share the time 20h (distinct times required); lateral, outside admission and minor dropped.
  expected = {("d1", "d2a"), ("d1", "d2b"), ("d1", "d3"), ("d1", "d5"), ("d2a", "d5"), ("d2b", "d5"), ("d3", "d5"),
              ("d5", "d4")}
  assert got == expected
  assert c["cohort: admissions of minors dropped"] == 1
  assert (pairs["interval_h"] > 0).all() and (pairs["interval_h"] <= 48).all()
  # keys unique; study 2 has two frontal images so its keys carry the dicom ids
  assert pairs["key"].is_unique
  assert "p10000001_s1_s3" in set(pairs["key"])
  assert any(k.startswith("p10000001_s1_s2_d") for k in pairs["key"])
  # the strict reference bound drops the exact-48h pair
  strict, _ = _cohort(iv, cxr, window_hours=47.99)
  assert ("d1", "d5") not in set(zip(strict["prev_dicom"], strict["trg_dicom"]))


@pytest.mark.parametrize("engine", ["pandas", "pyarrow"])
def test_events_filters_text_and_order(db, engine):
  iv, cxr = db
  pairs, _ = _cohort(iv, cxr)
  c = tables.Counters()
  blocks = events.stream_all(iv, events.load_filters(), cohort.windows(pairs), counters=c, chunk_rows=2,
                             engine=engine)
  ev, texts = events.merge_blocks(blocks)
  ids, n = events.assemble(pairs, ev, 1024)
  row = pairs.index[(pairs["prev_dicom"] == "d1") & (pairs["trg_dicom"] == "d3")][0]
  seq = [texts[i] for i in ids[row]]
  # times 10 (lab at t_prev, inclusive), 11 (Meropenem), 12 (pH), 14 (micro SPUTUM), 15 (CRP, empty hadm),
  # 16 (heart rate), 17 (input), 18 (output), 19 (procedure), 20 (lab at t_trg, inclusive)
  assert seq[0] == "labevents itemid pH value 7.30"
  assert seq[1] == "prescriptions drug Meropenem dose_val_rx 1 route IV"
  assert seq[2] == "labevents itemid pH value 7.41 valuenum 7.41 valueuom units"
  assert seq[3].startswith("microbiologyevents") and "SPUTUM" in seq[3] and "GRAM STAIN" in seq[3]
  assert seq[4] == "labevents itemid C-Reactive Protein value 12.3457"
  assert seq[5] == "chartevents itemid Heart Rate value 88 valuenum 88 valueuom bpm"
  assert seq[6].startswith("inputevents itemid NaCl 0.9% amount 100 amountuom ml")
  assert seq[7] == "outputevents itemid Foley value 300 valueuom ml"
  assert seq[8].startswith("procedureevents itemid Invasive Ventilation value 1")
  assert seq[9] == "labevents itemid pH value 7.35"
  assert len(seq) == n[row] == 10
  joined = " | ".join(texts)
  for dropped in ("Creatinine", "Tobramycin", "Acetaminophen", "URINE", "HR Alarm", "Peripheral Lines"):
    assert dropped not in joined
  assert c["hosp/labevents: malformed timestamps"] == 1
  assert c["hosp/labevents: malformed rows"] == 1
  assert c["microbiologyevents: rows without charttime dropped"] == 1
  assert c["labevents: events attached by subject and time (empty hadm_id)"] == 1


def test_truncation_keeps_last_events(tmp_path):
  iv, cxr = make_db(str(tmp_path), n_labs_extra=40)
  pairs, _ = _cohort(iv, cxr)
  blocks = events.stream_all(iv, events.load_filters(), cohort.windows(pairs), tables=["labevents"])
  ev, texts = events.merge_blocks(blocks)
  ids, n = events.assemble(pairs, ev, 8)
  row = pairs.index[(pairs["prev_dicom"] == "d3") & (pairs["trg_dicom"] == "d5")][0]
  seq = [texts[i] for i in ids[row]]
  assert n[row] == 41 and len(seq) == 8  # 20h lab + 40 extra
  assert seq == [f"labevents itemid pH value {i}" for i in range(32, 40)]


def test_schema_errors_name_file_and_column(tmp_path):
  iv, cxr = make_db(str(tmp_path / "a"), drop_column="charttime")
  with pytest.raises(tables.SchemaError, match=r"labevents\.csv\.gz: missing column 'charttime'"):
    run_prepare(iv, cxr, str(tmp_path / "out"))
  iv, cxr = make_db(str(tmp_path / "b"))
  os.remove(os.path.join(iv, "icu", "outputevents.csv.gz"))
  with pytest.raises(FileNotFoundError, match=r"icu/outputevents\.csv\.gz"):
    run_prepare(iv, cxr, str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def test_prepare_end_to_end_handmade(db, tmp_path):
  iv, cxr = db
  os.remove(os.path.join(cxr, "files", "p10", "p10000001", "s3", "d3.jpg")) if os.path.exists(
      os.path.join(cxr, "files", "p10", "p10000001", "s3", "d3.jpg")) else None
  out = str(tmp_path / "ds")
  assert run_prepare(iv, cxr, out, "--split-fractions", "1,0,0") == 0
  man = json.load(open(os.path.join(out, rec.MANIFEST)))
  assert man["schema_version"] == rec.SCHEMA_VERSION
  assert man["counters"]["images: missing files"] == 1
  assert man["counts"]["samples"] == 5  # 8 pairs minus the two with d3, minus d5->d4 (no event)
  assert man["counters"]["samples dropped: no event"] == 1
  assert os.path.exists(os.path.join(out, "table1.csv")) and os.path.exists(os.path.join(out, "table5.csv"))
  from ehrxdiff_jax import pipeline
  r = pipeline.data_source(out, "train")[0]
  assert r["prev_image"].shape == (32, 32) and r["prev_image"].dtype == np.uint8
  assert r["events"].dtype == np.float16 and r["events"].shape[1] == 16
  assert r["prev_labels_imagenome"].shape == (10,) and r["target_labels_chexpert"].shape == (14,)
  # Chest ImaGenome from the release: finding i is i % 2 (d1's ids end in .dcm), d5 has no rows
  index = pipeline.read_index(out, "train")
  src = pipeline.data_source(out, "train")
  for i, row in index.iterrows():
    rec_i = src[int(row["record"])]
    for which, dicom in (("prev", row["prev_dicom"]), ("target", row["trg_dicom"])):
      want = np.full(10, np.nan, np.float32) if dicom == "d5" else np.arange(10, dtype=np.float32) % 2
      np.testing.assert_array_equal(rec_i[f"{which}_labels_imagenome"], want)
    assert rec_i["meta"]["imagenome_gold"] is True         # subject 10000001 is in the gold set
  assert man["counters"]["labels imagenome: images without labels"] == 1
  assert man["counters"]["labels imagenome: gold-set patients (no findings-classifier training)"] == 1
  assert man["counters"]["labels imagenome: train samples of gold-set patients"] == 5
  # demographics in the meta: (2150 - 2150) + 60 years, patients.gender, admissions.race
  assert {k: r["meta"][k] for k in ("age", "sex", "race")} == dict(age=60.0, sex="F", race="WHITE")
  # overwrite refusal, then --overwrite replaces atomically
  assert run_prepare(iv, cxr, out) == 2
  assert run_prepare(iv, cxr, out, "--overwrite", "--split-fractions", "1,0,0") == 0
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p or ".old-" in p]


def test_tfds_reads_the_dataset(db, tmp_path):
  iv, cxr = db
  out = str(tmp_path / "ds")
  assert run_prepare(iv, cxr, out, "--split-fractions", "1,0,0", "--labels", "chexpert",
                     "--event-layout", "inline", "--image-codec", "png") == 0
  import tensorflow_datasets as tfds
  src = tfds.builder_from_directory(out).as_data_source(split="train")
  ex = src[0]
  r = rec.decode_payload(ex["record"])
  assert r["meta"]["key"].encode() == ex["key"]
  assert r["events"].dtype == np.float16 and r["prev_image"].shape == (32, 32)


def test_demo_database_end_to_end(tmp_path):
  synthetic = pytest.importorskip("data_prep.synthetic", reason="data_prep.synthetic (demo-data) not written yet")
  if not hasattr(synthetic, "generate"):
    pytest.skip("data_prep.synthetic has no generate() yet")
  root = str(tmp_path / "demo")
  synthetic.generate(root, patients=6, seed=0, progress=False)
  out = str(tmp_path / "ds")
  assert run_prepare(os.path.join(root, "mimic-iv"), os.path.join(root, "mimic-cxr"), out) == 0
  from ehrxdiff_jax import pipeline
  man = json.load(open(os.path.join(out, rec.MANIFEST)))
  split = max(man["splits"], key=lambda s: man["splits"][s]["samples"])
  cfg = dict(image_size=32, w_null=False, augment_target=False, cached_latents=False, num_workers=0)
  it = iter(pipeline.make_loader(out, split, global_batch_size=2, config_data=cfg, seed=0, max_events=64,
                                 process_index=0, process_count=1))
  b = next(it)
  assert b["prev_image"].shape == (2, 32, 32) and b["events"].shape == (2, 64, 16)   # the host batch
  assert b["event_mask"].dtype == bool and b["event_mask"].any()
  # the loader gathers the shared event table's rows straight into the batch: the records' events, then zeros
  keys = {src_r["meta"]["key"]: src_r for src_r in map(pipeline.data_source(out, split).__getitem__,
                                                       range(man["splits"][split]["samples"]))}
  assert man["event_layout"] == "table"
  for j, key in enumerate(b["key"]):
    want = keys[key.decode()]["events"][-64:]
    np.testing.assert_array_equal(b["events"][j, :len(want)], want)
    assert b["event_rows"][j] == len(want) and not b["events"][j, len(want):].any()
  # patient-disjoint splits
  subjects = [set(pipeline.read_index(out, s)["subject_id"]) for s in man["splits"]]
  assert sum(len(x) for x in subjects) == len(set().union(*subjects))
  # every record's demographics against the source tables (age at admission as in mimic-schema.md)
  iv = os.path.join(root, "mimic-iv", "hosp")
  pat = pd.read_csv(os.path.join(iv, "patients.csv.gz")).set_index("subject_id")
  adm = pd.read_csv(os.path.join(iv, "admissions.csv.gz"), parse_dates=["admittime"]).set_index("hadm_id")
  src = pipeline.data_source(out, split)
  for i in range(len(src)):
    m = src[i]["meta"]
    p, a = pat.loc[m["subject_id"]], adm.loc[m["hadm_id"]]
    assert m["age"] == float(a.admittime.year - p.anchor_year + p.anchor_age)
    assert m["sex"] == p.gender and m["race"] == a.race


def test_split_file(db, tmp_path):
  iv, cxr = db
  split = tmp_path / "split.csv"
  pd.DataFrame({"subject_id": [10000001], "split": ["validate"]}).to_csv(split, index=False)
  out = str(tmp_path / "ds")
  assert run_prepare(iv, cxr, out, "--split-file", str(split)) == 0
  man = json.load(open(os.path.join(out, rec.MANIFEST)))
  assert list(man["splits"]) == ["valid"]


def test_embedders_and_cache(tmp_path):
  from data_prep import embed
  texts = ["labevents itemid pH value 7.41", "prescriptions drug Meropenem", "labevents itemid pH value 7.41"]
  e = embed.make_embedder("hashing", 32)
  a = embed.embed_texts(texts, e, str(tmp_path / "cache"))
  assert a.shape == (3, 32) and a.dtype == np.float16 and np.array_equal(a[0], a[2])
  assert np.allclose(np.linalg.norm(a.astype(np.float32), axis=1), 1, atol=1e-2)
  calls = []
  e2 = embed.Embedder(e.name, 32, lambda t: calls.append(t) or embed.hashing_embed(t, 32))
  b = embed.embed_texts(texts + ["new text"], e2, str(tmp_path / "cache"))  # resumes from the cache
  assert calls == [["new text"]] and np.array_equal(a, b[:3])
  np.savez(tmp_path / "pre.npz", texts=np.array(texts[:2]), vectors=np.eye(2, 32, dtype=np.float32))
  p = embed.make_embedder(f"precomputed:{tmp_path / 'pre.npz'}", 32)
  assert embed.embed_texts(texts, p)[1, 1] == 1
  with pytest.raises(KeyError, match="no vector"):
    embed.embed_texts(["unknown"], p)


def test_unknown_demographics_are_left_out():
  row = pd.Series(dict(age=np.nan, gender="", race=np.nan))
  assert prepare.demographics(row) == {}
  row = pd.Series(dict(age=71, gender="m", race="ASIAN - CHINESE"))
  assert prepare.demographics(row) == dict(age=71.0, sex="M", race="ASIAN - CHINESE")


# ----------------------------------------------------------------------------- bad inputs: counted or named
def _edit_lines(path, edit):
  """Rewrites a .csv.gz line by line (`edit(line) -> line`), keeping malformed lines as they are."""
  import gzip
  with gzip.open(path, "rt") as f:
    lines = f.read().splitlines(keepends=True)
  with gzip.open(path, "wt") as f:
    f.writelines(edit(line) for line in lines)


def prepare_cli(iv, cxr, out, *extra) -> int:
  from ehrxdiff_jax import cli
  imagenome = os.path.join(os.path.dirname(cxr), "chest-imagenome")   # as make_db writes it
  return cli.main(["prepare", "--mimic-iv", iv, "--mimic-cxr", cxr, "--chest-imagenome", imagenome,
                   "--out", out, "--image-size", "32", "--event-dim", "16", "--workers", "1", *extra])


def test_imagenome_labels_need_their_release(db, tmp_path, capsys):
  from ehrxdiff_jax import cli
  iv, cxr = db
  base = ["prepare", "--mimic-iv", iv, "--mimic-cxr", cxr, "--out", str(tmp_path / "ds")]
  assert cli.main(base) == 2
  assert capsys.readouterr().err.startswith("error: the 'imagenome' labels need the Chest ImaGenome 1.0.0 "
                                            "release: pass --chest-imagenome DIR")
  assert cli.main(base + ["--chest-imagenome", str(tmp_path / "nowhere")]) == 2   # before any streaming
  err = capsys.readouterr().err
  assert err.startswith("error: missing input file: ") and "gold_attributes_relations_500pts" in err
  assert not os.path.exists(tmp_path / "ds")


def test_every_dropped_row_is_counted(tmp_path, capsys):
  iv, cxr = make_db(str(tmp_path / "db"))
  # the CRP lab at 15h has an empty hadm_id: a malformed subject_id leaves it nothing to attach to; the pH
  # lab at 12h gets a malformed hadm_id
  _edit_lines(os.path.join(iv, "hosp", "labevents.csv.gz"),
              lambda l: l.replace("3,10000001,", "3,x10000001,", 1) if l.startswith("3,10000001,")
              else l.replace("1,10000001,20000001,", "1,10000001,2000000l,", 1) if l.startswith("1,10000001,") else l)
  # one image with a ViewPosition MIMIC-CXR does not have (beside the lateral d2l)
  cols = CXR_COLUMNS["mimic-cxr-2.0.0-metadata"]
  odd = pd.DataFrame([dict(dicom_id="dx", subject_id=10000001, study_id=9, ViewPosition="XYZ", StudyDate="21500101",
                           StudyTime="150000.0")], columns=cols).to_csv(header=False, index=False)
  import gzip
  with gzip.open(os.path.join(cxr, "mimic-cxr-2.0.0-metadata.csv.gz"), "at") as f:
    f.write(odd)
  out = str(tmp_path / "ds")
  assert run_prepare(iv, cxr, out, "--split-fractions", "1,0,0") == 0
  expected = {"labevents: rows with an empty hadm_id and a malformed or missing subject_id dropped": 1,
              "labevents: rows with a malformed hadm_id dropped": 1,
              "mimic-cxr metadata: images with ViewPosition LATERAL dropped": 1,
              "mimic-cxr metadata: images with an unknown or empty ViewPosition dropped": 1}
  counters = json.load(open(os.path.join(out, rec.MANIFEST)))["counters"]
  assert {k: counters.get(k) for k in expected} == expected
  printed = capsys.readouterr().out
  assert all(f"  {k}: {v}\n" in printed for k, v in expected.items())


def test_empty_cohort_is_an_error_that_prints_the_counters(tmp_path, capsys):
  iv, cxr = make_db(str(tmp_path / "db"))
  path = os.path.join(cxr, "mimic-cxr-2.0.0-metadata.csv.gz")
  meta = pd.read_csv(path, dtype=str)
  meta.assign(ViewPosition="LATERAL").to_csv(path, index=False)  # no frontal image left
  assert prepare_cli(iv, cxr, str(tmp_path / "ds")) == 2
  captured = capsys.readouterr()
  assert captured.err.startswith("error: the cohort is empty: no pair of frontal images within one adult admission")
  assert captured.err.count("\n") == 1
  assert "  mimic-cxr metadata: images with ViewPosition LATERAL dropped: 10\n" in captured.out
  assert not os.path.exists(tmp_path / "ds")


@pytest.mark.parametrize("engine", ["pandas", "pyarrow"])
def test_truncated_csv_gz_is_named(tmp_path, capsys, engine):
  iv, cxr = make_db(str(tmp_path / "db"), n_labs_extra=3000)  # larger than one read buffer: the header reads
  lab = os.path.join(iv, "hosp", "labevents.csv.gz")
  data = open(lab, "rb").read()
  open(lab, "wb").write(data[:len(data) // 2])
  assert prepare_cli(iv, cxr, str(tmp_path / "ds"), "--csv-engine", engine) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {lab}: truncated or corrupt, cannot read it to its end") and err.count("\n") == 1
  assert "download or extract it again" in err
  # a small table read whole
  big = pd.DataFrame({"subject_id": np.arange(20000), "gender": "F"})
  big.to_csv(tmp_path / "t.csv.gz", index=False)
  data = open(tmp_path / "t.csv.gz", "rb").read()
  open(tmp_path / "t.csv.gz", "wb").write(data[:len(data) // 2])
  with pytest.raises(tables.SchemaError, match=f"{tmp_path / 't.csv.gz'}: truncated or corrupt"):
    tables.read_table(str(tmp_path), "t", ["subject_id", "gender"])


def test_input_errors_are_one_line(db, tmp_path, capsys):
  iv, cxr = db
  bad = tmp_path / "filters.json"
  bad.write_text('{"tables": ')
  assert prepare_cli(iv, cxr, str(tmp_path / "ds"), "--filters", str(bad)) == 2
  assert capsys.readouterr().err.startswith(f"error: {bad}: not a valid event filter file")
  assert prepare_cli(iv, cxr, str(tmp_path / "ds"), "--split-fractions", "0.9,0.1") == 2
  assert capsys.readouterr().err.startswith("error: --split-fractions '0.9,0.1': expected three")
  assert prepare_cli(os.path.join(iv, "nowhere"), cxr, str(tmp_path / "ds")) == 2
  assert capsys.readouterr().err == f"error: missing input file: {os.path.join(iv, 'nowhere', 'hosp', 'patients')}.csv.gz " \
      f"(or {os.path.join(iv, 'nowhere', 'hosp', 'patients')}.csv)\n"
