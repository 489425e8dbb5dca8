"""Events between the two images of each pair, from the seven MIMIC-IV tables.

Per table (`event_filters.json`, vendored from the reference) the big files are streamed in chunks:
1. select rows early and cheaply: the item filter (itemids from the dictionary, drug names, specimen
   types, order categories) and membership of the row's admission / subject in the cohort;
2. parse the time column only for those rows and keep rows inside the admission's event window
   [first prev image, last target image] -- memory therefore grows with the cohort's events, never with
   the table size (a chunk is at most `chunk_rows` rows);
3. turn each kept row into the text "table_name column value column value ..." over the table's
   columns minus the excluded ones, hadm_id, stay_id and the time column, skipping empty values, with
   itemid replaced by the item's label (numbers with more than 4 decimals are rounded to 4 as the
   reference tokenizer does);
4. intern the texts (one id per distinct text).

Rows with an empty hadm_id (labs ordered outside the hospital encounter, some microbiology) attach to
the subject's cohort admission whose [admittime, dischtime] contains the event time (the reference
drops them because it joins on hadm_id). Microbiology rows with only a chartdate have no time and are
dropped (counted). Rows whose time does not parse are counted as malformed, and so are selected rows
lost to an id that is not an integer (a malformed hadm_id; a malformed or missing subject_id where the
hadm_id is empty): they cannot be matched to the cohort.

`assemble` then gives each pair the events with t_prev <= t <= t_trg, sorted by (time, table order
in the filter file, row order in the file), keeping the last `max_events`.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import gc
import json
import os
import re
from typing import Sequence

import numpy as np
import pandas as pd

from data_prep.tables import (DEFAULT_CHUNK_ROWS, Counters, find_file, iter_chunks, parse_ids,
                              parse_times, read_table, require_columns)
from ehrxdiff_jax.errors import UserError

FILTERS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "event_filters.json")
ALWAYS_DROPPED = ("hadm_id", "stay_id")


def load_filters(path: str | None = None) -> dict:
  path = path or FILTERS_PATH
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise UserError(f"{path}: not a valid event filter file ({e}); fix it or leave out --filters") from None


@dataclasses.dataclass
class TableSpec:
  name: str                 # 'labevents'
  file: str                 # 'hosp/labevents'
  time: str
  exclude: tuple
  dictionary: str | None = None
  code: str | None = None
  label_column: str | None = None
  select: object = None
  order: int = 0


def table_specs(filters: dict, tables: Sequence[str] | None = None) -> list[TableSpec]:
  specs = []
  for i, (name, t) in enumerate(filters["tables"].items()):
    if tables is not None and name not in tables:
      continue
    specs.append(TableSpec(name=name, file=t["file"], time=t["time"], exclude=tuple(t.get("exclude", ())),
                           dictionary=t.get("dictionary"), code=t.get("code"),
                           label_column=t.get("label_column"), select=t.get("select"), order=i))
  return specs


def prescription_drugs(filters: dict) -> set[str]:
  p = filters["prescriptions"]
  names = list(p["antibiotic"]) + list(p["cardiac_lung"])
  return {n for n in names if "tobramycin" not in n.lower() and "coq10" not in n.lower()}


@dataclasses.dataclass
class Selection:
  """How the rows of one table are selected and labelled."""
  labels: dict | None = None         # code -> label text (itemid -> d_items / d_labitems label)
  codes: set | None = None           # allowed codes (None: all)
  column: str | None = None          # a row column ...
  values: set | None = None          # ... that must take one of these values


def selection(spec: TableSpec, mimic_iv: str, filters: dict, counters: Counters | None = None) -> Selection:
  """Dictionary lookups of a table. Dictionary selections: 'linksto' restricts (AND), the other
  dictionary columns are alternatives (OR), as in the reference (labevents: Blood Gas category OR a CRP
  label; chartevents: linksto == chartevents AND one of the categories)."""
  sel = Selection()
  if spec.dictionary:
    dcols = [spec.code, spec.label_column]
    sel_spec = spec.select if isinstance(spec.select, dict) else {}
    dict_keys = {k.split(".", 1)[1]: v for k, v in sel_spec.items() if "." in k}
    d = read_table(mimic_iv, spec.dictionary, list(dict.fromkeys(dcols + list(dict_keys))), counters)
    codes = parse_ids(d[spec.code], counters, spec.dictionary)
    d = d[codes.notna()].assign(_code=codes[codes.notna()].astype(np.int64))
    sel.labels = dict(zip(d["_code"], d[spec.label_column].fillna("")))
    if dict_keys:
      restrict = pd.Series(True, index=d.index)
      alt = pd.Series(False, index=d.index)
      for col, vals in dict_keys.items():
        hit = d[col].isin(list(vals))
        if col == "linksto":
          restrict &= hit
        else:
          alt |= hit
      sel.codes = set(d.loc[restrict & alt, "_code"].tolist())
  if isinstance(spec.select, dict):
    plain = {k: v for k, v in spec.select.items() if "." not in k}
    if spec.name == "prescriptions":
      sel.column, sel.values = "drug", prescription_drugs(filters)
    elif plain:
      (col, vals), = plain.items()
      sel.column, sel.values = col, set(vals)
  return sel


_LONG_DECIMAL = re.compile(r"\d*\.\d{5,}")


def _round4(s: pd.Series) -> pd.Series:
  mask = s.str.contains(_LONG_DECIMAL, na=False)
  if mask.any():
    s = s.copy()
    s[mask] = s[mask].str.replace(_LONG_DECIMAL, lambda m: str(round(float(m.group(0)), 4)), regex=True)
  return s


def event_texts(table: str, chunk: pd.DataFrame, columns: Sequence[str], labels: dict | None = None,
                code: str | None = None) -> pd.Series:
  """'table col value col value ...' over `columns` (in order), skipping empty values."""
  out = pd.Series(table, index=chunk.index, dtype=object)
  for col in columns:
    val = chunk[col]
    if code is not None and col == code and labels is not None:
      val = pd.to_numeric(val, errors="coerce").map(labels)
    val = val.astype("string").str.strip()
    val = _round4(val)
    piece = (" " + col + " " + val).where(val.notna() & (val != ""), "")
    out = out + piece.astype(object).fillna("")
  return out


@dataclasses.dataclass
class EventBlock:
  """Kept events of one table: parallel arrays + the table's distinct texts."""
  table: str
  order: int
  hadm: np.ndarray      # int64
  time: np.ndarray      # int64 seconds since epoch
  seq: np.ndarray       # int64 row number in the file
  text_id: np.ndarray   # int32 index into `texts`
  texts: list


def _seconds(t: pd.Series) -> np.ndarray:
  return t.values.astype("datetime64[s]").astype(np.int64)


def stream_table(mimic_iv: str, spec: TableSpec, filters: dict, win: pd.DataFrame,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, counters: Counters | None = None,
                 engine: str = "auto") -> EventBlock:
  """Stream one table and keep its events inside the cohort windows (see module docstring)."""
  counters = Counters() if counters is None else counters
  path = find_file(mimic_iv, spec.file)
  sel = selection(spec, mimic_iv, filters, counters)
  needed = ["subject_id", "hadm_id", spec.time] + ([spec.code] if spec.code else []) + (
      [sel.column] if sel.column else [])
  header = require_columns(path, list(dict.fromkeys(needed)))
  dropped = set(spec.exclude) | set(ALWAYS_DROPPED) | {spec.time}
  text_cols = [c for c in header if c not in dropped]
  usecols = list(dict.fromkeys(needed + text_cols))

  w = win.sort_values("hadm_id")
  w_hadm = w["hadm_id"].to_numpy(np.int64)
  w_start, w_end = _seconds(w["start"]), _seconds(w["end"])
  w_adm, w_dis = _seconds(w["admittime"]), _seconds(w["dischtime"])
  w_subj = w["subject_id"].to_numpy(np.int64)
  subjects = np.unique(w_subj)
  by_subject = pd.DataFrame({"subject_id": w_subj, "w_hadm": w_hadm, "lo": np.maximum(w_start, w_adm),
                             "hi": np.minimum(w_end, w_dis)})

  if not len(w_hadm):
    return EventBlock(spec.name, spec.order, *(np.zeros(0, t) for t in (np.int64, np.int64, np.int64, np.int32)), [])
  hadm_strs = set(w_hadm.astype(str).tolist())
  subject_strs = set(subjects.astype(str).tolist())
  code_strs = {str(c) for c in sel.codes} if sel.codes is not None else None
  intern: dict[str, int] = {}
  out_h, out_t, out_s, out_x = [], [], [], []
  offset = 0
  label = spec.file
  for chunk in iter_chunks(path, usecols, chunk_rows, counters, label, engine):
    # pandas objects of the previous chunk can sit in reference cycles (indexers, caches) that only a
    # full collection frees; collecting once per chunk keeps the peak memory at about one chunk.
    gc.collect()
    n = len(chunk)
    seq0 = offset
    offset += n
    counters[f"{spec.name}: rows read"] += n
    # Cheap filters first, on the id strings as they are in the file (MIMIC writes integer ids as
    # plain digits): item selection, then admission / subject membership in the cohort.
    keep = np.ones(n, dtype=bool)
    if sel.codes is not None:
      keep &= chunk[spec.code].isin(code_strs).to_numpy()
    if sel.values is not None:
      keep &= chunk[sel.column].isin(sel.values).to_numpy()
    h_col = chunk["hadm_id"]
    in_h_all = h_col.isin(hadm_strs).to_numpy()
    no_h_all = h_col.isna().to_numpy() & chunk["subject_id"].isin(subject_strs).to_numpy()
    lost = np.flatnonzero(keep & ~(in_h_all | no_h_all))
    _count_malformed_ids(h_col.iloc[lost], chunk["subject_id"].iloc[lost], spec.name, counters)
    keep &= in_h_all | no_h_all
    if not keep.any():
      continue
    idx = np.flatnonzero(keep)
    sub = chunk.iloc[idx]
    sub_in_h = in_h_all[idx]
    sub_h = np.where(sub_in_h, pd.to_numeric(sub["hadm_id"], errors="coerce").fillna(-1).to_numpy(), -1).astype(np.int64)
    subj_k = pd.to_numeric(sub["subject_id"], errors="coerce").fillna(-1).to_numpy().astype(np.int64)
    p = np.searchsorted(w_hadm, sub_h).clip(0, max(len(w_hadm) - 1, 0))
    tt = sub[spec.time]
    missing = tt.isna().to_numpy()
    if missing.any():
      counters[f"{spec.name}: rows without {spec.time} dropped"] += int(missing.sum())
    times = parse_times(tt, counters, label)
    ok = times.notna().to_numpy()
    secs = np.where(ok, times.values.astype("datetime64[s]").astype(np.int64), 0)
    # events with an admission: inside that admission's window
    inside = sub_in_h & ok & (secs >= w_start[p]) & (secs <= w_end[p])
    rows = [np.flatnonzero(inside)]
    hs = [sub_h[rows[0]]]
    # events with an empty hadm_id: attach by subject and time within [admittime, dischtime]
    nh = np.flatnonzero(~sub_in_h & ok)
    if len(nh):
      cand = pd.DataFrame({"r": nh, "subject_id": subj_k[nh], "t": secs[nh]}).merge(
          by_subject, on="subject_id")
      cand = cand[(cand["t"] >= cand["lo"]) & (cand["t"] <= cand["hi"])].drop_duplicates("r")
      counters[f"{spec.name}: events attached by subject and time (empty hadm_id)"] += len(cand)
      rows.append(cand["r"].to_numpy())
      hs.append(cand["w_hadm"].to_numpy(np.int64))
    r = np.concatenate(rows)
    if not len(r):
      continue
    texts = event_texts(spec.name, sub.iloc[r], text_cols, sel.labels, spec.code)
    ids = np.fromiter((intern.setdefault(s, len(intern)) for s in texts.tolist()), np.int32, len(r))
    out_h.append(np.concatenate(hs))
    out_t.append(secs[r])
    out_s.append(seq0 + idx[r])
    out_x.append(ids)
  counters[f"{spec.name}: events kept"] += int(sum(len(a) for a in out_h))
  cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
  return EventBlock(spec.name, spec.order, cat(out_h, np.int64), cat(out_t, np.int64),
                    cat(out_s, np.int64), cat(out_x, np.int32), list(intern))


def _count_malformed_ids(h: pd.Series, subject: pd.Series, table: str, counters: Counters) -> None:
  """Counts the selected rows (hadm_id, subject_id strings) left outside the cohort by a malformed id."""
  if not len(h):
    return
  bad_h = int((h.notna() & ~h.fillna("").str.isdecimal()).sum())
  bad_s = int((h.isna() & ~subject.fillna("").str.isdecimal()).sum())
  if bad_h:
    counters[f"{table}: rows with a malformed hadm_id dropped"] += bad_h
  if bad_s:
    counters[f"{table}: rows with an empty hadm_id and a malformed or missing subject_id dropped"] += bad_s


def _stream_job(args):
  mimic_iv, spec, filters, win, chunk_rows, engine = args
  c = Counters()
  block = stream_table(mimic_iv, spec, filters, win, chunk_rows, c, engine)
  return block, dict(c)


def stream_all(mimic_iv: str, filters: dict, win: pd.DataFrame, *, workers: int = 1,
               chunk_rows: int = DEFAULT_CHUNK_ROWS, counters: Counters | None = None,
               tables: Sequence[str] | None = None, engine: str = "auto") -> list[EventBlock]:
  """All tables; with workers > 1 the tables are streamed in parallel processes."""
  specs = table_specs(filters, tables)
  for spec in specs:  # fail early, before any long streaming, on a missing file or column
    require_columns(find_file(mimic_iv, spec.file), ["subject_id", "hadm_id", spec.time])
  jobs = [(mimic_iv, s, filters, win, chunk_rows, engine) for s in specs]
  # big tables first so that they overlap
  jobs.sort(key=lambda j: -os.path.getsize(find_file(mimic_iv, j[1].file)))
  if workers > 1:
    with cf.ProcessPoolExecutor(min(workers, len(jobs))) as ex:
      results = list(ex.map(_stream_job, jobs))
  else:
    results = [_stream_job(j) for j in jobs]
  blocks = []
  for block, c in results:
    if counters is not None:
      counters.update(c)
    blocks.append(block)
  return sorted(blocks, key=lambda b: b.order)


def merge_blocks(blocks: list[EventBlock]) -> tuple[pd.DataFrame, list[str]]:
  """One table of events sorted by (hadm, time, table order, seq) with global text ids."""
  texts: list[str] = []
  index: dict[str, int] = {}
  parts = []
  for b in blocks:
    remap = np.array([index.setdefault(t, len(index)) for t in b.texts], dtype=np.int32)
    parts.append(pd.DataFrame({"hadm": b.hadm, "time": b.time, "order": np.full(len(b.hadm), b.order, np.int16),
                               "seq": b.seq, "text_id": remap[b.text_id] if len(b.text_id) else b.text_id}))
  texts = list(index)
  ev = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
      {"hadm": [], "time": [], "order": [], "seq": [], "text_id": []})
  ev = ev.sort_values(["hadm", "time", "order", "seq"], kind="stable").reset_index(drop=True)
  return ev, texts


def assemble(pairs: pd.DataFrame, events: pd.DataFrame, max_events: int = 1024) -> tuple[list, np.ndarray]:
  """Per pair the text ids of its events (t_prev <= t <= t_trg, time order, last `max_events`).

  Returns (ids per pair as int32 arrays, number of events per pair before truncation)."""
  hadm = events["hadm"].to_numpy(np.int64)
  time = events["time"].to_numpy(np.int64)
  tid = events["text_id"].to_numpy(np.int32)
  starts = np.searchsorted(hadm, pairs["hadm_id"].to_numpy(np.int64), "left")
  ends = np.searchsorted(hadm, pairs["hadm_id"].to_numpy(np.int64), "right")
  t0 = pairs["prev_time"].values.astype("datetime64[s]").astype(np.int64)
  t1 = pairs["trg_time"].values.astype("datetime64[s]").astype(np.int64)
  ids, counts = [], np.zeros(len(pairs), np.int64)
  for i in range(len(pairs)):
    s, e = starts[i], ends[i]
    lo = s + np.searchsorted(time[s:e], t0[i], "left")
    hi = s + np.searchsorted(time[s:e], t1[i], "right")
    counts[i] = hi - lo
    ids.append(tid[max(lo, hi - max_events):hi])
  return ids, counts
