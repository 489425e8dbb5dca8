"""`ehrxdiff sample` and `ehrxdiff convert` end to end on a synthetic EHRXDiff checkpoint (reference key
names, tests/test_import.py) and a small prepared dataset (64 px, event dim 64, max events 32)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from data_prep import write  # noqa: E402
from ehrxdiff_jax import images_io  # noqa: E402
from ehrxdiff_jax import records as rec  # noqa: E402
from ehrxdiff_jax.cli import main  # noqa: E402
from ehrxdiff_jax.interop import ehrxdiff as ex  # noqa: E402
from ehrxdiff_jax.interop.clip import export_openai_visual, export_table_tower  # noqa: E402
from ehrxdiff_jax.interop.vae import export_ldm_vae  # noqa: E402

from test_import import SMALL, ROOT, random_params, save_ckpt, small_config  # noqa: E402

S, D, E = 64, 64, 32   # image size, event dim, max events (configs/tiny.py)
N = 10                 # samples in the test split: batch 8 -> one full and one padded batch
TINY = os.path.join(ROOT, "configs", "tiny.py")
OVERRIDES = [f"--config.{o}" for o in SMALL]
FAST = ["--steps", "2", "--seeds", "0,3", "--batch", "8", "--no-progress"]


def make_dataset(out, n=N, size=S, dim=D, max_events=E, split="test", schema=rec.SCHEMA_VERSION):
  """n records (key p{i}_s{i}_s{100+i}) written with the record schema, in `split`."""
  os.makedirs(out, exist_ok=True)
  rng = np.random.default_rng(0)
  payloads, index = [], []
  for i in range(n):
    k = i % 5 + 1
    yy, xx = np.mgrid[:size, :size]
    prev = ((np.sin(xx / (3 + i)) + 1) * 100 + rng.random((size, size)) * 40).astype(np.uint8)
    trg = ((np.cos(yy / (4 + i)) + 1) * 100).astype(np.uint8)
    arrays = dict(prev_image=prev, target_image=trg,
                  events=rng.standard_normal((k, dim)).astype(np.float16))
    meta = dict(key=f"p{i}_s{i}_s{100 + i}", trg_dicom=f"t{i}")
    payloads.append(rec.encode_record(meta, arrays, dict(prev_image="png", target_image="png")))
    index.append(dict(key=meta["key"], trg_dicom=meta["trg_dicom"], record=i))
  shards = write.write_shards(out, split, iter(payloads), n, 4)
  with open(os.path.join(out, rec.index_name(split)), "w") as f:
    f.write("\n".join(json.dumps(x) for x in index) + "\n")
  man = dict(schema_version=schema, image_size=size, event_dim=dim, max_events=max_events,
             event_layout="inline", label_sets=[],
             splits={split: dict(samples=n, shards=shards, distinct_targets=n)})
  write.write_json(os.path.join(out, rec.MANIFEST), man)
  return out


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
  """(dataset dir, synthetic EHRXDiff .ckpt path, config, params, ema params)."""
  base = tmp_path_factory.mktemp("sample_cli")
  data = make_dataset(str(base / "data"))
  cfg = small_config()
  params = random_params(cfg, 10)
  ema = {"unet": random_params(cfg, 11)["unet"]}
  path = save_ckpt(str(base / "ehrxdiff.ckpt"), ex.export_ehrxdiff_state_dict(params, ema, cfg))
  return dict(base=base, data=data, ckpt=path, cfg=cfg)


@pytest.fixture(scope="session")
def from_torch_run(setup):
  out = str(setup["base"] / "gen_torch")
  rc = main(["sample", "--from-torch", setup["ckpt"], "--config", TINY, "--data", setup["data"], "--split", "test",
             "--out", out, *FAST, *OVERRIDES])
  assert rc == 0
  return out


def _pngs(out, seed):
  d = os.path.join(out, f"seed{seed}")
  return {f[:-4]: images_io.read_png(os.path.join(d, f)) for f in sorted(os.listdir(d))}


def test_sample_from_torch_writes_everything(setup, from_torch_run):
  out = from_torch_run
  keys = [f"p{i}_s{i}_s{100 + i}" for i in range(N)]
  assert sorted(os.listdir(out)) == ["grid.png", "manifest.json", "seed0", "seed3"]
  for seed in (0, 3):
    imgs = _pngs(out, seed)
    assert sorted(imgs) == sorted(keys)  # padded outputs dropped
    assert all(im.shape == (S, S) and im.dtype == np.uint8 for im in imgs.values())
  a, b = _pngs(out, 0), _pngs(out, 3)
  assert any(not np.array_equal(a[k], b[k]) for k in keys)  # seeds differ
  grid = images_io.read_png(os.path.join(out, "grid.png"))
  assert grid.shape[1] > 4 * S and grid.shape[0] > 8 * S  # previous | pred s0 | pred s3 | target; 8 rows
  with open(os.path.join(out, "manifest.json")) as f:
    man = json.load(f)
  assert man["count"] == N and man["seeds"] == [0, 3] and man["keys"] == keys
  assert man["sampler"]["sampler"] == "ddim" and man["sampler"]["steps"] == 2 and man["sampler"]["batch_size"] == 8
  assert man["used_ema"] and man["source"]["from_torch"] == setup["ckpt"]
  assert man["config"]["model"]["unet"]["model_channels"] == 64
  assert man["timings"]["images_per_s"] > 0 and set(man["timings"]["per_seed_s"]) == {"0", "3"}
  assert not [p for p in os.listdir(setup["base"]) if ".tmp-" in p]  # the temporary directory is gone


@pytest.fixture(scope="session")
def converted(setup):
  conv = str(setup["base"] / "converted")
  assert main(["convert", "--from-torch", setup["ckpt"], "--config", TINY, "--out", conv, *OVERRIDES]) == 0
  return conv


def test_convert_then_sample_checkpoint_same_images(setup, from_torch_run, converted):
  conv = converted
  assert os.path.exists(os.path.join(conv, "config.json")) and os.path.isdir(os.path.join(conv, "checkpoints", "0"))
  out = str(setup["base"] / "gen_ckpt")
  # Batch 16 here, 8 for the --from-torch run: the images depend only on (weights, seed, sample key).
  assert main(["sample", "--checkpoint", conv, "--data", setup["data"], "--out", out, *FAST, "--batch", "16"]) == 0
  for seed in (0, 3):
    a, b = _pngs(from_torch_run, seed), _pngs(out, seed)
    assert sorted(a) == sorted(b)
    for k in a:
      assert np.abs(a[k].astype(int) - b[k].astype(int)).max() <= 1, k  # float rounding at most
  with open(os.path.join(out, "manifest.json")) as f:
    man = json.load(f)
  assert man["source"]["step"] == 0 and man["used_ema"]
  # The converted EMA UNet is the one used by default; --no-ema gives other images.
  out2 = str(setup["base"] / "gen_noema")
  assert main(["sample", "--checkpoint", conv, "--data", setup["data"], "--out", out2, "--no-ema", "--limit", "3",
               *FAST]) == 0
  c = _pngs(out2, 0)
  assert sorted(c) == [f"p{i}_s{i}_s{100 + i}" for i in range(3)]
  assert any(not np.array_equal(c[k], _pngs(out, 0)[k]) for k in c)
  # A second convert into the same directory is refused.
  assert main(["convert", "--from-torch", setup["ckpt"], "--config", TINY, "--out", conv, *OVERRIDES]) == 2


def test_refuses_to_overwrite(setup, from_torch_run, capsys):
  before = sorted(os.listdir(from_torch_run))
  rc = main(["sample", "--from-torch", setup["ckpt"], "--config", TINY, "--data", setup["data"], "--out",
             from_torch_run, *FAST, *OVERRIDES])
  assert rc == 2
  assert "not empty; pass --overwrite" in capsys.readouterr().err
  assert sorted(os.listdir(from_torch_run)) == before


def test_refuses_config_data_mismatch(setup, tmp_path, capsys):
  other = make_dataset(str(tmp_path / "d32"), n=2, size=32, dim=48, max_events=16)
  rc = main(["sample", "--from-torch", setup["ckpt"], "--config", TINY, "--data", other, "--out",
             str(tmp_path / "o"), *FAST, *OVERRIDES])
  err = capsys.readouterr().err
  assert rc == 2
  assert "image size: the data has 32, the model's config has data.image_size=64" in err
  assert "event dim: the data has 48, the model's config has model.table_tower.event_dim=64" in err
  assert "max events: the data has 16, the model's config has model.conditioner.max_events=32" in err
  old = make_dataset(str(tmp_path / "old"), n=2, schema=rec.SCHEMA_VERSION + 1)
  assert main(["sample", "--from-torch", setup["ckpt"], "--config", TINY, "--data", old, "--out",
               str(tmp_path / "o"), *FAST, *OVERRIDES]) == 2
  assert f"schema version: the data has {rec.SCHEMA_VERSION + 1}, this code reads {rec.SCHEMA_VERSION}" in \
      capsys.readouterr().err
  # A torch checkpoint of another architecture than --config is refused naming the field and both values.
  rc = main(["sample", "--from-torch", setup["ckpt"], "--config", TINY, "--data", setup["data"], "--out",
             str(tmp_path / "o"), *FAST, *[o for o in OVERRIDES if "model_channels" not in o]])
  assert rc == 2
  assert "model.unet.model_channels: the checkpoint has 64, the config has 32" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "o")


def test_grid_and_png_helpers(tmp_path):
  x = np.linspace(-1, 1, 16 * 16 * 3, dtype=np.float32).reshape(16, 16, 3)
  u = images_io.to_uint8(x)
  assert u.dtype == np.uint8 and u.shape == (16, 16) and u.min() == 0 and u.max() == 255
  images_io.write_png(str(tmp_path / "a.png"), x, size=32)
  assert images_io.read_png(str(tmp_path / "a.png")).shape == (32, 32)
  grid = images_io.make_grid([("previous", np.stack([x, -x])), ("target", np.stack([x, x]))], ["k0", "k1"])
  assert grid.shape[0] > 2 * 16 and grid.shape[1] > 2 * 16
  with pytest.raises(ValueError):
    images_io.make_grid([("a", np.stack([x])), ("b", np.stack([x, x]))])


def test_convert_vae_and_clip_files(setup, tmp_path):
  """cheff-vae and clip files convert to checkpoints their readers accept (train.clip.load_clip_towers)."""
  from ehrxdiff_jax.commands.sample import load_checkpoint_params
  from ehrxdiff_jax.train.checkpoint import CheckpointError
  from ehrxdiff_jax.train.clip import load_clip_towers
  cfg = setup["cfg"]
  params = random_params(cfg, 5)
  vae_file = str(tmp_path / "cheff.pt")
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in export_ldm_vae(params["vae"]).items()}, vae_file)
  out = str(tmp_path / "vae")
  assert main(["convert", "--from-torch", vae_file, "--config", TINY, "--out", out, *OVERRIDES]) == 0
  with pytest.raises(CheckpointError, match=r"holds the parameters \['vae'\], not \['conditioner', 'unet'\]"):
    import jax
    load_checkpoint_params(os.path.join(out, "checkpoints", "0"), cfg,
                           jax.sharding.SingleDeviceSharding(jax.devices()[0]), True)

  towers = params["conditioner"]
  clip_sd = {"model.visual." + k: v for k, v in export_openai_visual(towers["image_tower"]).items()}
  clip_sd.update({"model.transformer." + k: v for k, v in export_table_tower(towers["table_tower"]).items()})
  clip_sd["model.logit_scale"] = np.asarray(2.5, np.float32)
  clip_file = save_ckpt(str(tmp_path / "clip.ckpt"), clip_sd)
  out = str(tmp_path / "clip")
  assert main(["convert", "--from-torch", clip_file, "--kind", "clip", "--config", TINY, "--out", out,
               *OVERRIDES]) == 0
  got = load_clip_towers(out)
  np.testing.assert_array_equal(got["table_tower"]["fc"]["kernel"], towers["table_tower"]["fc"]["kernel"])
  np.testing.assert_array_equal(got["image_tower"]["positional_embedding"],
                                towers["image_tower"]["positional_embedding"])
  assert float(got["logit_scale"]) == 2.5


def test_restore_checks_shapes_against_the_config(setup, converted):
  import jax

  from ehrxdiff_jax.commands.sample import load_checkpoint_params
  from ehrxdiff_jax.config_util import read_saved_config
  from ehrxdiff_jax.train.checkpoint import CheckpointError, restore_run_params
  cfg = read_saved_config(converted)
  assert cfg.model.unet.channel_mult == (1, 2) and cfg.model.unet.model_channels == 64
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params, used_ema, meta = load_checkpoint_params(os.path.join(converted, "checkpoints", "0"), cfg, dev, True)
  assert used_ema and meta["kind"] == "ehrxdiff" and meta["step"] == 0
  kernel = params["unet"]["conv_in"]["kernel"]
  assert kernel.shape == (3, 3, 3, 64) and kernel.sharding == dev
  # the same reader on the host (as train.init_from uses it): the EMA UNet is the one swapped in above
  host = restore_run_params(converted, parts=("unet",), ema=True)
  assert host.step == 0 and host.workdir == converted and set(host.params) == set(host.ema_params) == {"unet"}
  np.testing.assert_array_equal(host.ema_params["unet"]["conv_in"]["kernel"], params["unet"]["conv_in"]["kernel"])
  assert not np.array_equal(host.params["unet"]["conv_in"]["kernel"], params["unet"]["conv_in"]["kernel"])
  with pytest.raises(CheckpointError, match=r"no checkpoint of step 5 under .*; steps: \[0\]"):
    restore_run_params(converted, step=5)
  cfg.model.unet.model_channels = 32
  with pytest.raises(CheckpointError,
                     match=r"\['unet'\]\['conv_in'\]\['kernel'\]: checkpoint \(3, 3, 3, 64\), model \(3, 3, 3, 32\)"):
    load_checkpoint_params(os.path.join(converted, "checkpoints", "0"), cfg, dev, True)
  with pytest.raises(FileNotFoundError, match="no config.json"):
    read_saved_config(os.path.join(converted, "checkpoints"))


def test_ldm_init_from_a_converted_checkpoint_keeps_its_ema_unet(converted):
  """`train.init_from` an EHRXDiff checkpoint: every part from its weights, the EMA UNet from its EMA."""
  import jax

  from ehrxdiff_jax import parallel
  from ehrxdiff_jax.config_util import read_saved_config
  from ehrxdiff_jax.train import make_objective
  from ehrxdiff_jax.train.checkpoint import restore_run_params
  from ehrxdiff_jax.train.loop import Trainer
  cfg = read_saved_config(converted)
  cfg.train.batch_size, cfg.mesh.shape.data = 1, 1
  trainer = Trainer(cfg, make_objective(cfg), parallel.make_mesh(cfg, jax.devices()[:1]))
  state = jax.device_get(trainer.objective.init_from(trainer.init_state(), converted, trainer))
  saved = restore_run_params(converted, ema=True)
  for part in ("unet", "conditioner", "vae"):
    jax.tree.map(np.testing.assert_array_equal, state.params[part], saved.params[part])
  jax.tree.map(np.testing.assert_array_equal, state.ema_params["unet"], saved.ema_params["unet"])
  assert not np.array_equal(state.ema_params["unet"]["conv_in"]["kernel"], state.params["unet"]["conv_in"]["kernel"])


@pytest.mark.slow
def test_two_processes_write_the_images_of_one(setup, converted):
  """2 real processes x 4 CPU devices (one jax.distributed runtime, gloo) write the same PNGs as 1 process x 8
  devices, into one output: 6 samples in one batch of 8, so process 1 also holds the 2 padded rows."""
  from test_train import _free_port, env
  args = ["--checkpoint", converted, "--data", setup["data"], *FAST, "--limit", "6", "--grid", "2"]
  one = str(setup["base"] / "gen_one_process")
  assert main(["sample", *args, "--out", one]) == 0  # this process: 8 devices (conftest)
  two = str(setup["base"] / "gen_two_processes")
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "ehrxdiff_jax.cli", "sample", *args, "--out", two,
                             "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                            env=env(4), stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    errs = [p.communicate(timeout=300)[1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  if any(p.returncode for p in procs) and any("gloo" in e.lower() and "not" in e.lower() for e in errs):
    pytest.skip("CPU collectives (gloo) unavailable: " + errs[0][-500:])
  assert all(p.returncode == 0 for p in procs), errs[0][-3000:] + errs[1][-3000:]
  assert sorted(os.listdir(two)) == sorted(os.listdir(one)) == ["grid.png", "manifest.json", "seed0", "seed3"]
  for seed in (0, 3):
    a, b = _pngs(one, seed), _pngs(two, seed)
    assert sorted(a) == sorted(b) == [f"p{i}_s{i}_s{100 + i}" for i in range(6)]
    for k in a:
      assert np.abs(a[k].astype(int) - b[k].astype(int)).max() <= 1, k  # sharding may change float rounding
  grid_a, grid_b = (images_io.read_png(os.path.join(d, "grid.png")).astype(int) for d in (one, two))
  assert grid_a.shape == grid_b.shape and np.abs(grid_a - grid_b).max() <= 1
  with open(os.path.join(two, "manifest.json")) as f:
    man = json.load(f)
  assert man["sampler"]["processes"] == 2 and man["sampler"]["devices"] == 8 and man["count"] == 6
  assert man["keys"] == [f"p{i}_s{i}_s{100 + i}" for i in range(6)]
  assert "ehrxdiff.sample" in errs[0] and "ehrxdiff.sample" not in errs[1]  # process 0 logs for the run
  assert not [p for p in os.listdir(setup["base"]) if ".tmp-" in p]
