"""The table-classifier baselines (paper Tables 2/3): the CLIP table tower's encoder + a linear head to the
10 Chest ImaGenome labels, BCE, AdamW 1e-4 (weight decay 0.01), initialised from the CLIP run.

    ehrxdiff train --config configs/table_classifier.py --data DIR --workdir runs/tabcls \
        --config.train.init_from=runs/clip
    ehrxdiff train --config configs/table_classifier.py:prev_label ...      # "w/ previous label"
    ehrxdiff train --config configs/table_classifier.py:tiny ...            # CPU demo / tests
    ehrxdiff train --config configs/table_classifier.py:tiny_prev_label ...
    ehrxdiff train --config configs/table_classifier.py:demo[_prev_label] ...  # configs/demo.py's tower

Options (train.*):
  init_from                 a CLIP workdir (its table-tower layers initialise the encoder; '' = random)
  classifier_prev_label     prepend the prev-label token (10 learnable event_dim-d label embeddings)
  classifier_prev_average   'positives' (mean over the positive previous labels, the paper) | 'all' (the
                            reference code: sum over the positives / 10); no positive label -> zero token
  classifier_pool           'mean' (over valid tokens) | 'reference_sum' (the reference's sum over all
                            slots, padding included, / valid count)
Metrics: per-label and weighted-macro AUROC in All / Same / Diff (train/classifier.evaluate_auroc).
"""
from configs import base, demo, tiny

VARIANTS = ("", "prev_label", "tiny", "tiny_prev_label", "demo", "demo_prev_label")


def get_config(arg: str | None = None):
  arg = arg or ""
  if arg not in VARIANTS:
    raise ValueError(f"unknown table_classifier variant {arg!r}; expected one of {VARIANTS}")
  small = arg.startswith(("tiny", "demo"))
  c = demo.get_config() if arg.startswith("demo") else tiny.get_config() if small else base.get_config()
  c.name = "table_classifier" + (f"_{arg}" if arg else "")
  t = c.train
  t.objective = "table_classifier"
  t.learning_rate = 1e-4
  t.weight_decay = 0.01
  t.b1, t.b2, t.eps = 0.9, 0.999, 1e-8      # torch AdamW defaults, as the reference
  t.schedule = "constant"
  t.num_labels = 10
  t.classifier_prev_label = arg.endswith("prev_label")
  t.classifier_prev_average = "positives"
  t.classifier_pool = "mean"
  if small:
    t.batch_size = 16
    t.num_steps = 100
    t.learning_rate = 1e-3
    t.log_every = 10
    t.eval_every = 50
    t.ckpt_every = 50
    if arg.startswith("demo"):
      c.data.cached_latents = False  # events only
      t.num_steps = 300
      t.log_every = 25
      t.eval_every = 150
      t.ckpt_every = 150
  else:
    t.batch_size = 128
    t.num_steps = 20_000
    t.eval_every = 1000
    t.ckpt_every = 1000
  return c
