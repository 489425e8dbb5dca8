"""Chest ImaGenome 1.0.0 files in the release's layout -> the reference's image-level labels
(data_prep/imagenome.py)."""
import os

import numpy as np
import pandas as pd
import pytest

from data_prep import imagenome, schema, tables

COLUMNS = ["subject_id", "study_id", "image_id", "row_id", "sentence", "bbox", "categoryID", "label_name",
           "relation", "context"]   # more columns than the reader uses, in another order, as in the release


def _row(study, image, sent, bbox, label, relation, category="anatomicalfinding"):
  return dict(subject_id=10000001, study_id=study, image_id=image, row_id=f"{image.split('.')[0]}|{study}|{sent}",
              sentence="a sentence, with a comma", bbox=bbox, categoryID=category, label_name=label,
              relation=relation, context="yes")


HANDMADE = [
    # effusion: left box mentioned present at sentence 9, absent at 10 (10 > 9 as numbers: absent), right absent
    _row(1, "dA.dcm", 9, "left costophrenic angle", "pleural effusion", 1),
    _row(1, "dA", 10, "left costophrenic angle", "pleural effusion", 0),
    _row(1, "dA", 9, "right costophrenic angle", "pleural effusion", 0),
    # opacity: left lung present then absent, right lung present -> present in any box
    _row(1, "dA", 2, "left lung", "lung opacity", 1),
    _row(1, "dA.dcm", 3, "left lung", "lung opacity", 0),
    _row(1, "dA", 2, "right lung", "lung opacity", 1),
    # pneumonia only in nlp rows -> unknown; consolidation absent, contradicted by a later nlp row -> absent
    _row(1, "dA", 4, "left lung", "pneumonia", 1, "nlp"),
    _row(1, "dA", 4, "left lung", "consolidation", 0, "disease"),
    _row(1, "dA", 5, "left lung", "consolidation", 1, "nlp"),
    # the same sentence and box twice: the later row of the file wins (the reference's stable sort)
    _row(1, "dA", 6, "mediastinum", "mediastinal widening", 1),
    _row(1, "dA", 6, "mediastinum", "mediastinal widening", 0),
    # image dB: yes / no spelling, an attribute outside the 10, a malformed relation
    _row(2, "dB", 1.5, "cardiac silhouette", "enlarged cardiac silhouette", "yes"),
    _row(2, "dB", 1, "left hilar structures", "vascular congestion", "no"),
    _row(2, "dB", 1, "left lung", "atelectasis", 1),
    _row(2, "dB", 2, "left lung", "pneumothorax", "maybe"),
    # image dC: nlp rows only
    _row(3, "dC.dcm", 1, "left lung", "lung opacity", 1, "nlp"),
]


def _write(path, rows, columns=COLUMNS):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pd.DataFrame(rows, columns=columns).to_csv(path, sep="\t", index=False)
  return path


def _expect(**known):
  out = dict.fromkeys(schema.IMAGENOME_LABELS, np.nan)
  out.update(known)
  return [out[c] for c in schema.IMAGENOME_LABELS]


@pytest.mark.parametrize("chunk_rows", [3, 1000])
def test_release_layout_gives_the_reference_labels(tmp_path, chunk_rows):
  root = str(tmp_path / "chest-imagenome")
  _write(os.path.join(root, schema.IMAGENOME_SILVER), HANDMADE)
  gold = [dict(_row(1, "dA.dcm", 1, "left lung", "lung opacity", 1), patient_id=p) for p in (10000001, 10000007)]
  _write(os.path.join(root, schema.IMAGENOME_GOLD), gold, ["patient_id"] + COLUMNS[1:])
  counters = tables.Counters()
  got = imagenome.read_release(root, counters, chunk_rows=chunk_rows)
  assert list(got.index) == ["dA", "dB"]          # dC has nlp rows only: no label, like an image without rows
  assert list(got.columns) == ["study_id"] + schema.IMAGENOME_LABELS
  np.testing.assert_array_equal(got.loc["dA", schema.IMAGENOME_LABELS].to_numpy(np.float32),
                                _expect(pleural_effusion=0, lung_opacity=1, consolidation=0, mediastinal_widening=0))
  np.testing.assert_array_equal(got.loc["dB", schema.IMAGENOME_LABELS].to_numpy(np.float32),
                                _expect(enlarged_cardiac_silhouette=1, vascular_congestion=0))
  assert got.loc["dB", "study_id"] == 2
  assert counters["chest imagenome: rows read"] == len(HANDMADE)
  assert counters["chest imagenome: nlp rows dropped"] == 3
  assert counters["chest imagenome: malformed rows (relation, row_id, study_id, image_id or bbox)"] == 1
  assert imagenome.gold_subjects(root) == {10000001, 10000007}


def _reference_rule(df: pd.DataFrame) -> pd.DataFrame:
  """The reference's label preparation, whole-table pandas, restated for this test."""
  df = df.assign(image_id=df["image_id"].str.replace(".dcm", ""),
                 sent_loc=df["row_id"].map(lambda x: float(x.split("|")[-1])))
  df = df[df.categoryID != "nlp"]
  df = df.sort_values(by=["study_id", "image_id", "sent_loc", "bbox", "label_name"])
  df = df.drop_duplicates(subset=["study_id", "image_id", "bbox", "label_name"], keep="last")
  df = df.sort_values(by=["study_id", "image_id", "label_name", "relation"])
  df = df.drop_duplicates(subset=["study_id", "image_id", "label_name"], keep="last")
  df = df[df.label_name.isin(schema.IMAGENOME_ATTRIBUTES)]
  return df.pivot(index="image_id", columns="label_name", values="relation")


def test_streamed_reader_equals_the_reference_rule_on_a_random_file(tmp_path):
  rng = np.random.default_rng(0)
  attrs = list(schema.IMAGENOME_ATTRIBUTES) + ["atelectasis", "normal"]
  rows = []
  for _ in range(900):
    study = int(rng.integers(1, 15))
    image = f"i{study}-{int(rng.integers(2))}" + (".dcm" if rng.random() < 0.4 else "")
    box = ["left lung", "right lung", "mediastinum"][rng.integers(3)]
    rows.append(_row(study, image, int(rng.integers(1, 13)), box, attrs[rng.integers(len(attrs))],
                     int(rng.integers(2)), ["anatomicalfinding", "disease", "nlp"][rng.integers(3)]))
  path = _write(str(tmp_path / "attribute_relations_tabular.txt"), rows)
  want = _reference_rule(pd.read_csv(path, sep="\t"))
  want = want.rename(columns=schema.IMAGENOME_ATTRIBUTES).reindex(columns=schema.IMAGENOME_LABELS)
  got = imagenome.read_attribute_relations(path, chunk_rows=97)
  assert sorted(got.index) == sorted(want.index)
  np.testing.assert_array_equal(got.loc[want.index, schema.IMAGENOME_LABELS].to_numpy(np.float32),
                                want.to_numpy(np.float32))
  values = got[schema.IMAGENOME_LABELS].to_numpy()
  assert np.isnan(values).any() and (values == 0).any() and (values == 1).any()   # all three outcomes occur


def test_convenience_csv_and_missing_release(tmp_path):
  path = tmp_path / "labels.csv"
  pd.DataFrame([dict(dicom_id="dA.dcm", **{c: (1 if i == 0 else "") for i, c in enumerate(schema.IMAGENOME_LABELS)})]
               ).to_csv(path, index=False)
  got = imagenome.read_label_csv(str(path))
  np.testing.assert_array_equal(got.loc["dA"].to_numpy(), _expect(**{schema.IMAGENOME_LABELS[0]: 1}))
  with pytest.raises(FileNotFoundError, match="attribute_relations_tabular.txt"):
    imagenome.read_release(str(tmp_path / "nowhere"))
