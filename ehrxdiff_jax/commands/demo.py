"""`ehrxdiff demo --out DIR`: the whole pipeline end to end on the embedded synthetic database, on CPU.

    synthetic MIMIC database -> prepare -> CLIP pretraining -> VAE training -> LDM training (conditioner
    from the CLIP run, VAE from the VAE run) -> findings and demographics image classifiers -> sampling
    (DDIM) -> evaluation report (Tables 2/3/6, FID, LPIPS, SSIM)

Every stage is one `ehrxdiff` subcommand, printed before it runs, so the demo doubles as a worked example.
A second invocation with the same --out resumes: finished stages are skipped and the training runs
continue from their latest checkpoints up to --steps-scale times their step counts (so the loss keeps
falling). --fresh deletes DIR first.
"""
from __future__ import annotations

import os
import shlex
import shutil
import time

from ehrxdiff_jax import cli

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")

# (workdir name, config, steps) of the training stages, in order. Step counts keep the whole demo within
# minutes on 2 CPU cores while letting each loss fall visibly.
TRAINING = (
    ("clip", "clip.py:tiny", 150),
    ("vae", "vae.py:tiny", 25),  # ~2 s per step on 2 cores (the discriminator doubles the work)
    ("ldm", "tiny.py", 300),
    ("image_classifier", "image_classifier.py:tiny", 80),
    ("demographics_classifier", "demographics_classifier.py:tiny", 80),
)


def add_arguments(parser):
  parser.add_argument("--out", required=True, help="demo directory (database, dataset, runs, samples, report)")
  parser.add_argument("--patients", type=int, default=40, help="synthetic patients")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every training stage's steps")
  parser.add_argument("--fresh", action="store_true", help="delete --out first and start over")
  parser.add_argument("--overwrite", action="store_true", help="alias of --fresh")
  parser.add_argument("--seeds", default="0,1", help="sampling seeds")


def _run(argv: list[str]) -> None:
  print(f"\n$ ehrxdiff {shlex.join(argv)}", flush=True)
  start = time.time()
  code = cli.main(argv)
  if code:
    raise SystemExit(f"demo stage failed (exit {code}): ehrxdiff {shlex.join(argv)}")
  print(f"  ({time.time() - start:.0f} s)", flush=True)


def run(args) -> int:
  out = os.path.abspath(args.out)
  if (args.fresh or args.overwrite) and os.path.exists(out):
    shutil.rmtree(out)
  os.makedirs(out, exist_ok=True)
  db, data, runs = os.path.join(out, "db"), os.path.join(out, "data"), os.path.join(out, "runs")
  begin = time.time()

  if not os.path.exists(os.path.join(db, "mimic-cxr")):
    _run(["demo-data", "--out", db, "--patients", str(args.patients), "--seed", str(args.seed)])
  if not os.path.exists(os.path.join(data, "manifest.json")):
    _run(["prepare", "--mimic-iv", os.path.join(db, "mimic-iv"), "--mimic-cxr", os.path.join(db, "mimic-cxr"),
          "--chest-imagenome", os.path.join(db, "chest-imagenome"), "--out", data, "--image-size", "64",
          "--event-dim", "64", "--max-events", "32", "--split-fractions", "0.7,0.15,0.15", "--seed", str(args.seed)])

  for name, config, steps in TRAINING:
    argv = ["train", "--config", os.path.join(CONFIGS, config), "--data", data,
            "--workdir", os.path.join(runs, name), "--steps", str(max(1, int(steps * args.steps_scale)))]
    if name == "ldm":
      argv += [f"--config.train.init_from={os.path.join(runs, 'clip')}",
               f"--config.train.vae_from={os.path.join(runs, 'vae')}"]
    _run(argv)

  generated = os.path.join(out, "generated")
  _run(["sample", "--checkpoint", os.path.join(runs, "ldm"), "--data", data, "--split", "test",
        "--out", generated, "--seeds", args.seeds, "--overwrite"])
  report = os.path.join(out, "report")
  _run(["evaluate", "--generated", generated, "--data", data, "--split", "test", "--out", report,
        "--classifier", os.path.join(runs, "image_classifier"),
        "--demographics-classifier", os.path.join(runs, "demographics_classifier"),
        "--config", os.path.join(CONFIGS, "image_classifier.py:tiny"), "--overwrite"])
  print(f"\ndemo done in {time.time() - begin:.0f} s: samples in {generated} (grid.png), "
        f"report in {os.path.join(report, 'report.md')} (figure.png)")
  return 0
