"""Table 6: the race grouping, the demographic labels of a record, the metrics against scipy / sklearn, the
demographic classifier's loss and its objective (training, validation report), and the one shared ViT."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from ehrxdiff_jax import batch_format
from ehrxdiff_jax.config_util import load_config
from ehrxdiff_jax.evaluate import demographics as D
from ehrxdiff_jax.evaluate import vit_classifier as V
from ehrxdiff_jax.train import image_classifier as IC

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "demographics_classifier.py") + ":tiny"


def test_race_grouping():
  group = {raw: D.RACE_GROUPS[g] if g >= 0 else None for raw in (
      "WHITE", "WHITE - OTHER EUROPEAN", "PORTUGUESE", "BLACK/AFRICAN AMERICAN", "BLACK/CAPE VERDEAN",
      "ASIAN - CHINESE", "ASIAN", "HISPANIC/LATINO - PUERTO RICAN", "HISPANIC OR LATINO", "SOUTH AMERICAN",
      "OTHER", "AMERICAN INDIAN/ALASKA NATIVE", "MULTIPLE RACE/ETHNICITY", "UNKNOWN", "UNABLE TO OBTAIN",
      "PATIENT DECLINED TO ANSWER", "", None) for g in [D.race_group(raw)]}
  assert group == {
      "WHITE": "WHITE", "WHITE - OTHER EUROPEAN": "WHITE", "PORTUGUESE": "WHITE",
      "BLACK/AFRICAN AMERICAN": "BLACK", "BLACK/CAPE VERDEAN": "BLACK", "ASIAN - CHINESE": "ASIAN", "ASIAN": "ASIAN",
      "HISPANIC/LATINO - PUERTO RICAN": "HISPANIC/LATINO", "HISPANIC OR LATINO": "HISPANIC/LATINO",
      "SOUTH AMERICAN": "HISPANIC/LATINO", "OTHER": "OTHER", "AMERICAN INDIAN/ALASKA NATIVE": "OTHER",
      "MULTIPLE RACE/ETHNICITY": "OTHER", "UNKNOWN": None, "UNABLE TO OBTAIN": None,
      "PATIENT DECLINED TO ANSWER": None, "": None, None: None}


def test_encode_meta():
  e = D.encode_meta({"key": "k", "age": 71.5, "sex": "F", "race": "ASIAN - KOREAN"})
  assert (float(e["age"]), float(e["sex"]), int(e["race"])) == (71.5, 0.0, D.RACE_GROUPS.index("ASIAN"))
  assert e["age"].dtype == np.float32 and e["race"].dtype == np.int32
  assert float(D.encode_meta({"sex": "M"})["sex"]) == 1.0
  missing = D.encode_meta({"key": "k"})   # records written before the demographics: unknown, no error
  assert np.isnan(missing["age"]) and np.isnan(missing["sex"]) and int(missing["race"]) == -1
  assert D.has_demographics({"key": "k", "age": 1.0}) and not D.has_demographics({"key": "k"})


def test_table6_metrics_match_scipy_sklearn():
  rng = np.random.default_rng(7)
  n = 200
  age = rng.uniform(20, 90, n)
  age[:5] = np.nan                                   # unknown ages are dropped from the correlation
  age_pred = np.nan_to_num(age, nan=50.0) + rng.normal(0, 20, n)
  sex = (rng.random(n) < 0.5).astype(float)
  sex[5:9] = np.nan
  sex_score = rng.random(n) + 0.4 * np.nan_to_num(sex)
  race = rng.integers(-1, 5, n)
  logits = rng.normal(size=(n, 5)) + 1.5 * np.eye(5)[np.clip(race, 0, 4)]
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  got = D.table6_metrics(age, sex, race, age_pred, sex_score, probs)
  k = ~np.isnan(age)
  assert got["age_r"] == pytest.approx(stats.pearsonr(age_pred[k], age[k])[0], abs=1e-12)
  k = ~np.isnan(sex)
  assert got["sex_auroc"] == pytest.approx(roc_auc_score(sex[k], sex_score[k]), abs=1e-12)
  k = race >= 0
  ref = roc_auc_score(race[k], probs[k], average="macro", multi_class="ovr", labels=list(range(5)))
  assert got["race_auroc"] == pytest.approx(ref, abs=1e-12)


def test_demographics_loss_matches_numpy():
  rng = np.random.default_rng(1)
  b = 6
  out = {"age": rng.normal(size=b).astype(np.float32), "sex": rng.normal(size=b).astype(np.float32),
         "race": rng.normal(size=(b, 5)).astype(np.float32)}
  age_z = rng.normal(size=b).astype(np.float32)
  age_z[1] = np.nan
  sex = np.array([1, 0, np.nan, 1, 0, 0], np.float32)
  race = np.array([0, 4, -1, 2, 2, -1], np.int32)
  total, parts = V.demographics_loss({k: jnp.asarray(v) for k, v in out.items()}, age_z, sex, race)
  k = ~np.isnan(age_z)
  mse = np.mean((out["age"][k] - age_z[k]) ** 2)
  k = ~np.isnan(sex)
  p = 1 / (1 + np.exp(-out["sex"][k].astype(np.float64)))
  bce = -np.mean(sex[k] * np.log(p) + (1 - sex[k]) * np.log(1 - p))
  logp = out["race"] - np.log(np.exp(out["race"].astype(np.float64)).sum(1, keepdims=True))
  k = race >= 0
  ce = -np.mean(logp[k, race[k]])
  assert float(parts["age_mse"]) == pytest.approx(mse, rel=1e-5)
  assert float(parts["sex_bce"]) == pytest.approx(bce, rel=1e-5)
  assert float(parts["race_ce"]) == pytest.approx(ce, rel=1e-5)
  assert float(total) == pytest.approx(mse + bce + ce, rel=1e-5)
  none = V.demographics_loss(out, np.full(b, np.nan, np.float32), np.full(b, np.nan, np.float32),
                             np.full(b, -1, np.int32))[0]
  assert float(none) == 0.0   # nothing known: no signal, not NaN


def test_config_and_task():
  cfg = load_config(TINY)
  assert cfg.train.objective == "image_classifier" and cfg.model.imagenome_classifier.task == "demographics"
  assert cfg.model.imagenome_classifier.image_size == 64 and cfg.evaluate.demographics_classifier == ""
  paper = load_config(os.path.join(ROOT, "configs", "demographics_classifier.py"))
  assert paper.model.imagenome_classifier.width == 384 and paper.model.imagenome_classifier.patch_size == 16
  with pytest.raises(ValueError, match="variant"):
    load_config(os.path.join(ROOT, "configs", "demographics_classifier.py") + ":huge")
  with pytest.raises(ValueError, match="task"):
    IC.make_objective(load_config(TINY, ["--config.model.imagenome_classifier.task=age"]))


def test_findings_and_demographics_classifiers_share_the_one_vit():
  """Both classifiers are nn/vit.VisionTransformer (timm form) + heads: same backbone parameter tree,
  the CLIP block's parameter names."""
  kw = dict(image_size=32, patch_size=8, width=32, layers=2, heads=2, n_last_blocks=2)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  init = lambda m: nn.meta.unbox(jax.eval_shape(m.init, jax.random.key(0), x))["params"]  # noqa: E731
  find = init(V.ViTFindingClassifier(num_findings=3, **kw))
  demo = init(V.ViTDemographicsClassifier(**kw))
  shapes = lambda t: jax.tree.map(lambda a: a.shape, t)  # noqa: E731
  assert shapes(find["vit"]) == shapes(demo["vit"]) and shapes(find["norm"]) == shapes(demo["norm"])
  assert set(find["vit"]["blocks_0"]) == {"ln_1", "attn", "ln_2", "fc1", "fc2"}
  assert "ln_pre" not in find["vit"] and "bias" in find["vit"]["patch_embed"]   # timm: no ln_pre, patch bias
  assert set(demo) == {"vit", "norm", "head_age", "head_sex", "head_race"}
  assert shapes(demo["head_race"])["fc3"]["kernel"] == (32, len(D.RACE_GROUPS))


def test_objective_trains_and_validation_report_is_table6():
  from ehrxdiff_jax import parallel
  from ehrxdiff_jax.train.loop import Trainer
  cfg = load_config(TINY)
  obj = IC.make_objective(cfg)
  assert isinstance(obj, IC.DemographicsClassifierObjective)
  trainer = Trainer(cfg, obj, parallel.make_mesh(cfg))
  state = trainer.init_state()
  rng = np.random.default_rng(0)
  b = batch_format.host_template(obj.dummy_batch(8))   # a host batch: uint8 grey images
  for k in ("prev_image", "target_image"):
    b[k] = rng.integers(0, 256, b[k].shape, dtype=np.uint8)
  b["age"] = rng.uniform(20, 90, 8).astype(np.float32)
  b["age"][0] = np.nan
  b["sex"] = np.array([0, 1] * 4, np.float32)
  b["race"] = np.array([0, 1, 2, 3, 4, -1, 0, 1], np.int32)
  dev = trainer.put_batch(b)
  losses = []
  for _ in range(6):
    state, m = trainer.train_step(state, dev)
    losses.append(float(m["loss"]))
  assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
  ev = jax.device_get(trainer.eval_step(state, dev, jax.random.key(0)))
  assert {"loss", "age_mse", "sex_bce", "race_ce", "age_mae_years", "sex_accuracy", "race_accuracy"} <= set(ev)
  # the validation report = Table 6's metrics of the objective's predictions on both images of each sample
  scalars, images = obj.validation_report(trainer, state, [b])
  params = jax.device_get(state.params)
  both = batch_format.device_images(np.concatenate([b["prev_image"], b["target_image"]]))
  pred = jax.device_get(jax.jit(obj.predict)(params, both))
  twice = {k: np.concatenate([b[k], b[k]]) for k in ("age", "sex", "race")}
  want = D.table6_metrics(twice["age"], twice["sex"], twice["race"], pred["age"], pred["sex"], pred["race"])
  assert set(scalars) == {"age_r", "sex_auroc", "race_auroc"} and images == {}
  for k, v in want.items():
    assert scalars[k] == pytest.approx(v, rel=1e-5), k
  np.testing.assert_allclose(pred["race"].sum(-1), 1.0, rtol=1e-5)
  assert np.all((pred["sex"] > 0) & (pred["sex"] < 1))
