"""The Chest ImaGenome image classifier (paper Table 2's diagnosis classifier) trained on our records:
evaluate/vit_classifier.ViTFindingClassifier (ViT-S/16 + one MLP head per finding), configs/image_classifier.py.

Examples: both images of every sample, I_prev with the previous labels and I_trg with the target labels
(a batch of B samples gives 2B examples). Images ([-1, 1], 3 channels, the pipeline's batch format) are
resized to the classifier's input size and ImageNet-normalised inside the jitted step
(`vit_classifier.imagenome_preprocess`). Loss: `vit_classifier.multilabel_bce`, the mean binary cross entropy
over the known labels (NaN = unknown is ignored). AdamW from the config (the loop's optimiser); weight
decay on the kernels only. Training ignores the labels of the Chest ImaGenome gold-set patients (batch entry
`imagenome_gold`, from the records' meta; `ehrxdiff prepare --chest-imagenome`), as the reference leaves them
out of its classifier's training split; validation and evaluation keep them.

Evaluation: `eval_metrics` gives, per validation batch, the loss, the accuracy and each finding's AUROC
within the batch's 2B examples (`auroc/<finding in snake case>`; NaN where the batch lacks one of the two classes, so
the loop's average is NaN for a finding that is single-class in any validation batch) and their mean
`auroc_macro` over the scorable findings. The exact numbers over a whole split come from
`evaluate_auroc(trainer, state, batches)` (per-label AUROC through evaluate.metrics).

`model.imagenome_classifier.task='demographics'` (configs/demographics_classifier.py) trains the same
backbone with age / sex / race heads instead (`DemographicsClassifierObjective`, paper Table 6); its
validation reports age Pearson r, sex AUROC and race macro one-vs-rest AUROC, and
`ehrxdiff evaluate --demographics-classifier RUN_DIR` reads it.

The trained run directory is what `ehrxdiff evaluate --classifier RUN_DIR` reads: `load_classifier(run_dir)`
rebuilds the network from RUN_DIR/config.json and restores the parameters of the latest checkpoint.
"""
from __future__ import annotations

import os
import re
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from ehrxdiff_jax import batch_format
from ehrxdiff_jax.evaluate import vit_classifier as V
from ehrxdiff_jax.evaluate.demographics import RACE_GROUPS, table6_metrics
from ehrxdiff_jax.nn.layers import compute_dtype
from ehrxdiff_jax.train.objective import Objective


TASKS = ("findings", "demographics")


def classifier_task(cfg) -> str:
  """`model.imagenome_classifier.task`: 'findings' (Chest ImaGenome, default) or 'demographics' (Table 6)."""
  task = str(cfg.model.imagenome_classifier.get("task", "findings"))
  if task not in TASKS:
    raise ValueError(f"model.imagenome_classifier.task={task!r}; expected one of {TASKS}")
  return task


def build_classifier(cfg) -> V.ViTEmbeddingModel:
  """The ViT of `cfg.model.imagenome_classifier` (finding heads, or demographic heads for
  task='demographics') with the config's dtype / attention / remat."""
  m = cfg.model.imagenome_classifier
  common = dict(
      image_size=int(m.image_size), patch_size=int(m.patch_size), width=int(m.width), layers=int(m.layers),
      heads=int(m.heads), mlp_ratio=float(m.mlp_ratio), n_last_blocks=int(m.n_last_blocks),
      avgpool_patchtokens=bool(m.get("avgpool_patchtokens", False)),
      dtype=compute_dtype(cfg.model.dtype), attention=cfg.model.attention, remat=cfg.model.remat)
  if classifier_task(cfg) == "demographics":
    return V.ViTDemographicsClassifier(num_races=len(RACE_GROUPS), **common)
  return V.ViTFindingClassifier(num_findings=int(m.num_findings), **common)


def batch_auroc(scores: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-column AUROC [L] of scores [N, L] against labels [N, L] (1 / 0 / NaN) by pair counting (ties
  count 1/2, as evaluate.metrics.roc_auc); NaN for a column without both classes. jit-friendly, O(N^2 L)."""
  s = scores.astype(jnp.float32).T          # [L, N]
  y = labels.astype(jnp.float32).T
  known = ~jnp.isnan(y)
  pos = known & (y == 1.0)
  neg = known & (y == 0.0)
  diff = s[:, :, None] - s[:, None, :]       # [L, i, j] = s_i - s_j
  win = jnp.where(diff > 0, 1.0, jnp.where(diff == 0, 0.5, 0.0))
  pairs = pos[:, :, None] & neg[:, None, :]
  u = jnp.sum(jnp.where(pairs, win, 0.0), axis=(1, 2))
  n = jnp.sum(pos, axis=1).astype(jnp.float32) * jnp.sum(neg, axis=1).astype(jnp.float32)
  return jnp.where(n > 0, u / jnp.maximum(n, 1.0), jnp.nan)


class ImageClassifierObjective(Objective):
  name = "image_classifier"
  trainable_keys = None
  ema_keys = ()

  def __init__(self, cfg):
    super().__init__(cfg)
    self.model = build_classifier(cfg)
    self.num_findings = int(cfg.model.imagenome_classifier.num_findings)
    names = list(V.IMAGENOME_FINDINGS)
    if len(names) != self.num_findings:
      names = [f"finding_{i}" for i in range(self.num_findings)]
    self.finding_names = names
    self.metric_names = [re.sub(r"[^a-z0-9]+", "_", n.lower()).strip("_") for n in self.finding_names]

  # ---------------------------------------------------------------- network
  def init_params(self, rng):
    s = self.model.image_size
    return self.model.init(rng, jnp.zeros((1, s, s, self.model.in_channels), jnp.float32))["params"]

  def logits(self, params, images) -> jax.Array:
    """[B, H, W, C] images in [-1, 1] -> [B, F] logits (resize + ImageNet normalisation included)."""
    x = V.imagenome_preprocess(images, self.model.image_size)
    return self.model.apply({"params": params}, x).astype(jnp.float32)

  def probabilities(self, params, images) -> jax.Array:
    return V.finding_probabilities(self.logits(params, images))

  def examples(self, batch) -> tuple[jax.Array, jax.Array]:
    """(images [2B, H, W, 3], labels [2B, F]): the previous images then the targets with their labels."""
    images = jnp.concatenate([batch["prev_image"], batch["target_image"]], axis=0)
    labels = jnp.concatenate([batch["prev_labels"], batch["target_labels"]], axis=0).astype(jnp.float32)
    if labels.shape[-1] != self.num_findings:
      raise ValueError(f"the batch carries {labels.shape[-1]} labels per image, the classifier has "
                       f"{self.num_findings} findings: train it on the Chest ImaGenome labels "
                       "(data.labels='imagenome'; `ehrxdiff prepare --labels chexpert,imagenome`)")
    return images, labels

  # ---------------------------------------------------------------- objective
  def loss(self, params, batch, rng, train: bool):
    del rng  # no dropout in the network; no augmentation
    images, labels = self.examples(batch)
    if train:  # the reference trains without the Chest ImaGenome gold-set patients: their labels count as unknown
      gold = jnp.concatenate([batch["imagenome_gold"]] * 2, axis=0)
      labels = jnp.where(gold[:, None], jnp.nan, labels)
    logits = self.logits(params, images)
    loss = V.multilabel_bce(logits, labels)
    known = ~jnp.isnan(labels)
    correct = jnp.where(known, (logits > 0) == (labels > 0.5), False)
    return loss, {"accuracy": jnp.sum(correct) / jnp.maximum(jnp.sum(known), 1)}

  def eval_metrics(self, params, ema_params, batch, rng):
    del ema_params, rng
    images, labels = self.examples(batch)
    logits = self.logits(params, images)
    known = ~jnp.isnan(labels)
    correct = jnp.where(known, (logits > 0) == (labels > 0.5), False)
    aucs = batch_auroc(logits, labels)
    scorable = ~jnp.isnan(aucs)
    mean = jnp.sum(jnp.where(scorable, aucs, 0.0)) / jnp.maximum(jnp.sum(scorable), 1)
    macro = jnp.where(jnp.any(scorable), mean, jnp.nan)
    out = {"loss": V.multilabel_bce(logits, labels),
           "accuracy": jnp.sum(correct) / jnp.maximum(jnp.sum(known), 1), "auroc_macro": macro}
    for k, name in enumerate(self.metric_names):
      out[f"auroc/{name}"] = aucs[k]
    return out

  def weight_decay_mask(self):
    """Decay the weight matrices / conv kernels only (not biases, norms, position embedding, CLS token),
    as timm / DINO do for ViTs."""
    def mask(params):
      return jax.tree_util.tree_map_with_path(
          lambda path, _: str(getattr(path[-1], "key", path[-1])) == "kernel", params)
    return mask

  def dummy_batch(self, batch_size):
    s = int(self.cfg.data.image_size)
    f = self.num_findings
    return {"prev_image": np.zeros((batch_size, s, s, 3), np.float32),
            "target_image": np.zeros((batch_size, s, s, 3), np.float32),
            "prev_labels": np.zeros((batch_size, f), np.float32),
            "target_labels": np.zeros((batch_size, f), np.float32),
            "imagenome_gold": np.zeros((batch_size,), bool)}


class DemographicsClassifierObjective(ImageClassifierObjective):
  """task='demographics': age (MSE on the standardised age), sex (BCE) and race group (softmax CE) of the
  admission, predicted from each of its two images (batch keys `age`, `sex`, `race` of the pipeline,
  evaluate/demographics.encode_meta; unknown values are ignored). Validation: Pearson r of the age,
  sex AUROC and race macro one-vs-rest AUROC over `train.eval_batches` validation batches."""

  def __init__(self, cfg):
    Objective.__init__(self, cfg)
    self.model = build_classifier(cfg)
    m = cfg.model.imagenome_classifier
    self.age_mean, self.age_std = float(m.get("age_mean", 65.0)), float(m.get("age_std", 17.0))
    self.race_names = list(RACE_GROUPS)

  def outputs(self, params, images) -> dict:
    """Raw head outputs {'age' (standardised), 'sex' (logit), 'race' (logits)} of [B, H, W, C] images."""
    x = V.imagenome_preprocess(images, self.model.image_size)
    return self.model.apply({"params": params}, x)

  def predict(self, params, images) -> dict:
    """{'age' [B] years, 'sex' [B] P(male), 'race' [B, R] probabilities} of images in [-1, 1]."""
    out = self.outputs(params, images)
    return {"age": out["age"].astype(jnp.float32) * self.age_std + self.age_mean,
            "sex": jax.nn.sigmoid(out["sex"].astype(jnp.float32)),
            "race": jax.nn.softmax(out["race"].astype(jnp.float32), axis=-1)}

  def examples(self, batch) -> tuple[jax.Array, dict]:
    """(images [2B, ...]: I_prev then I_trg, labels {'age_z', 'sex', 'race'} [2B]): both images of a sample
    belong to the same admission, so they share its demographics."""
    images = jnp.concatenate([batch["prev_image"], batch["target_image"]], axis=0)
    twice = lambda x: jnp.concatenate([x, x], axis=0)  # noqa: E731
    age_z = (batch["age"].astype(jnp.float32) - self.age_mean) / self.age_std
    return images, {"age_z": twice(age_z), "sex": twice(batch["sex"].astype(jnp.float32)),
                    "race": twice(batch["race"].astype(jnp.int32))}

  def loss(self, params, batch, rng, train: bool):
    del rng, train
    images, y = self.examples(batch)
    return V.demographics_loss(self.outputs(params, images), y["age_z"], y["sex"], y["race"])

  def eval_metrics(self, params, ema_params, batch, rng):
    del ema_params, rng
    images, y = self.examples(batch)
    out = self.outputs(params, images)
    loss, parts = V.demographics_loss(out, y["age_z"], y["sex"], y["race"])
    age_ok, sex_ok, race_ok = ~jnp.isnan(y["age_z"]), ~jnp.isnan(y["sex"]), y["race"] >= 0
    return {"loss": loss, **parts,
            "age_mae_years": V.masked_mean(jnp.abs(out["age"] - y["age_z"]) * self.age_std, age_ok),
            "sex_accuracy": V.masked_mean(((out["sex"] > 0) == (y["sex"] > 0.5)).astype(jnp.float32), sex_ok),
            "race_accuracy": V.masked_mean((jnp.argmax(out["race"], -1) == y["race"]).astype(jnp.float32), race_ok)}

  def check_data(self, data_dir: str, split: str, probe: int = 256) -> None:
    """Refuses a dataset prepared without age/sex/race in the record meta (before they were
    recorded), which would otherwise train on nothing but unknowns."""
    from ehrxdiff_jax import pipeline
    from ehrxdiff_jax.evaluate.demographics import has_demographics
    src = pipeline.data_source(data_dir, split)
    n = min(len(src), probe)
    if not any(has_demographics(src[i]["meta"]) for i in range(n)):
      from ehrxdiff_jax.errors import UserError
      raise UserError(f"the {split!r} records of {data_dir} carry no age/sex/race (first {n} checked): "
                      "re-run `ehrxdiff prepare` (it records them) to train the demographics classifier")

  def validation_report(self, trainer, state, batches):
    """Table 6's numbers on the validation split: age_r, sex_auroc, race_auroc."""
    pred, labels = demographics_predictions(trainer, state, batches, int(self.cfg.train.eval_batches))
    return table6_metrics(labels["age"], labels["sex"], labels["race"], pred["age"], pred["sex"],
                          pred["race"]), {}

  def dummy_batch(self, batch_size):
    s = int(self.cfg.data.image_size)
    return {"prev_image": np.zeros((batch_size, s, s, 3), np.float32),
            "target_image": np.zeros((batch_size, s, s, 3), np.float32),
            "age": np.zeros((batch_size,), np.float32), "sex": np.zeros((batch_size,), np.float32),
            "race": np.zeros((batch_size,), np.int32)}


def make_objective(cfg) -> ImageClassifierObjective:
  if classifier_task(cfg) == "demographics":
    return DemographicsClassifierObjective(cfg)
  return ImageClassifierObjective(cfg)


# ------------------------------------------------------------------ whole-split evaluation


def _predictions(trainer, state, batches: Iterable[dict], num_batches: int | None, predict, labels_of):
  """([predict(params, examples) per batch], [labels_of(host batch) per batch]) over `batches`, the
  prediction jitted on the trainer's mesh; the examples are both images of every sample."""
  obj = trainer.objective
  fn = jax.jit(lambda p, b: predict(p, obj.examples(batch_format.to_device(b))[0]),
               in_shardings=(trainer.state_shardings.params, trainer.batch_sharding),
               out_shardings=trainer.replicated)
  preds, labels = [], []
  for i, host in enumerate(batches):
    if num_batches is not None and i >= num_batches:
      break
    dev = trainer.put_batch(host)
    with jax.set_mesh(trainer.mesh):
      preds.append(jax.device_get(fn(state.params, dev)))
    labels.append(labels_of(host))
  return preds, labels


def evaluate_auroc(trainer, state, batches: Iterable[dict], num_batches: int | None = None,
                   weighting: str = "positives") -> dict:
  """Per-label AUROC (and macro / weighted macro) of the classifier over `batches` (host batches of the
  pipeline), on both images of every sample. Returns evaluate.metrics.per_label_auroc's dict plus
  'macro', 'weighted_macro', 'label_names', 'n' (examples)."""
  from ehrxdiff_jax.evaluate import metrics
  obj = trainer.objective
  preds, labels = _predictions(
      trainer, state, batches, num_batches, obj.probabilities,
      lambda host: np.concatenate([host["prev_labels"], host["target_labels"]]).astype(np.float64))
  scores, labels = np.concatenate([np.asarray(p) for p in preds]), np.concatenate(labels)
  out = metrics.per_label_auroc(labels, scores)
  out["macro"], out["weighted_macro"] = metrics.macro_averages(out, weighting)
  out["label_names"] = list(obj.finding_names)
  out["n"] = int(scores.shape[0])
  return out


def demographics_predictions(trainer, state, batches: Iterable[dict], num_batches: int | None = None):
  """(predictions, labels) of a demographics classifier over `batches`, both images of every sample:
  {'age' years, 'sex' P(male), 'race' probabilities} and {'age', 'sex', 'race'} as numpy [2N] / [2N, R]."""
  preds, labels = _predictions(trainer, state, batches, num_batches, trainer.objective.predict,
                               lambda host: {k: np.concatenate([host[k], host[k]]) for k in ("age", "sex", "race")})
  cat = lambda d: {k: np.concatenate([x[k] for x in d]) for k in d[0]}  # noqa: E731
  return cat(preds), cat(labels)


# ------------------------------------------------------------------ loading a trained run


def run_config(run_dir: str):
  """The ConfigDict saved by `ehrxdiff train` in RUN_DIR/config.json, checked to be an image_classifier run."""
  from ehrxdiff_jax.config_util import read_saved_config
  cfg = read_saved_config(run_dir)
  objective = cfg.get("train", {}).get("objective")
  if objective != "image_classifier":
    raise ValueError(f"{run_dir} is a run of train.objective={objective!r}, not an image_classifier run "
                     "(train one with `ehrxdiff train --config configs/image_classifier.py`)")
  return cfg


def load_classifier(run_dir: str, step: int | None = None):
  """(objective, params, meta) of the latest (or `step`) checkpoint of an image_classifier run, restored
  onto one device (the first) whatever mesh it was trained on."""
  from ehrxdiff_jax import parallel
  from ehrxdiff_jax.train.checkpoint import Checkpointer
  from ehrxdiff_jax.train.loop import Trainer
  cfg = run_config(run_dir)
  cfg.mesh.shape.update(data=1, fsdp=1, tensor=1)
  cfg.train.grad_accum = 1
  cfg.train.batch_size = 1
  objective = make_objective(cfg)
  mesh = parallel.make_mesh(cfg, jax.devices()[:1])
  trainer = Trainer(cfg, objective, mesh)
  ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), keep=0)
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"no complete checkpoint in {ckpt.directory}")
    state, meta = ckpt.restore(trainer.abstract_state(), step)
  finally:
    ckpt.close()
  return objective, state.params, dict(meta, step=int(jax.device_get(state.step)))
