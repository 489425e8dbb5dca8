"""Reading the MIMIC CSV files: locate (.csv.gz or .csv), check columns, read small tables whole and
stream big ones in bounded chunks, counting malformed rows and timestamps.

Errors name the file and the column: a missing file raises `FileNotFoundError`, a missing column or a
file that does not read to its end (a truncated or corrupt .csv.gz) raises `SchemaError`.
"""
from __future__ import annotations

import collections
import csv
import gzip
import hashlib
import os
import re
import warnings
import zlib
from typing import Iterator, Sequence

import pandas as pd

from ehrxdiff_jax.errors import UserError

DEFAULT_CHUNK_ROWS = 1_000_000


class SchemaError(UserError):
  """A required column is missing from an input file, or the file cannot be read to its end."""


# What a truncated or corrupt (gzip) CSV raises part-way through reading.
_UNREADABLE = (EOFError, OSError, zlib.error, UnicodeDecodeError, pd.errors.ParserError)


def _unreadable(path: str, e: Exception) -> SchemaError:
  return SchemaError(f"{path}: truncated or corrupt, cannot read it to its end ({type(e).__name__}: {e}); "
                     "download or extract it again (`gzip -t` checks a .csv.gz)")


class Counters(collections.Counter):
  """Named counts of dropped / malformed things, reported at the end of `prepare`."""


def find_file(root: str, name: str) -> str:
  """`root/name.csv.gz` or `root/name.csv`; FileNotFoundError naming both candidates."""
  base = os.path.join(root, *name.split("/"))
  for suffix in (".csv.gz", ".csv", ""):
    if suffix == "" and not name.endswith((".csv", ".gz")):
      continue
    if os.path.isfile(base + suffix):
      return base + suffix
  raise FileNotFoundError(f"missing input file: {base}.csv.gz (or {base}.csv)")


def read_header(path: str, sep: str = ",") -> list[str]:
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rt", newline="") as f:
      return next(csv.reader(f, delimiter=sep))
  except StopIteration:
    raise SchemaError(f"{path}: empty file (no header row)") from None
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise SchemaError(f"{path}: unreadable ({e})") from None


def require_columns(path: str, needed: Sequence[str], sep: str = ",") -> list[str]:
  """Header of `path`; SchemaError naming the file and the first missing column."""
  header = read_header(path, sep)
  missing = [c for c in needed if c not in header]
  if missing:
    raise SchemaError(f"{path}: missing column {missing[0]!r}"
                      + (f" (and {missing[1:]})" if len(missing) > 1 else ""))
  return header


def _read_kwargs(usecols, sep=","):
  # Everything as strings: ids stay exact, empty fields become NaN; bad lines (a wrong number of
  # fields) are skipped with a ParserWarning that we count. All columns are parsed (pandas does not
  # check the field count of a line when `usecols` is given) and the wanted ones selected afterwards.
  return dict(sep=sep, dtype=object, keep_default_na=False, na_values=[""],
              on_bad_lines="warn", engine="c", low_memory=True)


_SKIP_RE = re.compile(r"Skipping line \d+")


def _count_bad(caught, counters: Counters | None, label: str):
  if counters is None:
    return
  for w in caught:
    counters[f"{label}: malformed rows"] += len(_SKIP_RE.findall(str(w.message)))


def read_table(root: str, name: str, columns: Sequence[str], counters: Counters | None = None) -> pd.DataFrame:
  """A small table read whole (columns checked first)."""
  path = find_file(root, name)
  require_columns(path, columns)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      df = pd.read_csv(path, **_read_kwargs(columns))
    except _UNREADABLE as e:
      raise _unreadable(path, e) from None
  _count_bad(caught, counters, name)
  return df[list(columns)]


def _pyarrow_chunks(path, columns, chunk_rows, counters, label, sep):
  import pyarrow as pa
  import pyarrow.csv as pacsv
  bad = [0]

  def on_bad(row):
    bad[0] += 1
    return "skip"

  header = read_header(path, sep)
  try:
    reader = pacsv.open_csv(
        path, read_options=pacsv.ReadOptions(block_size=max(1 << 20, chunk_rows * 128), use_threads=False),
        parse_options=pacsv.ParseOptions(delimiter=sep, invalid_row_handler=on_bad,
                                           newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(include_columns=list(columns),
                                             column_types={c: pa.string() for c in header},
                                             strings_can_be_null=True, quoted_strings_can_be_null=True))
  except (pa.ArrowInvalid, *_UNREADABLE) as e:
    raise _unreadable(path, e) from None
  while True:
    try:
      batch = reader.read_next_batch()
    except StopIteration:
      break
    except (pa.ArrowInvalid, *_UNREADABLE) as e:
      raise _unreadable(path, e) from None
    if counters is not None and bad[0]:
      counters[f"{label}: malformed rows"] += bad[0]
      bad[0] = 0
    yield batch.to_pandas()[list(columns)]
  if counters is not None and bad[0]:
    counters[f"{label}: malformed rows"] += bad[0]


def _pandas_chunks(path, columns, chunk_rows, counters, label, sep):
  try:
    reader = pd.read_csv(path, chunksize=chunk_rows, **_read_kwargs(columns, sep))
  except _UNREADABLE as e:
    raise _unreadable(path, e) from None
  with reader:
    while True:
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
          chunk = next(reader)
        except StopIteration:
          chunk = None
        except _UNREADABLE as e:
          raise _unreadable(path, e) from None
      _count_bad(caught, counters, label)
      if chunk is None:
        return
      yield chunk[list(columns)]


def iter_chunks(path: str, columns: Sequence[str], chunk_rows: int = DEFAULT_CHUNK_ROWS,
                counters: Counters | None = None, label: str = "", engine: str = "auto",
                sep: str = ",") -> Iterator[pd.DataFrame]:
  """Stream `path` in chunks of about `chunk_rows` rows (memory bounded by the chunk, not the file).

  engine: 'pandas' (C parser; the default: measured peak memory flat in the table size) or 'pyarrow'
  (about 2.5x faster, but its read-ahead buffering was measured to grow the peak memory with the table
  size: 290 MB at 0.5 M rows, 755 MB at 6 M rows; see bench/bench_prepare.py). 'auto' reads the
  environment variable EHRXDIFF_CSV_ENGINE (default pandas). Both count lines with a wrong number of
  fields as malformed and skip them; all values are strings, empty fields missing. `sep`: the field
  separator ('\t' for the tab-separated Chest ImaGenome files)."""
  require_columns(path, columns, sep)
  if engine == "auto":
    engine = os.environ.get("EHRXDIFF_CSV_ENGINE", "pandas")
  if engine not in ("pandas", "pyarrow"):
    raise ValueError(f"unknown CSV engine {engine!r}: pandas | pyarrow")
  gen = _pyarrow_chunks if engine == "pyarrow" else _pandas_chunks
  yield from gen(path, columns, chunk_rows, counters, label or path, sep)


def parse_times(values: pd.Series, counters: Counters | None = None, label: str = "") -> pd.Series:
  """'YYYY-MM-DD HH:MM:SS' strings -> datetime64[ns]; empty -> NaT; unparsable -> NaT and counted."""
  out = pd.to_datetime(values, errors="coerce", format="%Y-%m-%d %H:%M:%S")
  bad = out.isna() & values.notna()
  if bad.any():
    # Some exports carry fractional seconds or only a date: try the flexible parser on those.
    retry = pd.to_datetime(values[bad], errors="coerce", format="mixed")
    out = out.copy()
    out[bad] = retry
  # years outside what datetime64[ns] holds (1678-2261) are malformed too
  out = out.where(out.isna() | ((out.dt.year > 1678) & (out.dt.year < 2261)))
  bad = out.isna() & values.notna()
  if counters is not None and bad.any():
    counters[f"{label}: malformed timestamps"] += int(bad.sum())
  return out.astype("datetime64[ns]")


def parse_ids(values: pd.Series, counters: Counters | None = None, label: str = "") -> pd.Series:
  """Integer ids as nullable Int64 (empty -> <NA>); non-numeric ids counted as malformed."""
  num = pd.to_numeric(values, errors="coerce")
  bad = num.isna() & values.notna()
  if counters is not None and bad.any():
    counters[f"{label}: malformed ids"] += int(bad.sum())
  return num.round().astype("Int64")


def fingerprint(path: str) -> dict:
  """Cheap input fingerprint: size, mtime and a hash of the first and last MiB."""
  st = os.stat(path)
  h = hashlib.sha1()
  with open(path, "rb") as f:
    h.update(f.read(1 << 20))
    if st.st_size > 2 << 20:
      f.seek(-(1 << 20), os.SEEK_END)
      h.update(f.read(1 << 20))
  return dict(path=os.path.abspath(path), bytes=st.st_size, mtime=int(st.st_mtime), sha1_head_tail=h.hexdigest())
