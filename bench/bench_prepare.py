"""Streaming benchmark of the preprocessor's big-table path (labevents-like).

    python bench/bench_prepare.py [--rows 4000000,1000000] [--chunk-rows 250000] [--dir DIR]

Generates gzipped MIMIC-IV `hosp/labevents` tables (all 16 columns, ~10% Blood Gas items, 30% empty
hadm_id, 60k subjects) of each requested size plus a cohort of 3,000 admissions, then streams each
table with `data_prep.events.stream_table` in a fresh process and prints rows/s and that process's
peak RSS. Peak RSS should not grow with the table size (only with the chunk size and the cohort's
kept events).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data_prep.schema import MIMIC_COLUMNS  # noqa: E402

T0 = np.datetime64("2150-01-01T00:00:00", "s")
N_SUBJ, N_ADM = 60_000, 120_000
ADM_STEP = 20 * 365 * 86400 // N_ADM  # admissions spread over 20 years


def make_db(root: str, rows: int, seed: int = 0) -> str:
  iv = os.path.join(root, f"iv-{rows}")
  lab = os.path.join(iv, "hosp", "labevents.csv.gz")
  if os.path.exists(lab):
    return iv
  os.makedirs(os.path.join(iv, "hosp"), exist_ok=True)
  rng = np.random.default_rng(seed)
  items = pd.DataFrame({"itemid": np.arange(50800, 51000), "label": [f"item {i}" for i in range(200)],
                        "fluid": "Blood", "category": ["Blood Gas" if i % 10 == 0 else "Chemistry" for i in range(200)]})
  items.to_csv(os.path.join(iv, "hosp", "d_labitems.csv.gz"), index=False)
  cols = MIMIC_COLUMNS["hosp/labevents"]
  tmp = lab + ".tmp"
  with gzip.open(tmp, "wt", compresslevel=1, newline="") as f:
    f.write(",".join(cols) + "\n")
    done = 0
    while done < rows:
      n = min(500_000, rows - done)
      adm = rng.integers(0, N_ADM, n)
      t = T0 + (adm.astype(np.int64) * ADM_STEP + rng.integers(0, 3600 * 24 * 10, n)).astype("timedelta64[s]")
      hadm = (20_000_000 + adm).astype(str).astype(object)
      hadm[rng.random(n) < 0.3] = ""
      val = np.round(rng.normal(7.4, 0.5, n), 2)
      df = pd.DataFrame({
          "labevent_id": np.arange(done, done + n), "subject_id": 10_000_000 + adm // 2, "hadm_id": hadm,
          "specimen_id": rng.integers(1, 9_999_999, n), "itemid": rng.integers(50800, 51000, n),
          "order_provider_id": "P12345", "charttime": pd.Series(t).dt.strftime("%Y-%m-%d %H:%M:%S"),
          "storetime": pd.Series(t + np.timedelta64(3600, "s")).dt.strftime("%Y-%m-%d %H:%M:%S"),
          "value": val.astype(str), "valuenum": val, "valueuom": "units", "ref_range_lower": 7.35,
          "ref_range_upper": 7.45, "flag": np.where(val > 7.45, "abnormal", ""), "priority": "STAT",
          "comments": ""})
      df[cols].to_csv(f, header=False, index=False)
      done += n
  os.replace(tmp, lab)
  return iv


def cohort_windows(n: int = 3000, seed: int = 1) -> pd.DataFrame:
  rng = np.random.default_rng(seed)
  adm = np.sort(rng.choice(N_ADM, n, replace=False))
  start = T0 + (adm.astype(np.int64) * ADM_STEP + rng.integers(0, 3600 * 24 * 5, n)).astype("timedelta64[s]")
  end = start + rng.integers(3600, 48 * 3600, n).astype("timedelta64[s]")
  return pd.DataFrame({"hadm_id": 20_000_000 + adm, "subject_id": 10_000_000 + adm // 2,
                       "start": start.astype("datetime64[ns]"), "end": end.astype("datetime64[ns]"),
                       "admittime": (start - np.timedelta64(3600 * 24, "s")).astype("datetime64[ns]"),
                       "dischtime": (end + np.timedelta64(3600 * 24, "s")).astype("datetime64[ns]")})


def stream_only(iv: str, chunk_rows: int, engine: str = "pandas") -> None:
  from data_prep import events, tables
  filters = events.load_filters()
  spec = events.table_specs(filters, ["labevents"])[0]
  c = tables.Counters()
  t = time.perf_counter()
  block = events.stream_table(iv, spec, filters, cohort_windows(), chunk_rows, c, engine)
  dt = time.perf_counter() - t
  # VmHWM: peak RSS of this process image (ru_maxrss would carry the parent's peak over exec)
  with open("/proc/self/status") as f:
    rss_mb = next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
  print(json.dumps(dict(rows=c["labevents: rows read"], seconds=dt, kept=len(block.hadm),
                        distinct_texts=len(block.texts), peak_rss_mb=rss_mb)))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rows", default="4000000,1000000")
  ap.add_argument("--chunk-rows", type=int, default=250_000)
  ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "ehrxdiff_bench_prepare"))
  ap.add_argument("--engines", default="pandas,pyarrow")
  ap.add_argument("--stream-only", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--engine", default="pandas", help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.stream_only:
    return stream_only(a.stream_only, a.chunk_rows, a.engine)
  for rows in [int(x) for x in a.rows.split(",")]:
    t = time.perf_counter()
    iv = make_db(a.dir, rows)
    gen = time.perf_counter() - t
    size = os.path.getsize(os.path.join(iv, "hosp", "labevents.csv.gz"))
    for engine in a.engines.split(","):
      out = subprocess.run([sys.executable, __file__, "--stream-only", iv, "--chunk-rows", str(a.chunk_rows),
                            "--engine", engine], capture_output=True, text=True, check=True)
      r = json.loads(out.stdout.strip().splitlines()[-1])
      print(f"labevents-like {rows:>10,} rows ({size / 1e6:6.1f} MB gz, generated in {gen:5.1f}s) [{engine:>7}]: "
            f"{r['rows'] / r['seconds']:>10,.0f} rows/s, {r['seconds']:6.1f}s, peak RSS {r['peak_rss_mb']:7.1f} MB, "
            f"kept {r['kept']:,} events ({r['distinct_texts']:,} distinct texts), chunk {a.chunk_rows:,} rows",
            flush=True)


if __name__ == "__main__":
  main()
