"""Collects the runs of bench/gpu.sh into one JSON file and prints a table.

    python bench/summarize.py RUN_DIR OUT_JSON

RUN_DIR holds, per run NAME: NAME.json (the run's stdout; benchmarks print their result as the last
line), NAME.log (its stderr) and NAME.rc (its exit status, 124 when the timeout stopped it, or 'skipped').
A run without a result is recorded as {"error": ..., "log_tail": ...}. Exit status: 0 when at least one
run gave a result, 1 when none did (so that a broken environment fails loudly).
"""
import json
import math
import os
import platform
import sys

# (JSON key, column header, scale): the figures of BENCHMARKS.md, train and sample rows side by side.
COLUMNS = (("samples_per_s", "samples/s", 1), ("images_per_s", "images/s", 1),
           ("step_time_median_s", "train step s", 1), ("time_per_denoising_step_s", "denoise step s", 1),
           ("decode_time_s", "decode s", 1), ("compile_time_s", "compile s", 1), ("mfu", "MFU", 1),
           ("peak_memory_bytes", "peak GiB", 2.0 ** -30))


def last_json(path):
  """The last JSON object printed to `path`, or None."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    lines = [l for l in f.read().splitlines() if l.strip().startswith("{")]
  for line in reversed(lines):
    try:
      return json.loads(line)
    except json.JSONDecodeError:
      continue
  return None


def read_run(run_dir, name):
  result = last_json(os.path.join(run_dir, name + ".json"))
  if result is not None:
    return result
  rc_path = os.path.join(run_dir, name + ".rc")
  rc = open(rc_path).read().strip() if os.path.exists(rc_path) else "?"
  log_path = os.path.join(run_dir, name + ".log")
  tail = open(log_path).read().splitlines()[-20:] if os.path.exists(log_path) else []
  error = {"skipped": "skipped: the time budget was spent", "124": "timed out"}.get(rc, f"exit status {rc}")
  return {"error": error, "log_tail": tail}


def cell(value, scale):
  if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
    return f"{value * scale:.4g}"
  return "-"


def main(run_dir, out_path):
  names = sorted({f.rsplit(".", 1)[0] for f in os.listdir(run_dir) if f.endswith((".json", ".rc"))})
  runs = {name: read_run(run_dir, name) for name in names}
  import jax  # after the runs: the host's view, for the record
  result = {"host": platform.node(), "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
            "runs": runs}
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  with open(out_path, "w") as f:
    json.dump(result, f, indent=2)
  width = max([len(n) for n in names] + [3]) + 2
  print(f"\n{'run':<{width}}" + "".join(f"{h:>16}" for _, h, _ in COLUMNS))
  for name, r in runs.items():
    if "error" in r:
      print(f"{name:<{width}}FAILED: {r['error']}")
    else:
      print(f"{name:<{width}}" + "".join(f"{cell(r.get(k), s):>16}" for k, _, s in COLUMNS))
  failed = [n for n, r in runs.items() if "error" in r]
  print(f"\nwritten: {out_path}; {len(runs) - len(failed)} of {len(runs)} runs gave a result")
  if failed:
    print(f"failed: {' '.join(failed)}", file=sys.stderr)
  return 0 if len(failed) < len(runs) else 1


if __name__ == "__main__":
  if len(sys.argv) != 3:
    sys.exit(__doc__)
  sys.exit(main(sys.argv[1], sys.argv[2]))
