"""`ehrxdiff bench` and bench/gpu.sh on CPU at the micro LDM of tests/test_parallel.py (via --config
overrides): the JSON fields are there, finite and consistent with each other; nothing is timed against a
threshold. The runs are real processes with one CPU device, as a user runs them; the persistent compile
cache lets gpu.sh's sampling run reuse the compile of the first test."""
import json
import math
import os
import subprocess
import sys

import pytest

from ehrxdiff_jax import cli
from micro import MICRO

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "configs/tiny.py"
OVERRIDES = [f"--config.{o}" for o in MICRO]
SAMPLE_ARGS = ["--batch", "2", "--steps", "2", "--repeats", "2", "--warmup", "1", "--json", *OVERRIDES]


def env(**extra):
  e = dict(os.environ)
  e.pop("XLA_FLAGS", None)  # one CPU device, not the 8 simulated ones of conftest.py
  e.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))
  e.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)
  return e


def positive(r, *keys):
  for k in keys:
    assert isinstance(r[k], (int, float)) and math.isfinite(r[k]) and r[k] > 0, (k, r[k])


@pytest.fixture(scope="module")
def sample_result():
  r = subprocess.run([sys.executable, "-m", "ehrxdiff_jax.cli", "bench", "sample", "--config", TINY, *SAMPLE_ARGS],
                     cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_bench_sample_fields(sample_result):
  r = sample_result
  assert (r["benchmark"], r["batch"], r["denoising_steps"], r["sampler"]) == ("sample", 2, 2, "ddim")
  positive(r, "images_per_s", "call_time_median_s", "first_call_s", "time_per_denoising_step_s", "decode_time_s",
           "flops_per_denoising_step_per_device", "flops_decode_per_device")
  assert math.isfinite(r["compile_time_s"]) and r["compile_time_s"] >= 0
  assert r["images_per_s"] == pytest.approx(r["batch"] / r["call_time_median_s"], rel=1e-9)
  # CPU: no peak FLOP/s and no allocator statistics; null, each with its reason.
  assert r["mfu"] is None and "cpu" in r["mfu_note"]
  assert r["peak_memory_bytes"] is None and "cpu" in r["peak_memory_note"]


def test_bench_sample_parts_add_up(sample_result):
  """The whole sampler call = the denoising steps + the decode (timed on their own) + the encode and the
  conditioner, which the parts leave out: the images/s the parts predict must be of the same order as the
  measured ones (loose: timings on shared cores are noisy), e.g. not steps x off."""
  r = sample_result
  predicted = r["batch"] / (r["denoising_steps"] * r["time_per_denoising_step_s"] + r["decode_time_s"])
  assert 0.1 < r["images_per_s"] / predicted < 2.0, (r["images_per_s"], predicted)


def test_bench_refuses_bad_counts(capsys):
  with pytest.raises(SystemExit, match="--steps and --repeats must be >= 1"):
    cli.main(["bench", "sample", "--config", os.path.join(ROOT, TINY), "--repeats", "0"])


def run_gpu_sh(tmp_path, configs):
  out = tmp_path / "bench.json"
  e = env(BENCH_CONFIGS=configs, BENCH_STEPS="2", BENCH_TRAIN_BATCH="2", BENCH_SAMPLE_STEPS="2",
          BENCH_SAMPLE_BATCH="2", BENCH_OVERRIDES=" ".join(OVERRIDES), BENCH_OUT=str(out), PYTHON=sys.executable,
          BENCH_RUN_TIMEOUT_S="800", BENCH_BUDGET_S="1600")
  r = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu.sh")], env=e, capture_output=True, text=True,
                     timeout=1800)
  return r, (json.loads(out.read_text()) if out.exists() else None)


def test_gpu_sh_on_cpu_keeps_going_after_a_failure(tmp_path):
  r, result = run_gpu_sh(tmp_path, f"configs/no_such_config.py {TINY}")
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  runs = result["runs"]
  assert sorted(runs) == ["0-sample-no_such_config", "0-train-no_such_config", "1-sample-tiny", "1-train-tiny"]
  for name in ("0-train-no_such_config", "0-sample-no_such_config"):
    assert runs[name]["error"] == "exit status 2" and any("no_such_config" in l for l in runs[name]["log_tail"])
  train, sample = runs["1-train-tiny"], runs["1-sample-tiny"]
  assert train["benchmark"] == "train" and train["global_batch"] == 2 and train["steps"] == 2
  positive(train, "samples_per_s", "step_time_median_s", "compile_time_s", "flops_per_step_per_device")
  assert math.isfinite(train["final_loss"])
  assert sample["benchmark"] == "sample" and sample["batch"] == 2 and sample["denoising_steps"] == 2
  positive(sample, "images_per_s", "time_per_denoising_step_s", "decode_time_s")
  table = {line.split()[0]: line for line in r.stdout.splitlines() if line.split()[:1] and line[0].isdigit()}
  assert "FAILED" in table["0-train-no_such_config"] and "FAILED" in table["0-sample-no_such_config"]
  # Each tiny row shows its headline figure as printed by summarize.py (4 significant digits).
  assert f"{train['samples_per_s']:.4g}" in table["1-train-tiny"]
  assert f"{sample['images_per_s']:.4g}" in table["1-sample-tiny"]


def test_gpu_sh_fails_when_every_run_fails(tmp_path):
  r, result = run_gpu_sh(tmp_path, "configs/no_such_config.py")
  assert r.returncode == 1
  assert set(result["runs"]) == {"0-train-no_such_config", "0-sample-no_such_config"}
  assert all("error" in run for run in result["runs"].values())
