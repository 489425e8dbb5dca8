"""The training loop: state/EMA/optimiser, bad inputs, exact resume after SIGKILL, SIGTERM, 2 processes.

The machinery tests use the seconds-fast `toy` objective (ehrxdiff_jax/train/toy.py) through the real
CLI (`ehrxdiff train --data synthetic`); the LDM objective's step is covered by tests/test_parallel.py.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ehrxdiff_jax import batch_format, cli, parallel
from ehrxdiff_jax.train import state as state_lib
from ehrxdiff_jax.train.checkpoint import Checkpointer
from ehrxdiff_jax.train.loop import NonFiniteLoss, SyntheticBatches, Trainer, fit
from ehrxdiff_jax.train.toy import ToyObjective

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
TOY = ["--config.train.objective=toy", "--config.train.batch_size=16", "--config.mesh.min_shard_size=0",
       "--config.train.log_every=1", "--config.train.eval_every=0"]


def toy_cfg(tiny_config, **train):
  cfg = tiny_config.copy_and_resolve_references()
  cfg.train.objective = "toy"
  cfg.train.batch_size = 16
  cfg.mesh.min_shard_size = 0
  cfg.train.update(train)
  return cfg


def env(devices=8):
  e = dict(os.environ)
  e.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
           JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"), PYTHONUNBUFFERED="1")
  return e


def train_cmd(workdir, *extra):
  return [sys.executable, "-m", "ehrxdiff_jax.cli", "train", "--config", TINY, "--data", "synthetic",
          "--workdir", str(workdir), "--no-progress", *TOY, *extra]


def losses(workdir) -> dict[int, float]:
  """step -> train loss from metrics.jsonl (the last record of a step wins: a resumed run rewrites)."""
  out = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    for line in open(path):
      try:
        r = json.loads(line)
      except json.JSONDecodeError:  # a line cut by SIGKILL
        continue
      if r["split"] == "train":
        out[r["step"]] = r["loss"]
  return out


# ------------------------------------------------------------------ in-process units


def test_ema_warmup_decay():
  np.testing.assert_allclose(float(state_lib.ema_decay(0.9999, 1)), 2 / 11, rtol=1e-6)
  np.testing.assert_allclose(float(state_lib.ema_decay(0.9999, 10 ** 7)), 0.9999, rtol=1e-6)
  new = state_lib.ema_update({"a": np.float32(1.0)}, {"a": np.float32(3.0)}, 0.25)
  np.testing.assert_allclose(float(new["a"]), 1.0 + 0.75 * 2.0)


def test_schedules(tiny_config):
  t = tiny_config.train.copy_and_resolve_references()
  t.update(learning_rate=1.0, warmup_steps=10, num_steps=110, schedule="cosine")
  s = state_lib.learning_rate_schedule(t)
  assert float(s(0)) == 0.0 and abs(float(s(10)) - 1.0) < 1e-6 and float(s(110)) < 1e-6
  t.schedule = "constant"
  s = state_lib.learning_rate_schedule(t)
  assert abs(float(s(5)) - 0.5) < 1e-6 and float(s(50)) == 1.0


@pytest.fixture(scope="module")
def toy_runs(tiny_config):
  """Loss trajectories of 4 toy steps with gradient accumulation 2, on 1 device and on 8 (fsdp x tensor)."""
  out = {}
  for name, n, shape in (("one", 1, dict(data=1)), ("eight", 8, dict(data=2, fsdp=2, tensor=2))):
    cfg = toy_cfg(tiny_config, grad_accum=2)
    cfg.mesh.shape.update(shape)
    trainer = Trainer(cfg, ToyObjective(cfg), parallel.make_mesh(cfg, jax.devices()[:n]))
    state = trainer.init_state()
    data = SyntheticBatches(trainer.objective.dummy_batch(1), 16, seed=1)
    ls = []
    for _ in range(4):
      state, m = trainer.train_step(state, trainer.put_batch(next(data)))
      ls.append([float(m["loss"]), float(m["grad_norm"]), float(m["lr"])])
    out[name] = (np.array(ls), state)
  return out


def test_accumulation_same_on_1_and_8_devices(toy_runs):
  np.testing.assert_allclose(toy_runs["eight"][0], toy_runs["one"][0], atol=1e-5, rtol=1e-5)
  state = toy_runs["eight"][1]
  assert int(state.step) == 4
  assert set(state.ema_params) == {"head"} and set(state.opt_state[0].mu) == {"encoder", "head"}


def test_frozen_part_does_not_move(tiny_config, toy_runs):
  cfg = toy_cfg(tiny_config)
  trainer = Trainer(cfg, ToyObjective(cfg), parallel.make_mesh(cfg, jax.devices()[:1]))
  init = jax.device_get(trainer.init_state().params)
  final = jax.device_get(toy_runs["one"][1].params)
  jax.tree.map(np.testing.assert_array_equal, final["frozen"], init["frozen"])
  assert not np.array_equal(final["head"]["fc1"]["kernel"], init["head"]["fc1"]["kernel"])


class _NaNAt:
  """SyntheticBatches whose batch number `bad` (0-based) is NaN."""

  def __init__(self, inner, bad):
    self.inner, self.bad = inner, bad

  def __next__(self):
    i = self.inner.index
    b = next(self.inner)
    if i == self.bad:
      b = {k: np.full_like(v, np.nan) for k, v in b.items()}
    return b

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, s):
    self.inner.set_state(s)

  def start_prefetch(self):
    pass


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
  cfg = toy_cfg(tiny_config, ckpt_every=2, log_every=100, eval_every=0)
  trainer = Trainer(cfg, ToyObjective(cfg), parallel.make_mesh(cfg))
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  data = _NaNAt(SyntheticBatches(trainer.objective.dummy_batch(1), 16), bad=4)  # batch 4 -> step 5
  with pytest.raises(NonFiniteLoss, match="non-finite loss at step 5") as e:
    fit(trainer, trainer.init_state(), data, num_steps=10, workdir=str(tmp_path), checkpointer=ckpt,
        progress=False)
  # step 5 started from the state of step 4: that checkpoint is not kept, the one before is
  assert "Removed checkpoint 4" in str(e.value) and "The last good checkpoint is step 2" in str(e.value)
  assert ckpt.all_steps() == [2]
  ckpt.close()


def test_a_non_finite_state_is_never_saved(tiny_config, tmp_path):
  """The loss does not read the EMA: a NaN there is caught by the check of what is saved."""
  cfg = toy_cfg(tiny_config, ckpt_every=1, log_every=100, eval_every=0)
  trainer = Trainer(cfg, ToyObjective(cfg), parallel.make_mesh(cfg))
  state = trainer.init_state()
  state = state.replace(ema_params=jax.tree.map(lambda x: x * np.nan, state.ema_params))
  ckpt = Checkpointer(str(tmp_path / "ckpt"))
  with pytest.raises(NonFiniteLoss, match=r"non-finite values in the state to be saved at step 1 \(ema_params\)"):
    fit(trainer, state, SyntheticBatches(trainer.objective.dummy_batch(1), 16), num_steps=3,
        workdir=str(tmp_path), checkpointer=ckpt, progress=False)
  assert ckpt.all_steps() == []
  ckpt.close()


def ckpt_steps(workdir) -> list[int]:
  ckpt = Checkpointer(str(workdir / "checkpoints"))
  steps = ckpt.all_steps()
  ckpt.close()
  return steps


def train_cli(workdir, *extra) -> int:
  """`ehrxdiff train` of the toy objective in this process (the CLI's exit status)."""
  return cli.main(["train", "--config", TINY, "--data", "synthetic", "--workdir", str(workdir), "--no-progress",
                   *TOY, *extra])


def test_non_finite_stop_keeps_a_checkpoint_that_trains_on(tmp_path, capsys):
  """The issue's reproduction: learning rate 1e8, a checkpoint every step. The checkpoint a NaN stop keeps
  trains on past the stopping step with a sane learning rate."""
  w = tmp_path / "run"
  insane = ["--config.train.learning_rate=1e8", "--config.train.ckpt_every=1"]
  assert train_cli(w, *insane, "--steps", "10") == 3
  assert ckpt_steps(w) == []  # checkpoint 1 holds the parameters whose loss (step 2) is not finite
  err = capsys.readouterr().err
  assert "error: non-finite loss at step 2" in err and "Removed checkpoint 1" in err
  assert "No good checkpoint is left" in err
  # three sane steps, then the insane rate from step 3: it stops at step 5 and keeps step 3
  assert train_cli(w, "--config.train.ckpt_every=1", "--force", "--steps", "3") == 0
  assert train_cli(w, *insane, "--force", "--steps", "10") == 3
  assert ckpt_steps(w) == [2, 3]
  err = capsys.readouterr().err
  assert "non-finite loss at step 5" in err and f"The last good checkpoint is step 3 in {w / 'checkpoints'}" in err
  assert train_cli(w, "--config.train.ckpt_every=1", "--force", "--steps", "8") == 0
  got = losses(w)
  assert sorted(got) == list(range(1, 9)) and all(np.isfinite(got[s]) for s in range(4, 9)), got


def test_refused_config_writes_no_config_json(tmp_path, capsys):
  w = tmp_path / "run"
  assert train_cli(w, "--config.train.grad_accum=3", "--steps", "1") == 2
  err = capsys.readouterr().err
  assert f"error: {TINY}: train.batch_size=16 is not divisible by train.grad_accum=3" in err
  assert "Traceback" not in err and not (w / "config.json").exists()
  assert train_cli(w, "--steps", "1") == 0  # the corrected command is not refused as a config change


def test_non_divisible_batch_is_refused_before_compiling(tmp_path, capsys):
  assert train_cli(tmp_path, "--config.train.batch_size=12") == 2
  assert "not divisible by the data-parallel size 8" in capsys.readouterr().err


def test_different_config_workdir_refused_unless_force(tmp_path):
  from ehrxdiff_jax.commands.train import check_workdir, write_config
  from ehrxdiff_jax.config_util import load_config
  from ehrxdiff_jax.errors import UserError
  a = load_config(TINY)
  check_workdir(str(tmp_path), a, force=False)
  write_config(str(tmp_path), a)
  b = load_config(TINY, ["--config.train.learning_rate=0.5"])
  with pytest.raises(UserError, match="train.learning_rate: 0.001 -> 0.5"):
    check_workdir(str(tmp_path), b, force=False)
  c = load_config(TINY, ["--config.train.num_steps=999", "--config.mesh.shape.data=2"])
  check_workdir(str(tmp_path), c, force=False)  # resumable fields may change
  check_workdir(str(tmp_path), b, force=True)
  (tmp_path / "config.json").write_text('{"train": {"learning')  # torn
  with pytest.raises(UserError, match=f"{tmp_path / 'config.json'} is not valid JSON"):
    check_workdir(str(tmp_path), a, force=False)


def test_schema_version_mismatch_refused(tmp_path, capsys):
  from ehrxdiff_jax import records
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / records.MANIFEST).write_text(json.dumps({"schema_version": 999}))
  assert cli.main(["train", "--config", TINY, "--data", str(tmp_path / "data"), "--workdir", str(tmp_path / "w")]) == 2
  assert f"schema version 999, this code reads {records.SCHEMA_VERSION}" in capsys.readouterr().err


def test_event_dim_is_checked_before_compiling(tmp_path, capsys, monkeypatch):
  from test_pipeline import D, make_dataset
  data = make_dataset(str(tmp_path / "data"))  # event_dim D = 8; the tiny table tower takes 64

  def no_compile(self, *a):
    raise AssertionError("compiled before the data's event_dim was checked")
  monkeypatch.setattr(Trainer, "compile", no_compile)
  rc = cli.main(["train", "--config", TINY, "--data", data, "--workdir", str(tmp_path / "w"), "--no-progress",
                 "--config.train.objective=table_classifier", "--config.train.batch_size=8"])
  assert rc == 2
  assert (f"error: {os.path.join(data, 'manifest.json')}: the data's events have event_dim {D}, the model takes "
          f"model.table_tower.event_dim=64") in capsys.readouterr().err


def test_workdir_and_checkpoint_problems_are_refused(tmp_path, capsys):
  """Checkpoints without config.json, a checkpoint without its data iterator state or its meta/ item."""
  w = tmp_path / "run"
  assert train_cli(w, "--config.train.ckpt_every=2", "--steps", "2") == 0
  os.remove(w / "config.json")
  assert train_cli(w, "--steps", "3") == 2
  assert f"error: {w} holds checkpoints but no config.json" in capsys.readouterr().err
  assert train_cli(w, "--force", "--config.train.ckpt_every=2", "--steps", "2") == 0  # --force accepts them
  import shutil
  shutil.rmtree(w / "checkpoints" / "2" / "data")
  assert train_cli(w, "--steps", "3") == 2
  err = capsys.readouterr().err
  assert f"error: checkpoint {w / 'checkpoints' / '2'} has no data/ item (the data iterator state)" in err
  assert "--restart-data" in err and not os.path.exists(w / "checkpoints" / "3")
  assert train_cli(w, "--restart-data", "--config.train.ckpt_every=0", "--steps", "3") == 0
  shutil.rmtree(w / "checkpoints" / "2" / "meta")
  assert train_cli(w, "--restart-data", "--steps", "4") == 2
  assert (f"error: checkpoint {w / 'checkpoints' / '2'} has no meta/ item: it is damaged or was not written by "
          f"`ehrxdiff train`; move {w / 'checkpoints' / '2'} away") in capsys.readouterr().err


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
  assert train_cli(tmp_path, "--config.train.nope=1") == 2
  assert capsys.readouterr().err == "error: unknown config key 'train.nope'\n"
  from ehrxdiff_jax.errors import UnknownKeyError
  with pytest.raises(UnknownKeyError):  # the traceback on demand
    train_cli(tmp_path, "--config.train.nope=1", "--debug")
  monkeypatch.setenv("EHRXDIFF_DEBUG", "1")
  with pytest.raises(UnknownKeyError):
    train_cli(tmp_path, "--config.train.nope=1")
  monkeypatch.delenv("EHRXDIFF_DEBUG")
  from ehrxdiff_jax.commands import info

  def bug(args):
    raise ZeroDivisionError("a bug")
  monkeypatch.setattr(info, "run", bug)
  with pytest.raises(ZeroDivisionError):
    cli.main(["info", "--config", TINY])


# ------------------------------------------------------------------ real processes


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted 30-step toy run (its loss per step)."""
  w = tmp_path_factory.mktemp("ref")
  r = subprocess.run(train_cmd(w, "--steps", "30", "--config.train.ckpt_every=0"), env=env(),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  ls = losses(w)
  assert sorted(ls) == list(range(1, 31))
  return ls


def _wait_for_step(proc, workdir, step, timeout=240):
  t0 = time.time()
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
    if losses(workdir) and max(losses(workdir)) >= step:
      return
    time.sleep(0.05)
  raise AssertionError("training did not reach step %d in time" % step)


@pytest.mark.slow
def test_exact_resume_after_sigkill(reference_run, tmp_path):
  w = tmp_path / "run"
  cmd = train_cmd(w, "--config.train.ckpt_every=3", "--config.train.num_steps=100000")
  proc = subprocess.Popen(cmd + ["--steps", "100000"], env=env(), stderr=subprocess.PIPE, text=True)
  try:
    _wait_for_step(proc, w, 8)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  killed_at = max(losses(w))
  ckpt = Checkpointer(str(w / "checkpoints"))
  resumed_from = ckpt.latest_step()
  ckpt.close()
  assert resumed_from is not None and resumed_from >= 3
  r = subprocess.run(cmd + ["--steps", "30"], env=env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"resumed from step {resumed_from}" in r.stderr
  got = losses(w)
  assert sorted(got) == list(range(1, 31)), (killed_at, resumed_from)
  np.testing.assert_allclose([got[s] for s in range(1, 31)], [reference_run[s] for s in range(1, 31)],
                             rtol=1e-6, atol=0)


@pytest.mark.slow
def test_sigterm_saves_and_exits(tmp_path):
  w = tmp_path / "run"
  proc = subprocess.Popen(train_cmd(w, "--config.train.ckpt_every=1000", "--config.train.num_steps=100000"),
                          env=env(), stderr=subprocess.PIPE, text=True)
  try:
    _wait_for_step(proc, w, 5)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert rc == 0
  ckpt = Checkpointer(str(w / "checkpoints"))
  step = ckpt.latest_step()
  ckpt.close()
  assert step is not None and step >= 5 and step % 1000 != 0


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  """2 real processes x 4 CPU devices (gloo collectives) == 1 process x 8 devices, FSDP over all 8."""
  mesh = ["--config.mesh.shape.data=1", "--config.mesh.shape.fsdp=-1", "--steps", "6",
          "--config.train.ckpt_every=3"]
  one = tmp_path / "one"
  r = subprocess.run(train_cmd(one, *mesh), env=env(8), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  two = tmp_path / "two"
  port = _free_port()
  procs = [subprocess.Popen(train_cmd(two, *mesh, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                      "--process-id", str(i)), env=env(4), stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=300)[1] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  if any(p.returncode for p in procs) and any("gloo" in o.lower() and "not" in o.lower() for o in outs):
    pytest.skip("CPU collectives (gloo) unavailable: " + outs[0][-500:])
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  a, b = losses(one), losses(two)
  assert sorted(b) == list(range(1, 7))
  np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], atol=1e-5, rtol=1e-5)
  ckpt = Checkpointer(str(two / "checkpoints"))
  assert ckpt.all_steps() == [3, 6]
  ckpt.close()


# ------------------------------------------------------------------ LDM sample grids during training


def tb_images(tb_dir) -> dict:
  """tag -> [(step, height, width, PNG bytes)] of the image summaries in a TensorBoard event folder (read
  from the TFRecord framing: u64 length, u32 crc, payload, u32 crc)."""
  import struct
  from tensorboardX.proto import event_pb2
  out = {}
  for name in os.listdir(tb_dir):
    data = open(os.path.join(tb_dir, name), "rb").read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        if v.HasField("image"):
          out.setdefault(v.tag, []).append((event.step, v.image.height, v.image.width, v.image.encoded_image_string))
  return out


def test_ldm_sample_hook_writes_prev_pred_target_grid(tmp_path):
  """`train.sample_every=2` for 2 LDM steps (the micro LDM of test_parallel.py, 8 devices): one grid at step
  2, rows [I_prev | prediction | I_trg] of the hook's batch, as a PNG and in TensorBoard."""
  from PIL import Image
  from ehrxdiff_jax.config_util import load_config
  from ehrxdiff_jax.train import make_objective
  from micro import MICRO
  args = [f"--config.{o}" for o in MICRO] + ["--config.train.sample_every=2", "--config.train.ckpt_every=0",
                                             "--config.train.eval_every=0"]
  assert cli.main(["train", "--config", TINY, "--data", "synthetic", "--workdir", str(tmp_path), "--steps", "2",
                   "--no-progress", *args]) == 0
  pngs = sorted(os.listdir(tmp_path / "images"))
  assert pngs == ["samples_prev_pred_target_0000002.png"]  # not at step 1
  grid = np.asarray(Image.open(tmp_path / "images" / pngs[0]))
  cfg = load_config(TINY, args)
  b, s = int(cfg.train.batch_size), int(cfg.data.image_size)
  assert grid.shape == (b * s, 3 * s, 3)
  # The hook's batch is the first validation batch of `--data synthetic` (commands/train.py make_data).
  batch = SyntheticBatches(make_objective(cfg).dummy_batch(1), b, seed=10_000 + int(cfg.data.shuffle_seed)).batch(0)
  to_pixels = lambda x: np.round(np.clip((x + 1) / 2, 0, 1) * 255).astype(np.uint8)  # noqa: E731
  prev, pred, target = grid[:, :s], grid[:, s:2 * s], grid[:, 2 * s:]
  for shown, k in ((prev, "prev_image"), (target, "target_image")):   # the host batch's uint8 grey images
    np.testing.assert_array_equal(shown, to_pixels(np.concatenate(list(batch_format.device_images(batch[k])), 0)))
  assert not np.array_equal(pred, prev) and pred.std() > 0
  [(step, height, width, png)] = tb_images(tmp_path / "tb")["samples/prev_pred_target"]
  assert (step, height, width) == (2, b * s, 3 * s) and png[:8] == b"\x89PNG\r\n\x1a\n"
