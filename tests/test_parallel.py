"""Mesh, logical rules -> shardings, batch placement, and the LDM step's equivalence across meshes."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs.base import FSDP_RULES, TENSOR_RULES
from ehrxdiff_jax import parallel
from micro import micro_config


def _mesh(cfg, n, **shape):
  cfg = cfg.copy_and_resolve_references()
  for k, v in shape.items():
    cfg.mesh.shape[k] = v
  return parallel.make_mesh(cfg, jax.devices()[:n])


def test_mesh_fill_and_errors(tiny_config):
  cfg = tiny_config.copy_and_resolve_references()
  assert parallel.mesh_shape(cfg, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
  cfg.mesh.shape.update(data=2, fsdp=-1, tensor=2)
  assert parallel.mesh_shape(cfg, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
  mesh = parallel.make_mesh(cfg)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  cfg.mesh.shape.update(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="at most one"):
    parallel.mesh_shape(cfg, 8)
  cfg.mesh.shape.update(data=3, fsdp=-1, tensor=1)
  with pytest.raises(ValueError, match="not divisible"):
    parallel.mesh_shape(cfg, 8)


def test_logical_rules_to_specs(tiny_config):
  cfg = tiny_config.copy_and_resolve_references()
  mesh = _mesh(cfg, 8, data=1, fsdp=4, tensor=2)
  spec = lambda names, shape, rules=FSDP_RULES, m=0: parallel.logical_to_spec(names, shape, rules, mesh, m)
  assert spec(("embed", "mlp"), (64, 256)) == P("fsdp", "tensor")
  assert spec((None, None, "conv_in", "conv_out"), (3, 3, 32, 64)) == P(None, None, None, "fsdp")
  assert spec(("embed", "mlp"), (64, 256), TENSOR_RULES) == P(None, "tensor")
  # A mesh axis is used once per array: the second 'embed' stays replicated.
  assert spec(("embed", "embed"), (64, 64)) == P("fsdp")
  # Not divisible -> that dimension replicated; tiny -> all replicated.
  assert spec(("embed", "mlp"), (6, 256)) == P(None, "tensor")
  assert spec(("embed", "mlp"), (64, 256), m=64 * 256 + 1) == P()
  assert spec(("norm",), (64,)) == P()
  assert spec(("unknown_name",), (64,)) == P()


def test_batch_rows_and_global_arrays(tiny_config):
  mesh = _mesh(tiny_config, 8, data=2, fsdp=4)
  assert parallel.process_batch_rows(mesh, 16) == (0, 16)
  host = {"x": np.arange(32, dtype=np.float32).reshape(16, 2), "key": np.array([b"k"] * 16)}
  out = parallel.to_global(host, mesh)
  assert set(out) == {"x"}  # host-only entries never travel
  assert out["x"].sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(out["x"]), host["x"])


def test_check_batch_is_clear(tiny_config):
  cfg = tiny_config.copy_and_resolve_references()
  mesh = parallel.make_mesh(cfg)
  cfg.train.batch_size = 12
  with pytest.raises(ValueError, match="not divisible by the data-parallel size 8"):
    parallel.check_batch(cfg, mesh)
  cfg.train.batch_size, cfg.train.grad_accum = 16, 4
  with pytest.raises(ValueError, match="multiple of 32"):
    parallel.check_batch(cfg, mesh)


@pytest.fixture(scope="session")
def ldm_losses(tiny_config):
  """Loss of 3 LDM steps (micro config, same global batch and seed) on several meshes."""
  from ehrxdiff_jax.train import make_objective
  from ehrxdiff_jax.train.loop import SyntheticBatches, Trainer

  def run(n, rules, **shape):
    cfg = micro_config(tiny_config)
    cfg.mesh.rules = rules
    mesh = _mesh(cfg, n, **shape)
    objective = make_objective(cfg)
    trainer = Trainer(cfg, objective, mesh)
    state = trainer.init_state()
    data = SyntheticBatches(objective.dummy_batch(1), cfg.train.batch_size, seed=3)
    losses = []
    for _ in range(3):
      state, m = trainer.train_step(state, trainer.put_batch(next(data)))
      losses.append(float(m["loss"]))
    specs = jax.tree.map(lambda x: x.sharding.spec, state.params)
    return np.array(losses), specs, float(jax.device_get(state.ema_params["unet"]["conv_in"]["kernel"]).sum())

  return {"one": run(1, FSDP_RULES, data=1),
          "fsdp": run(8, FSDP_RULES, data=2, fsdp=4),
          "tensor": run(8, TENSOR_RULES, data=2, tensor=4)}


def test_ldm_loss_same_on_1_and_8_devices_fsdp(ldm_losses):
  one, fsdp = ldm_losses["one"], ldm_losses["fsdp"]
  assert np.all(np.isfinite(one[0]))
  np.testing.assert_allclose(fsdp[0], one[0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(fsdp[2], one[2], rtol=1e-4)
  # the parameters really are sharded over fsdp
  specs = [s for s in jax.tree.leaves(fsdp[1], is_leaf=lambda x: isinstance(x, P)) if "fsdp" in str(s)]
  assert specs, "no parameter sharded over fsdp"


def test_ldm_loss_same_on_1_and_8_devices_tensor(ldm_losses):
  one, tensor = ldm_losses["one"], ldm_losses["tensor"]
  np.testing.assert_allclose(tensor[0], one[0], atol=1e-5, rtol=0)
  specs = [s for s in jax.tree.leaves(tensor[1], is_leaf=lambda x: isinstance(x, P)) if "tensor" in str(s)]
  assert specs, "no parameter sharded over tensor"
