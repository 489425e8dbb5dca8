"""`ehrxdiff demo --out DIR`: the whole pipeline end to end on the embedded synthetic database, on CPU.

    synthetic MIMIC database (400 patients) -> prepare -> CLIP pretraining -> VAE training -> prepare
    again with cached VAE latents -> LDM training (configs/demo.py: conditioner from the CLIP run, VAE
    from the VAE run) -> findings and demographics image classifiers -> both table-classifier baselines
    -> sampling (two seeds, and one with the events removed) -> evaluation report (Table 2 with every
    row of the paper, Tables 3/6, FID, in-domain FID, SSIM, figure)

Every stage is one `ehrxdiff` subcommand, printed before it runs, so the demo doubles as a worked example.
A second invocation with the same --out resumes: finished stages are skipped and the training runs
continue from their latest checkpoints up to --steps-scale times their step counts. --fresh deletes DIR
first. DIR/timings.json holds every stage's wall time.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import time

from ehrxdiff_jax import cli
from ehrxdiff_jax.errors import UserError

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")

# (workdir name, config, steps, extra overrides) of the training stages after the LDM, in order.
CLASSIFIERS = (
    ("image_classifier", "image_classifier.py:tiny", 1500, ["--config.train.batch_size=32"]),
    ("demographics_classifier", "demographics_classifier.py:tiny", 600, []),
    ("table_classifier", "table_classifier.py:demo", 300, []),
    ("table_classifier_prev_label", "table_classifier.py:demo_prev_label", 300, []),
)
NO_EVENTS_ROW = "EHRXDiff (no events)"


def add_arguments(parser):
  parser.add_argument("--out", required=True, help="demo directory (database, dataset, runs, samples, report)")
  parser.add_argument("--patients", type=int, default=400, help="synthetic patients")
  parser.add_argument("--seed", type=int, default=0,
                      help="database, split, training and sampling seed (samples use SEED and SEED+1)")
  parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every training stage's steps")
  parser.add_argument("--fresh", action="store_true", help="delete --out first and start over")
  parser.add_argument("--overwrite", action="store_true", help="alias of --fresh")


class _Stages:
  """Runs `ehrxdiff` subcommands in process and records their wall times in timings.json."""

  def __init__(self, out: str):
    self.path = os.path.join(out, "timings.json")
    self.timings = json.load(open(self.path)) if os.path.exists(self.path) else {}

  def run(self, name: str, argv: list[str]) -> None:
    print(f"\n$ ehrxdiff {shlex.join(argv)}", flush=True)
    start = time.time()
    code = cli.main(argv)
    if code:
      raise SystemExit(f"demo stage {name} failed (exit {code}): ehrxdiff {shlex.join(argv)}")
    self.timings[name] = round(time.time() - start, 1)
    print(f"  ({self.timings[name]:.0f} s)", flush=True)
    with open(self.path, "w") as f:
      json.dump(self.timings, f, indent=1)


def _latent_scale_factor(data: str) -> float:
  """1 / std of the dataset's cached latents (the LDM rule: unit-variance latents for the diffusion)."""
  with open(os.path.join(data, "manifest.json")) as f:
    latents = json.load(f).get("latents") or {}
  if "mean_std" not in latents:
    raise UserError(f"{data}/manifest.json: no latents.mean_std; re-run prepare with --vae-checkpoint")
  return 1.0 / float(latents["mean_std"][1])


def run(args) -> int:
  out = os.path.abspath(args.out)
  if (args.fresh or args.overwrite) and os.path.exists(out):
    shutil.rmtree(out)
  os.makedirs(out, exist_ok=True)
  db, runs, cache = (os.path.join(out, d) for d in ("db", "runs", "cache"))
  data, data_latents = os.path.join(out, "data"), os.path.join(out, "data_latents")
  stages = _Stages(out)
  seed = int(args.seed)
  begin = time.time()

  def steps(n):
    return str(max(1, int(n * args.steps_scale)))

  def train(name, config, n, extra=(), dataset=data):
    stages.run(name, ["train", "--config", os.path.join(CONFIGS, config), "--data", dataset,
                      "--workdir", os.path.join(runs, name), "--steps", steps(n), f"--config.seed={seed}",
                      *extra])

  if not os.path.exists(os.path.join(db, "mimic-cxr")):
    stages.run("demo-data", ["demo-data", "--out", db, "--patients", str(args.patients), "--seed", str(seed)])
  prepare = ["prepare", "--mimic-iv", os.path.join(db, "mimic-iv"), "--mimic-cxr", os.path.join(db, "mimic-cxr"),
             "--chest-imagenome", os.path.join(db, "chest-imagenome"), "--image-size", "64",
             "--event-dim", "256", "--max-events", "64", "--split-fractions", "0.8,0.08,0.12",
             "--seed", str(seed), "--cache-dir", cache]
  if not os.path.exists(os.path.join(data, "manifest.json")):
    stages.run("prepare", prepare + ["--out", data])

  train("clip", "clip.py:demo", 150)
  train("vae", "vae.py:demo", 300)
  if not os.path.exists(os.path.join(data_latents, "manifest.json")):
    stages.run("prepare_latents", prepare + ["--out", data_latents, "--vae-checkpoint", os.path.join(runs, "vae")])
  train("ldm", "demo.py", 1500, [f"--config.train.init_from={os.path.join(runs, 'clip')}",
                                 f"--config.train.vae_from={os.path.join(runs, 'vae')}",
                                 f"--config.diffusion.scale_factor={_latent_scale_factor(data_latents)}"],
        dataset=data_latents)
  for name, config, n, extra in CLASSIFIERS:
    init = [f"--config.train.init_from={os.path.join(runs, 'clip')}"] if name.startswith("table") else []
    train(name, config, n, extra + init)

  generated, no_events = os.path.join(out, "generated"), os.path.join(out, "generated_no_events")
  sample = ["sample", "--checkpoint", os.path.join(runs, "ldm"), "--data", data, "--split", "test", "--overwrite"]
  stages.run("sample", sample + ["--out", generated, "--seeds", f"{seed},{seed + 1}"])
  stages.run("sample_no_events", sample + ["--out", no_events, "--seeds", str(seed), "--events", "none"])
  report = os.path.join(out, "report")
  stages.run("evaluate", [
      "evaluate", "--generated", f"EHRXDiff={generated}", "--generated", f"{NO_EVENTS_ROW}={no_events}",
      "--table-classifier", os.path.join(runs, "table_classifier"),
      "--table-classifier-prev-label", os.path.join(runs, "table_classifier_prev_label"),
      "--classifier", os.path.join(runs, "image_classifier"),
      "--demographics-classifier", os.path.join(runs, "demographics_classifier"),
      "--data", data, "--split", "test", "--out", report,
      "--config", os.path.join(CONFIGS, "image_classifier.py:tiny"), "--overwrite"])
  stages.timings["total_this_invocation"] = round(time.time() - begin, 1)
  with open(stages.path, "w") as f:
    json.dump(stages.timings, f, indent=1)
  print(f"\ndemo done in {time.time() - begin:.0f} s: samples in {generated} (grid.png), "
        f"report in {os.path.join(report, 'report.md')} (figure.png), stage times in {stages.path}")
  return 0
