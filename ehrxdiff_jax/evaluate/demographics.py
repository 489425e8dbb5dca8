"""Demographics (paper Table 6): the record fields, the race grouping and the demographic image classifier.

Records carry the admission's demographics in their JSON meta (data_prep): `age` (years, float), `sex`
('F' / 'M', MIMIC-IV patients.gender) and `race` (the raw MIMIC-IV admissions.race string). `encode_meta`
turns them into the numbers the pipeline batches and the evaluation use:
  age   float32 years, NaN when unknown
  sex   float32 1.0 = 'M', 0.0 = 'F', NaN when unknown (a sex score is P(male))
  race  int32 index into RACE_GROUPS, -1 when unknown / declined / missing (excluded from the race AUROC,
        as the reference drops its race -1)
RACE_RULES below is the one place that groups MIMIC's race strings. numpy only: the input pipeline
imports it (grain workers). The classifier network is evaluate/vit_classifier.ViTDemographicsClassifier,
trained by the image_classifier objective with `model.imagenome_classifier.task='demographics'`
(configs/demographics_classifier.py).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

RACE_GROUPS = ("WHITE", "BLACK", "ASIAN", "HISPANIC/LATINO", "OTHER")
# MIMIC-IV admissions.race -> group, by prefix, first match wins; any other known value is OTHER
# (e.g. 'AMERICAN INDIAN/ALASKA NATIVE', 'NATIVE HAWAIIAN OR OTHER PACIFIC ISLANDER', 'MULTIPLE RACE/ETHNICITY').
RACE_RULES = (
    ("WHITE", "WHITE"), ("PORTUGUESE", "WHITE"),
    ("BLACK", "BLACK"),
    ("ASIAN", "ASIAN"),
    ("HISPANIC", "HISPANIC/LATINO"), ("SOUTH AMERICAN", "HISPANIC/LATINO"),
)
# Values that say nothing about race: excluded (-1), as missing ones.
RACE_EXCLUDED = ("UNKNOWN", "UNABLE TO OBTAIN", "PATIENT DECLINED TO ANSWER", "DECLINED")
SEX_CODES = {"M": 1.0, "F": 0.0}
META_KEYS = ("age", "sex", "race")


def race_group(raw: Any) -> int:
  """Index into RACE_GROUPS of a raw MIMIC race string; -1 for missing / unknown / declined."""
  if raw is None or (isinstance(raw, float) and np.isnan(raw)):
    return -1
  s = str(raw).strip().upper()
  if not s or s in RACE_EXCLUDED:
    return -1
  for prefix, group in RACE_RULES:
    if s.startswith(prefix):
      return RACE_GROUPS.index(group)
  return RACE_GROUPS.index("OTHER")


def encode_meta(meta: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A record's meta -> {'age': float32, 'sex': float32, 'race': int32} scalars (unknown: NaN / NaN / -1)."""
  age = meta.get("age")
  sex = SEX_CODES.get(str(meta.get("sex", "")).strip().upper(), np.nan)
  return {"age": np.float32(np.nan if age is None else float(age)), "sex": np.float32(sex),
          "race": np.int32(race_group(meta.get("race")))}


def has_demographics(meta: Mapping[str, Any]) -> bool:
  """Whether the record carries any of the demographic meta keys (`ehrxdiff prepare` writes each one where
  it is known; older datasets have none)."""
  return any(k in meta for k in META_KEYS)


def table6_metrics(age_true, sex_true, race_true, age_pred, sex_score, race_probs) -> dict:
  """Table 6's numbers for one set of predictions: {'age_r', 'sex_auroc', 'race_auroc'} (evaluate.metrics)."""
  from ehrxdiff_jax.evaluate import metrics as M
  return {"age_r": M.pearson_r(age_pred, age_true), "sex_auroc": M.sex_auroc(sex_true, sex_score),
          "race_auroc": M.ovr_macro_auroc(race_true, race_probs, ignore=-1)}
