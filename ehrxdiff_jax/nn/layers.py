"""Building blocks with logical axis names on every parameter, shared by all networks.

Logical names (the mesh rules of configs/base.py map them to mesh axes; model code names no mesh):
  'embed'    model width of a Dense input/output (transformer width, time-embedding width)
  'mlp'      hidden width of MLPs / feed-forward layers
  'heads'    flattened heads x head_dim of attention projections
  'conv_in'  input channels of a convolution kernel
  'conv_out' output channels of a convolution kernel (and of its bias)
  'tokens'   a token-axis Linear (the fusion adapter) or positional embeddings
  'norm'     scales and offsets of normalisation layers (always replicated)
Activations (`constrain`): 'batch' for the leading axis, 'heads' for the head axis of attention
q/k/v; their other axes are left unnamed (replicated).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
CONV_KERNEL_AXES = (None, None, "conv_in", "conv_out")


def compute_dtype(name: str) -> Dtype:
  """Maps a config string ('float32' | 'bfloat16' | 'float16') to a jnp dtype."""
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
  return DTYPES[name]


def partitioned(init, axes: Sequence[str | None]):
  return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """x with the sharding its logical axis `names` map to under the active rules (the config's mesh
  rules, active inside `parallel.under_rules`) and the mesh of `jax.set_mesh`, resolved as the
  parameters' are (`parallel.logical_to_spec`). A no-op without rules or mesh (single-device code,
  init, tests)."""
  rules = nn.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return x
  from ehrxdiff_jax.parallel import logical_to_spec
  return jax.lax.with_sharding_constraint(x, logical_to_spec(tuple(names), x.shape, rules, mesh))


def Dense(features: int, axes: tuple[str | None, str | None], *, use_bias: bool = True,
          dtype: Dtype = jnp.float32, name: str | None = None,
          kernel_init=nn.initializers.lecun_normal()) -> nn.Dense:
  """nn.Dense whose kernel carries `axes` = (input axis, output axis), its bias axes[1]."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=partitioned(kernel_init, axes),
                  bias_init=partitioned(nn.initializers.zeros_init(), (axes[1],)), name=name)


def Conv(features: int, kernel_size: int = 3, *, strides: int = 1, padding: Any = "SAME",
         use_bias: bool = True, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Conv:
  """NHWC convolution, kernel (kh, kw, conv_in, conv_out). An integer `padding` pads symmetrically
  as in torch."""
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides), padding=padding,
                 use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=partitioned(nn.initializers.lecun_normal(), CONV_KERNEL_AXES),
                 bias_init=partitioned(nn.initializers.zeros_init(), ("conv_out",)), name=name)


def GroupNorm(num_groups: int, epsilon: float = 1e-6, *, dtype: Dtype = jnp.float32,
              name: str | None = None) -> nn.GroupNorm:
  # Two-pass variance as in torch: E[x^2]-E[x]^2 loses digits in fp32 on un-centred activations.
  return nn.GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32,
                      use_fast_variance=False,
                      scale_init=partitioned(nn.initializers.ones_init(), ("norm",)),
                      bias_init=partitioned(nn.initializers.zeros_init(), ("norm",)), name=name)


def LayerNorm(epsilon: float = 1e-5, *, dtype: Dtype = jnp.float32,
              name: str | None = None) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32,
                      use_fast_variance=False,
                      scale_init=partitioned(nn.initializers.ones_init(), ("norm",)),
                      bias_init=partitioned(nn.initializers.zeros_init(), ("norm",)), name=name)


def maybe_remat(module_cls, policy: str, static_argnums: tuple[int, ...] = ()):
  """Wraps a block class in jax.checkpoint when the config asks for it ('none' | 'block')."""
  if policy == "none":
    return module_cls
  if policy == "block":
    return nn.remat(module_cls, static_argnums=static_argnums)
  raise ValueError(f"unknown remat policy {policy!r}; expected 'none' or 'block'")
