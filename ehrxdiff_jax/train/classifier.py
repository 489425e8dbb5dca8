"""The table-classifier baselines of the paper (Tables 2/3): predict the 10 target labels from the events
alone, or from the events plus the previous labels ("w/ previous label"); the reference's
evaluation/baseline/table_classifier.py.

Model (`TableClassifier`):
  tokens = events [B, E, D] (+ one prev-label token in front, its mask True)
  h      = the CLIP table tower's transformer encoder: nn/table.TableTower with project=False (2 post-LN
           layers, no positional encoding; the CLIP checkpoint's layers load as they are; the tower's output
           Linear `fc` is NOT part of the classifier, as in the reference)
  logits = head(pool(h)), pool = 'mean' over valid tokens (default) or 'reference_sum' (the reference's
           sum over every slot, padding included, divided by the valid count); head: Linear D -> 10
Prev-label token: 10 learnable D-dim label embeddings (`label_embs`, N(0, 1) init as torch.randn)
combined over the positive previous labels (label == 1; NaN/unknown and 0 are not positive):
  'positives' (default, the paper's wording): their mean;  'all' (the reference's code): their sum / 10,
  i.e. the mean over all 10 slots of prev_label * embedding.
A sample with no positive previous label gets the zero vector as its token (both modes; the reference
gives the same). The token is always attended (mask True).

Loss: BCE with logits averaged over the known (non-NaN) target labels only (the reference fills unknown
training labels with 0 instead; our pipeline marks them NaN). AdamW lr 1e-4, weight decay 0.01
(configs/table_classifier.py). Initialisation: `train.init_from` = a CLIP run (its table-tower layers).

Evaluation: `eval_metrics` gives per-batch loss / accuracy for the loop; the paper's numbers (per-label
and weighted-macro AUROC in All / Same / Diff) need the whole split: `evaluate_auroc(trainer, state,
batches)` collects the probabilities and calls `evaluate.metrics.grouped_auroc`.
"""
from __future__ import annotations

from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ehrxdiff_jax import batch_format, models
from ehrxdiff_jax.nn.layers import Dense, compute_dtype, partitioned
from ehrxdiff_jax.nn.table import TableTower, pool_tokens
from ehrxdiff_jax.nn.vit import as_dtype
from ehrxdiff_jax.train.objective import Objective

PREV_AVERAGES = ("positives", "all")


def prev_label_token(prev_labels: jax.Array, label_embs: jax.Array, average: str = "positives") -> jax.Array:
  """[B, L] previous labels (1 / 0 / NaN), [L, D] embeddings -> [B, D] token (zero without positives)."""
  if average not in PREV_AVERAGES:
    raise ValueError(f"unknown prev-label average {average!r}; expected one of {PREV_AVERAGES}")
  pos = (jnp.nan_to_num(prev_labels.astype(jnp.float32), nan=0.0) == 1.0).astype(jnp.float32)
  total = jnp.matmul(pos, label_embs.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  if average == "all":
    return total / label_embs.shape[0]
  return total / jnp.maximum(jnp.sum(pos, axis=1, keepdims=True), 1.0)


class TableClassifier(nn.Module):
  """Parameters: {'table_tower': {layer_i}, 'head', 'label_embs' (only with prev_label)}."""
  event_dim: int = 1536
  heads: int = 24
  ff_dim: int = 6144
  layers: int = 2
  dropout: float = 0.1
  attention_dropout: float = 0.1
  num_labels: int = 10
  prev_label: bool = False
  prev_average: str = "positives"
  pool: str = "mean"
  dtype: Any = jnp.float32
  attention: str = "auto"
  remat: str = "none"

  def tokens(self, events, event_mask, prev_labels, label_embs):
    """The encoder input: [prev-label token,] events; and its mask."""
    event_mask = jnp.asarray(event_mask, bool)
    if not self.prev_label:
      return events, event_mask
    tok = prev_label_token(prev_labels, label_embs, self.prev_average).astype(events.dtype)
    x = jnp.concatenate([tok[:, None, :], events], axis=1)
    mask = jnp.concatenate([jnp.ones((events.shape[0], 1), bool), event_mask], axis=1)
    return x, mask

  @nn.compact
  def __call__(self, events, event_mask, prev_labels=None, deterministic: bool = True):
    label_embs = None
    if self.prev_label:
      if prev_labels is None:
        raise ValueError("the w/ previous label classifier needs prev_labels")
      label_embs = self.param("label_embs", partitioned(nn.initializers.normal(1.0), (None, "embed")),
                              (self.num_labels, self.event_dim), jnp.float32)
    x, mask = self.tokens(events, event_mask, prev_labels, label_embs)
    h = TableTower(event_dim=self.event_dim, heads=self.heads, ff_dim=self.ff_dim, layers=self.layers,
                   dropout=self.dropout, attention_dropout=self.attention_dropout, project=False, dtype=self.dtype,
                   attention=self.attention, remat=self.remat, name="table_tower")(x, mask, deterministic)
    pooled = pool_tokens(h, mask, self.pool)
    return Dense(self.num_labels, ("embed", None), dtype=as_dtype(self.dtype), name="head")(pooled).astype(jnp.float32)


def masked_bce(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean BCE-with-logits over the non-NaN labels, number of such labels): the image classifiers' loss
  (evaluate/vit_classifier.multilabel_bce) plus the count."""
  from ehrxdiff_jax.evaluate.vit_classifier import multilabel_bce
  return multilabel_bce(logits, labels), jnp.sum((~jnp.isnan(labels)).astype(jnp.float32))


class TableClassifierObjective(Objective):
  name = "table_classifier"
  trainable_keys = None
  ema_keys = ()

  def __init__(self, cfg):
    super().__init__(cfg)
    t, tt = cfg.train, cfg.model.table_tower
    self.num_labels = int(t.get("num_labels", 10))
    self.model = TableClassifier(
        event_dim=tt.event_dim, heads=tt.heads, ff_dim=tt.ff_dim, layers=tt.layers, dropout=tt.dropout,
        attention_dropout=tt.attention_dropout,
        num_labels=self.num_labels, prev_label=bool(t.get("classifier_prev_label", False)),
        prev_average=str(t.get("classifier_prev_average", "positives")),
        pool=str(t.get("classifier_pool", "mean")), dtype=compute_dtype(cfg.model.dtype),
        attention=cfg.model.attention, remat=cfg.model.remat)
    if self.model.prev_average not in PREV_AVERAGES:
      raise ValueError(f"unknown train.classifier_prev_average {self.model.prev_average!r}")

  def init_params(self, rng):
    b = models.dummy_batch(self.cfg, 1)
    return self.model.init(rng, b["events"], b["event_mask"], jnp.zeros((1, self.num_labels)))["params"]

  def init_from(self, state, path: str, trainer=None):
    """`train.init_from` (commands/train.py, after init_state): the CLIP run's table-tower layers."""
    from ehrxdiff_jax.train.clip import clip_init_state
    return clip_init_state(state, path, part=None, table_encoder_only=True)

  def logits(self, params, batch, rng=None, train: bool = False):
    return self.model.apply({"params": params}, batch["events"], batch["event_mask"], batch.get("prev_labels"),
                            deterministic=not train, rngs={"dropout": rng} if train else {})

  def loss(self, params, batch, rng, train: bool):
    logits = self.logits(params, batch, rng, train)
    labels = batch["target_labels"].astype(jnp.float32)
    loss, n = masked_bce(logits, labels)
    valid = ~jnp.isnan(labels)
    correct = jnp.where(valid, (logits > 0) == (labels > 0.5), False)
    return loss, {"accuracy": jnp.sum(correct) / jnp.maximum(n, 1.0)}

  def validation_report(self, trainer, state, batches: Iterable[dict]):
    """Whole-split grouped AUROC (All / Same / Diff) at each validation."""
    return split_metrics(trainer, state, batches), {}

  def dummy_batch(self, batch_size):
    cfg = self.cfg
    e, d = cfg.model.conditioner.max_events, cfg.model.table_tower.event_dim
    out = {"events": np.zeros((batch_size, e, d), np.float32), "event_mask": np.ones((batch_size, e), bool)}
    out["prev_labels"] = np.zeros((batch_size, self.num_labels), np.float32)
    out["target_labels"] = np.zeros((batch_size, self.num_labels), np.float32)
    return out


def make_objective(cfg) -> TableClassifierObjective:
  return TableClassifierObjective(cfg)


# ------------------------------------------------------------------ evaluation over a split


def predict_fn(trainer):
  """A jitted (params, global batch) -> probabilities [B, L] on the trainer's mesh."""
  obj = trainer.objective
  fn = jax.jit(lambda p, b: jax.nn.sigmoid(obj.logits(p, batch_format.to_device(b))),
               in_shardings=(trainer.state_shardings.params, trainer.batch_sharding),
               out_shardings=trainer.replicated)

  def run(params, batch):
    with jax.set_mesh(trainer.mesh):
      return fn(params, batch)
  return run


def evaluate_auroc(trainer, state, batches: Iterable[dict], num_batches: int | None = None,
                   weighting: str = "samples") -> dict:
  """Per-label and (weighted-)macro AUROC in the All / Same / Diff groups over `batches` (host batches
  with target_labels and prev_labels): `evaluate.metrics.grouped_auroc` of the predicted probabilities.
  Single process: the batches are global batches. Returns grouped_auroc's dict plus 'n' samples."""
  from ehrxdiff_jax.evaluate import metrics
  run = predict_fn(trainer)
  keys = set(trainer.objective.dummy_batch(1))
  scores, target, prev = [], [], []
  for i, host in enumerate(batches):
    if num_batches is not None and i >= num_batches:
      break
    dev = trainer.put_batch({k: v for k, v in host.items() if k in keys})
    scores.append(np.asarray(jax.device_get(run(state.params, dev))))
    target.append(np.asarray(host["target_labels"], np.float64))
    prev.append(np.asarray(host["prev_labels"], np.float64))
  scores, target, prev = np.concatenate(scores), np.concatenate(target), np.concatenate(prev)
  out = metrics.grouped_auroc(scores, target, prev, weighting=weighting)
  out["n"] = int(scores.shape[0])
  return out


def flat_auroc(result: dict) -> dict:
  """Scalars of an `evaluate_auroc` result for the metric writer: auroc_{group}_{macro,weighted_macro}
  and auroc_{group}_{label index}."""
  out = {}
  for g in ("all", "same", "diff"):
    out[f"auroc_{g}_macro"] = float(result[g]["macro"])
    out[f"auroc_{g}_weighted_macro"] = float(result[g]["weighted_macro"])
    for j, v in enumerate(np.asarray(result[g]["auroc"]).ravel()):
      out[f"auroc_{g}_{j}"] = float(v)
  return out


def split_metrics(trainer, state, batches: Iterable[dict], num_batches: int | None = None) -> dict:
  """The classifier's validation numbers over `num_batches` batches (default cfg.train.eval_batches):
  `flat_auroc(evaluate_auroc(...))`. Single process (the AUROC needs every row on one host)."""
  n = int(trainer.cfg.train.eval_batches) if num_batches is None else num_batches
  return flat_auroc(evaluate_auroc(trainer, state, batches, num_batches=n))
