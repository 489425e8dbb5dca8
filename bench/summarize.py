"""Collects the JSON lines of bench/gpu.sh runs into one JSON file and prints a table."""
import json
import os
import platform
import sys

import jax

COLUMNS = ("samples_per_s", "images_per_s", "step_time_s", "time_per_denoising_step_s", "compile_time_s",
           "mfu", "peak_memory_gb")


def load(path):
  """The last JSON object printed by a run (benchmarks print their result as the final line)."""
  with open(path) as f:
    lines = [l for l in f.read().splitlines() if l.strip().startswith("{")]
  if not lines:
    return None
  try:
    return json.loads(lines[-1])
  except json.JSONDecodeError:
    return None


def main(run_dir, out_path):
  runs = {}
  for name in sorted(os.listdir(run_dir)):
    if name.endswith(".json"):
      runs[name[:-5]] = load(os.path.join(run_dir, name))
  result = {"host": platform.node(), "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
            "runs": runs}
  with open(out_path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"\n{'run':<40}" + "".join(f"{c:>22}" for c in COLUMNS))
  for name, r in runs.items():
    cells = []
    for c in COLUMNS:
      v = None if r is None else r.get(c)
      cells.append(f"{v:>22.4g}" if isinstance(v, (int, float)) else f"{'-' if r else 'failed':>22}")
    print(f"{name:<40}" + "".join(cells))
  print(f"\nwritten: {out_path}")
  return 0 if runs and all(r is not None for r in runs.values()) else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1], sys.argv[2]))
