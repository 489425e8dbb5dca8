"""Chest ImaGenome 1.0.0 -> per-image labels of the 10 findings of the paper's Table 2, by the reference's rule.

    labels = read_release(ROOT, counters)        # DataFrame: index dicom_id, columns schema.IMAGENOME_LABELS
    gold = gold_subjects(ROOT)                   # patient ids of the hand-checked gold set

ROOT is the release as PhysioNet ships it (physionet.org/files/chest-imagenome/1.0.0):
  ROOT/silver_dataset/scene_tabular/attribute_relations_tabular.txt   (tab-separated; the release's
      utils/scene_postprocessing writes it from silver_dataset/scene_graph/*.json)
  ROOT/gold_dataset/gold_attributes_relations_500pts_500studies1st.txt
One row per (report sentence, anatomical box, attribute); used columns: study_id, image_id (the dicom_id,
some copies end in `.dcm`: stripped), row_id (its last `|` field is the sentence position, a float), bbox,
categoryID, label_name, relation (1 / 0, or yes / no).

The rule (the reference's label preparation): drop `categoryID == 'nlp'` rows; per (study, image, box,
attribute) keep the last mention (largest sentence position; on a tie the later row of the file, as the
reference's stable sort does); per (study, image, attribute) the finding is present when it is present in
any box. An attribute without a row stays unknown (NaN).

The silver file has tens of millions of rows: it is streamed in chunks (`tables.iter_chunks`), each chunk
reduced to its rows of the 10 attributes and to the last mention per key, and the reduced rows are merged
again whenever they grow, so memory follows the number of distinct (image, box, attribute) keys.

`read_label_csv` reads the convenience format: one row per image, `dicom_id` and the 10 columns of
`schema.IMAGENOME_LABELS` (1 / 0 / empty), for labels prepared elsewhere.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from data_prep import schema
from data_prep.tables import DEFAULT_CHUNK_ROWS, Counters, iter_chunks, require_columns

COLUMNS = ["study_id", "image_id", "row_id", "bbox", "categoryID", "label_name", "relation"]
RELATIONS = {"1": 1, "0": 0, "1.0": 1, "0.0": 0, "yes": 1, "no": 0}
# release attribute name -> its column in schema.IMAGENOME_LABELS (the records' label order)
_LABEL_INDEX = {name: schema.IMAGENOME_LABELS.index(col) for name, col in schema.IMAGENOME_ATTRIBUTES.items()}
_KEY = ["study_id", "image_id", "bbox", "label"]
_COUNTER = "chest imagenome"


def release_file(root: str, name: str) -> str:
  path = os.path.join(root, *name.split("/"))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"missing input file: {path} (Chest ImaGenome 1.0.0 release at {root}; the "
                            "silver file is made by the release's utils/scene_postprocessing)")
  return path


def _mentions(chunk: pd.DataFrame, first_row: int, counters: Counters) -> pd.DataFrame:
  """The chunk's rows of the 10 attributes, nlp rows dropped, typed: key columns, sent_loc, row, relation."""
  counters[f"{_COUNTER}: rows read"] += len(chunk)
  row = pd.Series(np.arange(first_row, first_row + len(chunk), dtype=np.int64), index=chunk.index)
  nlp = chunk["categoryID"].str.strip() == "nlp"
  counters[f"{_COUNTER}: nlp rows dropped"] += int(nlp.sum())
  label = chunk["label_name"].str.strip().map(_LABEL_INDEX)
  keep = ~nlp & label.notna()
  chunk, label, row = chunk[keep], label[keep], row[keep]
  relation = chunk["relation"].str.strip().str.lower().map(RELATIONS)
  sent_loc = pd.to_numeric(chunk["row_id"].str.rsplit("|", n=1).str[-1], errors="coerce")
  study = pd.to_numeric(chunk["study_id"], errors="coerce")
  image = chunk["image_id"].str.strip().str.removesuffix(".dcm")
  bad = relation.isna() | sent_loc.isna() | study.isna() | image.isna() | chunk["bbox"].isna()
  counters[f"{_COUNTER}: malformed rows (relation, row_id, study_id, image_id or bbox)"] += int(bad.sum())
  ok = ~bad
  return pd.DataFrame({"study_id": study[ok].astype(np.int64), "image_id": image[ok],
                       "bbox": chunk["bbox"][ok].str.strip(), "label": label[ok].astype(np.int8),
                       "sent_loc": sent_loc[ok].astype(np.float64), "row": row[ok],
                       "relation": relation[ok].astype(np.int8)})


def _last_mentions(parts: list[pd.DataFrame]) -> pd.DataFrame:
  """Per (study, image, box, attribute) the row of the last mention (largest sent_loc, then the later row)."""
  df = pd.concat(parts, ignore_index=True).sort_values(_KEY + ["sent_loc", "row"], kind="stable")
  return df.drop_duplicates(_KEY, keep="last")


def read_attribute_relations(path: str, counters: Counters | None = None,
                             chunk_rows: int = DEFAULT_CHUNK_ROWS) -> pd.DataFrame:
  """Image-level labels of an attribute-relations file (silver or gold): DataFrame indexed by dicom_id
  (`.dcm` stripped) with `study_id` and the float32 columns of `schema.IMAGENOME_LABELS` (1 present,
  0 absent, NaN unknown)."""
  counters = Counters() if counters is None else counters
  pending, first_row, merged_rows = [_mentions(pd.DataFrame(columns=COLUMNS, dtype=object), 0, Counters())], 0, 0
  for chunk in iter_chunks(path, COLUMNS, chunk_rows, counters, f"{_COUNTER} {os.path.basename(path)}",
                           engine="pandas", sep="\t"):
    pending.append(_last_mentions([_mentions(chunk, first_row, counters)]))
    first_row += len(chunk)
    if sum(map(len, pending)) > max(4 * chunk_rows, 2 * merged_rows):  # memory follows the distinct keys
      pending = [_last_mentions(pending)]
      merged_rows = len(pending[0])
  last = _last_mentions(pending)
  present = last.groupby(["image_id", "label"])["relation"].max()          # present in any box
  table = present.unstack("label").reindex(columns=range(len(schema.IMAGENOME_LABELS)))
  out = pd.DataFrame(table.to_numpy(np.float32), index=table.index.rename("dicom_id"),
                     columns=schema.IMAGENOME_LABELS)
  out.insert(0, "study_id", last.groupby("image_id")["study_id"].first().reindex(out.index).to_numpy())
  counters[f"{_COUNTER}: images with labels"] += len(out)
  return out


def read_release(root: str, counters: Counters | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> pd.DataFrame:
  """Image-level labels of the silver set of the release at `root` (see `read_attribute_relations`)."""
  return read_attribute_relations(release_file(root, schema.IMAGENOME_SILVER), counters, chunk_rows)


def gold_subjects(root: str) -> set[int]:
  """Patient ids (MIMIC subject_id) of the gold set; the reference leaves them out of the findings
  classifier's training split."""
  path = release_file(root, schema.IMAGENOME_GOLD)
  ids = set()
  for chunk in iter_chunks(path, ["patient_id"], DEFAULT_CHUNK_ROWS, None, path, engine="pandas", sep="\t"):
    ids.update(pd.to_numeric(chunk["patient_id"], errors="coerce").dropna().astype(np.int64).tolist())
  return ids


def read_label_csv(path: str) -> pd.DataFrame:
  """The convenience per-image CSV (dicom_id + the 10 label columns) in `read_attribute_relations`'s form."""
  require_columns(path, ["dicom_id"] + schema.IMAGENOME_LABELS)
  df = pd.read_csv(path, usecols=["dicom_id"] + schema.IMAGENOME_LABELS, dtype=str)
  out = df[schema.IMAGENOME_LABELS].apply(pd.to_numeric, errors="coerce").astype(np.float32)
  out.index = df["dicom_id"].str.strip().str.removesuffix(".dcm").rename("dicom_id")
  return out
