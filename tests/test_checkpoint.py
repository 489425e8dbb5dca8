"""Orbax checkpoints: state + data iterator round trip, restore on another mesh, unfinalised saves ignored,
and reading another run's parameters (restore_run_params)."""
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from ehrxdiff_jax import parallel
from ehrxdiff_jax.train.checkpoint import (CheckpointError, Checkpointer, abstract_params, resolve_step_dir,
                                           restore_run_params)
from ehrxdiff_jax.train.loop import SyntheticBatches, Trainer
from ehrxdiff_jax.train.toy import ToyObjective


def to_host(tree):
  def one(x):
    return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  return jax.device_get(jax.tree.map(one, tree))


def toy_config(tiny_config, n_fsdp=8):
  cfg = tiny_config.copy_and_resolve_references()
  cfg.train.objective = "toy"
  cfg.train.batch_size = 16
  cfg.mesh.shape.update(data=-1, fsdp=n_fsdp, tensor=1)
  cfg.mesh.min_shard_size = 0
  return cfg


def make_trainer(cfg, n_devices):
  if n_devices % cfg.mesh.shape.fsdp:
    cfg.mesh.shape.fsdp = n_devices
  return Trainer(cfg, ToyObjective(cfg), parallel.make_mesh(cfg, jax.devices()[:n_devices]))


@pytest.fixture(scope="module")
def saved(tiny_config, tmp_path_factory):
  """A toy run on 8 devices (fsdp=8) trained 3 steps and saved at step 3 with its data iterator."""
  cfg = toy_config(tiny_config)
  trainer = make_trainer(cfg, 8)
  state = trainer.init_state()
  data = SyntheticBatches(trainer.objective.dummy_batch(1), 16, seed=5)
  for _ in range(3):
    state, _ = trainer.train_step(state, trainer.put_batch(next(data)))
  directory = str(tmp_path_factory.mktemp("ckpt"))
  ckpt = Checkpointer(directory, keep=2)
  ckpt.save(3, state, data, meta={"note": "x"})
  ckpt.wait()
  host = to_host(state)
  # the next step's loss, for the resume check
  state, m = trainer.train_step(state, trainer.put_batch(next(data)))
  ckpt.close()
  return cfg, directory, host, float(m["loss"])


@pytest.mark.parametrize("n_devices", [8, 4, 1])
def test_restore_on_another_mesh(saved, n_devices):
  cfg, directory, host, next_loss = saved
  trainer = make_trainer(cfg.copy_and_resolve_references(), n_devices)
  ckpt = Checkpointer(directory)
  assert ckpt.latest_step() == 3
  data = SyntheticBatches(trainer.objective.dummy_batch(1), 16, seed=5)
  state, meta = ckpt.restore(trainer.abstract_state(), data_iter=data)
  assert meta["note"] == "x" and meta["step"] == 3
  assert data.index == 3  # iterator state came back with the model
  assert len(state.params["encoder"]["fc1"]["kernel"].sharding.device_set) == n_devices
  jax.tree.map(np.testing.assert_array_equal, to_host(state), host)
  state, m = trainer.train_step(state, trainer.put_batch(next(data)))
  np.testing.assert_allclose(float(m["loss"]), next_loss, rtol=1e-6)
  ckpt.close()


def test_unfinalised_save_is_not_restored(saved, tmp_path):
  """A save that crashed before orbax's finalising rename leaves `<step>.orbax-checkpoint-tmp-*`:
  it is not a step, the latest complete checkpoint is restored, and the next manager cleans it up."""
  cfg, directory, host, _ = saved
  d = str(tmp_path / "ckpts")
  shutil.copytree(directory, d)
  # simulate a crash mid-save of step 7: a complete-looking copy that was never finalised, minus a file
  tmp = os.path.join(d, "7.orbax-checkpoint-tmp-1234567")
  shutil.copytree(os.path.join(d, "3"), tmp)
  for name in ("commit_success.txt",):
    if os.path.exists(os.path.join(tmp, name)):
      os.remove(os.path.join(tmp, name))
  ckpt = Checkpointer(d)
  assert ckpt.all_steps() == [3]
  assert ckpt.latest_step() == 3
  trainer = make_trainer(cfg.copy_and_resolve_references(), 8)
  state, meta = ckpt.restore(trainer.abstract_state())
  assert meta["step"] == 3 and int(state.step) == 3
  ckpt.close()


def test_keep_k(tiny_config, tmp_path):
  cfg = toy_config(tiny_config)
  trainer = make_trainer(cfg, 8)
  state = trainer.init_state()
  ckpt = Checkpointer(str(tmp_path), keep=2, async_save=True)
  for s in (1, 2, 3):
    ckpt.save(s, state)
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3]
  ckpt.close()


def test_restore_run_params(saved, tmp_path, caplog):
  """The one reader of another run's parameters: host numpy or placed, parts, EMA, shape checks, steps."""
  _, directory, host, _ = saved
  with caplog.at_level(logging.WARNING):
    run = restore_run_params(directory)   # a checkpoints/ folder (the latest step)
  # orbax's false alarm about the item's metadata file (it lives in the step directory) is not shown
  assert not [r for r in caplog.records if "Metadata file does not exist" in r.getMessage()]
  assert run.step == 3 and run.meta["note"] == "x" and run.step_dir == os.path.join(directory, "3")
  assert all(type(x) is np.ndarray for x in jax.tree.leaves(run.params)) and run.ema_params == {}
  jax.tree.map(np.testing.assert_array_equal, run.params, host.params)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[1])
  placed = restore_run_params(os.path.join(directory, "3"), parts=("head",), ema=True, sharding=one)
  assert set(placed.params) == set(placed.ema_params) == {"head"}
  assert all(x.sharding == one for x in jax.tree.leaves(placed.ema_params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(placed.ema_params), host.ema_params)
  with pytest.raises(CheckpointError, match=r"holds the parameters \['encoder', 'frozen', 'head'\], not \['nope'\]"):
    restore_run_params(directory, parts=("nope", "head"))
  expected = abstract_params({"encoder": host.params["encoder"]})
  expected["encoder"]["fc1"]["kernel"] = jax.ShapeDtypeStruct((16, 32), np.float32)
  expected["encoder"]["fc3"] = {"bias": jax.ShapeDtypeStruct((4,), np.float32)}
  with pytest.raises(CheckpointError, match=r"2 problems.*\['fc3'\]\['bias'\]: missing in the checkpoint.*"
                                            r"\['fc1'\]\['kernel'\]: checkpoint \(16, 64\), model \(16, 32\)"):
    restore_run_params(directory, expected=expected)
  workdir = tmp_path / "run"   # a run directory: WORKDIR/checkpoints/<step>, other steps chosen by number
  shutil.copytree(directory, workdir / "checkpoints")
  shutil.copytree(os.path.join(directory, "3"), workdir / "checkpoints" / "1")
  shutil.copytree(os.path.join(directory, "3"), workdir / "checkpoints" / "9.orbax-checkpoint-tmp-1")
  assert resolve_step_dir(str(workdir)) == (str(workdir), str(workdir / "checkpoints" / "3"), 3)
  assert restore_run_params(str(workdir), step=1, parts=("frozen",)).step == 1
  for bad, message in ((dict(path=str(workdir), step=2), r"no checkpoint of step 2 .*steps: \[1, 3\]"),
                       (dict(path=str(workdir / "checkpoints" / "3"), step=1), "step 1 asked for"),
                       (dict(path=str(tmp_path / "none")), "no checkpoint directory"),
                       (dict(path=str(tmp_path)), "no complete checkpoint")):
    with pytest.raises(CheckpointError, match=message):
      resolve_step_dir(**bad)
