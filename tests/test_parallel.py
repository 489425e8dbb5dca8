"""Mesh, logical rules -> shardings (parameters and activations), batch placement, and the LDM
step's equivalence across meshes."""
import re
from collections import Counter

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
    ema_sum = float(jax.device_get(state.ema_params["unet"]["conv_in"]["kernel"]).sum())
    return np.array(losses), specs, ema_sum, trainer.compile().as_text()

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


# ------------------------------------------------------------------ activation shardings

B = ("data", "fsdp")  # the 'batch' rule of FSDP_RULES and TENSOR_RULES


def _micro_activations(spec_b, spec_heads):
  """{(shape, per-axis mesh axes): count} that the micro LDM's step should constrain, each once
  forward and once backward, with batch 8: the UNet's block inputs/outputs (NHWC: 16x16 with 3, 16
  or 32 channels, 8x8 with 16 or 32), q/k/v [B, L, heads 2, head dim] of every attention and the
  context [8, 8 tokens, 32]. Attention: 4 UNet transformers at 8x8 (down_1_attn_0, mid_attn,
  up_1_attn_0/1), each self q/k/v and cross q over L 64 and cross k/v over the 8 context tokens
  (head dim 16); the table tower's layer over 8 events (head dim 8); the image tower's block over
  1 + 2x2 patches (head dim 16)."""
  img = lambda *shape: ((8,) + shape, (spec_b, (), (), ()))  # noqa: E731
  qkv = lambda n, head_dim: ((8, n, 2, head_dim), (spec_b, (), spec_heads, ()))  # noqa: E731
  return Counter({img(16, 16, 3): 3, img(16, 16, 16): 8, img(8, 8, 16): 2, img(8, 8, 32): 18,
                  img(16, 16, 32): 2, qkv(64, 16): 32, qkv(8, 16): 16, qkv(8, 8): 6, qkv(5, 16): 6,
                  ((8, 8, 32), (spec_b, (), ())): 2})


def _constraints(stablehlo: str) -> Counter:
  """(shape, per-axis mesh axes) of every sdy.sharding_constraint in a lowered module."""
  out = Counter()
  for line in stablehlo.splitlines():
    m = re.search(r"sdy\.sharding_constraint %\S+ <@mesh, \[(.*)\]> : tensor<([\dx]+)x\w+>", line)
    if m:
      axes = tuple(tuple(re.findall(r'"(\w+)"', d)) for d in re.findall(r"\{([^}]*)\}", m.group(1)))
      out[(tuple(int(n) for n in m.group(2).split("x")), axes)] += 1
  return out


def test_step_constrains_the_activations_to_their_logical_shardings(tiny_config):
  """The lowered LDM train step on data x fsdp x tensor = 2 x 2 x 2 with TENSOR_RULES annotates
  exactly the intended activations: batch over ('data', 'fsdp'), attention heads over 'tensor'."""
  from ehrxdiff_jax.train import make_objective
  from ehrxdiff_jax.train.loop import Trainer
  cfg = micro_config(tiny_config)
  cfg.mesh.rules = TENSOR_RULES
  mesh = _mesh(cfg, 8, data=2, fsdp=2, tensor=2)
  trainer = Trainer(cfg, make_objective(cfg), mesh)
  with jax.set_mesh(mesh):
    text = trainer._step.lower(trainer.abstract_state(), trainer.batch_spec()).as_text()
  assert _constraints(text) == _micro_activations(B, ("tensor",))
  # The model names no mesh axis: without the rules (e.g. a single-device caller) nothing is
  # constrained.
  with jax.set_mesh(mesh):
    plain = jax.jit(trainer._train_step).lower(trainer.abstract_state(), trainer.batch_spec())
  assert not _constraints(plain.as_text())


def test_compiled_fsdp_step_keeps_the_batch_split(ldm_losses):
  """In the compiled FSDP step (data 2 x fsdp 4, batch 8) every device holds one sample of each
  annotated activation: per-device q/k/v and UNet blocks have batch 1, no device a whole-batch q."""
  hlo = ldm_losses["fsdp"][3]
  for shape in ((1, 64, 2, 16), (1, 8, 2, 8), (1, 5, 2, 16), (1, 16, 16, 16), (1, 8, 8, 32),
                (1, 8, 32)):
    assert f"f32[{','.join(map(str, shape))}]" in hlo, shape
  for shape in ((8, 64, 2, 16), (8, 8, 8, 32), (8, 16, 16, 16)):
    assert f"f32[{','.join(map(str, shape))}]" not in hlo, shape
