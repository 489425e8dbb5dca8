"""The cohort of (I_prev, I_trg) pairs, restating the reference rules:

* adults: age at admission = (year of admittime - anchor_year) + anchor_age >= min_age (18);
* frontal views only (ViewPosition PA or AP); every image left out is counted by its ViewPosition;
* an image belongs to an admission when admittime < t_image <= dischtime (same subject);
* pairs are two images of the same admission from different studies with distinct times and
  0 < t_trg - t_prev <= window (48 h); every earlier image pairs with each later one.

The reference code keeps pairs with t_trg - t_prev < 48 h strictly; the issue asks for <= 48 h, which
is what `build_pairs` does (the two differ only for pairs exactly 48 h apart).

The sample key is `p{subject}_s{prev_study}_s{trg_study}`; when a study holds several frontal images
and the key would repeat, `_d{prev_dicom}_d{trg_dicom}` is appended to the repeating keys.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from data_prep.tables import Counters, parse_ids, parse_times

# The ViewPosition values of MIMIC-CXR-JPG 2.0.0's metadata (counted by name when they are left out).
MIMIC_CXR_VIEWS = ("PA", "AP", "LATERAL", "LL", "AP AXIAL", "AP LLD", "AP RLD", "PA LLD", "PA RLD", "LAO", "RAO",
                   "LPO", "XTABLE LATERAL", "SWIMMERS", "LLD", "RLD")


def study_times(meta: pd.DataFrame, counters: Counters | None = None) -> pd.Series:
  """StudyDate (YYYYMMDD) + StudyTime (HHMMSS[.fff], leading zeros dropped) -> datetime64."""
  date = pd.to_numeric(meta["StudyDate"], errors="coerce")
  tim = pd.to_numeric(meta["StudyTime"], errors="coerce")
  ok = date.notna() & tim.notna() & (tim >= 0) & (tim < 240000)
  text = pd.Series(pd.NA, index=meta.index, dtype=object)
  if ok.any():
    text[ok] = (date[ok].astype(np.int64).astype(str) + " "
                + tim[ok].astype(float).astype(np.int64).map(lambda v: f"{v:06d}"))
  out = pd.to_datetime(text, format="%Y%m%d %H%M%S", errors="coerce")
  bad = out.isna()
  if counters is not None and bad.any():
    counters["mimic-cxr metadata: malformed StudyDate/StudyTime"] += int(bad.sum())
  return out.astype("datetime64[ns]")


def admissions_with_age(patients: pd.DataFrame, admissions: pd.DataFrame,
                        counters: Counters | None = None) -> pd.DataFrame:
  """Admissions (subject_id, hadm_id, admittime, dischtime, race) + age and gender."""
  adm = pd.DataFrame({
      "subject_id": parse_ids(admissions["subject_id"], counters, "hosp/admissions"),
      "hadm_id": parse_ids(admissions["hadm_id"], counters, "hosp/admissions"),
      "admittime": parse_times(admissions["admittime"], counters, "hosp/admissions"),
      "dischtime": parse_times(admissions["dischtime"], counters, "hosp/admissions"),
      "race": admissions["race"].fillna("UNKNOWN") if "race" in admissions else "UNKNOWN",
  })
  pat = pd.DataFrame({
      "subject_id": parse_ids(patients["subject_id"], counters, "hosp/patients"),
      "gender": patients["gender"].fillna(""),
      "anchor_age": pd.to_numeric(patients["anchor_age"], errors="coerce"),
      "anchor_year": pd.to_numeric(patients["anchor_year"], errors="coerce"),
  }).drop_duplicates("subject_id")
  if counters is not None:
    counters["hosp/patients: duplicate subject_id rows dropped"] += int(len(patients) - len(pat))
  complete = adm.dropna(subset=["subject_id", "hadm_id", "admittime", "dischtime"])
  known = complete[complete["subject_id"].isin(pat["subject_id"])]
  if counters is not None:
    counters["hosp/admissions: rows without subject_id, hadm_id, admittime or dischtime dropped"] += \
        int(len(adm) - len(complete))
    counters["hosp/admissions: rows of subjects not in hosp/patients dropped"] += int(len(complete) - len(known))
  adm = known.merge(pat, on="subject_id", how="inner")
  adm["age"] = adm["admittime"].dt.year - adm["anchor_year"] + adm["anchor_age"]
  return adm.drop(columns=["anchor_age", "anchor_year"])


def frontal_images(meta: pd.DataFrame, views=("PA", "AP"), counters: Counters | None = None) -> pd.DataFrame:
  """Frontal images with parsed times: dicom_id, subject_id, study_id, time. The other images are counted
  per ViewPosition (MIMIC-CXR's values; anything else, or empty, as unknown)."""
  frontal = meta["ViewPosition"].isin(list(views))
  if counters is not None:
    for view, n in meta.loc[~frontal, "ViewPosition"].fillna("").value_counts().items():
      name = f"ViewPosition {view}" if view in MIMIC_CXR_VIEWS else "an unknown or empty ViewPosition"
      counters[f"mimic-cxr metadata: images with {name} dropped"] += int(n)
  m = meta[frontal]
  out = pd.DataFrame({
      "dicom_id": m["dicom_id"].astype(str),
      "subject_id": parse_ids(m["subject_id"], counters, "mimic-cxr metadata"),
      "study_id": parse_ids(m["study_id"], counters, "mimic-cxr metadata"),
      "time": study_times(m, counters),
  })
  kept = out.dropna(subset=["subject_id", "study_id", "time"]).reset_index(drop=True)
  if counters is not None:
    counters["mimic-cxr metadata: frontal images without subject_id, study_id or time dropped"] += \
        int(len(out) - len(kept))
  return kept


def build_pairs(adm: pd.DataFrame, images: pd.DataFrame, *, window_hours: float = 48,
                min_age: float = 18, counters: Counters | None = None) -> pd.DataFrame:
  """All (prev, trg) pairs; one row per pair, sorted by key.

  adm: output of `admissions_with_age`; images: output of `frontal_images`.
  Columns: key, subject_id, hadm_id, prev_dicom, prev_study, prev_time, trg_dicom, trg_study,
  trg_time, interval_h, admittime, dischtime, age, gender, race.
  """
  adults = adm[adm["age"] >= min_age]
  if counters is not None:
    counters["cohort: admissions of minors dropped"] += int(len(adm) - len(adults))
  x = images.merge(adults, on="subject_id", how="inner")
  x = x[(x["time"] > x["admittime"]) & (x["time"] <= x["dischtime"])]
  if counters is not None:
    counters["cohort: frontal images inside an adult admission"] += int(x["dicom_id"].nunique())
  cols = ["hadm_id", "dicom_id", "study_id", "time"]
  p = x[cols + ["subject_id", "admittime", "dischtime", "age", "gender", "race"]].rename(
      columns={"dicom_id": "prev_dicom", "study_id": "prev_study", "time": "prev_time"})
  t = x[cols].rename(columns={"dicom_id": "trg_dicom", "study_id": "trg_study", "time": "trg_time"})
  pairs = p.merge(t, on="hadm_id", how="inner")
  dt = pairs["trg_time"] - pairs["prev_time"]
  keep = ((pairs["prev_study"] != pairs["trg_study"]) & (dt > pd.Timedelta(0))
          & (dt <= pd.Timedelta(hours=window_hours)))
  pairs = pairs[keep].copy()
  pairs["interval_h"] = (pairs["trg_time"] - pairs["prev_time"]).dt.total_seconds() / 3600.0
  # An image inside two overlapping admissions of one subject: keep the first admission.
  pairs = pairs.sort_values(["subject_id", "prev_time", "trg_time", "hadm_id", "prev_dicom", "trg_dicom"])
  pairs = pairs.drop_duplicates(["prev_dicom", "trg_dicom"], keep="first")
  base = ("p" + pairs["subject_id"].astype(str) + "_s" + pairs["prev_study"].astype(str)
          + "_s" + pairs["trg_study"].astype(str))
  dup = base.duplicated(keep=False)
  pairs["key"] = base.where(~dup, base + "_d" + pairs["prev_dicom"] + "_d" + pairs["trg_dicom"])
  pairs = pairs.sort_values("key").reset_index(drop=True)
  order = ["key", "subject_id", "hadm_id", "prev_dicom", "prev_study", "prev_time", "trg_dicom",
           "trg_study", "trg_time", "interval_h", "admittime", "dischtime", "age", "gender", "race"]
  return pairs[order]


def windows(pairs: pd.DataFrame) -> pd.DataFrame:
  """Per admission the span of event times any of its pairs needs: hadm_id, subject_id, start, end,
  plus the admission bounds (used to attach events with an empty hadm_id)."""
  g = pairs.groupby("hadm_id", sort=True)
  return pd.DataFrame({
      "subject_id": g["subject_id"].first(),
      "start": g["prev_time"].min(),
      "end": g["trg_time"].max(),
      "admittime": g["admittime"].first(),
      "dischtime": g["dischtime"].first(),
  }).reset_index()
