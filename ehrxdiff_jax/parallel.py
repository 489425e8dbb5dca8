"""Device mesh, logical-axis rules -> shardings, batch placement and multi-host start-up.

The only module (with the config's rule tables) that knows mesh axis names. Model code names logical
axes (ehrxdiff_jax/nn/layers.py) of parameters and of activations (`constrain`, active inside
`under_rules`); `tree_shardings` maps every `nn.Partitioned` leaf of an abstract, boxed pytree to a
`NamedSharding`, and `logical_to_spec` resolves both:

  * each logical name takes the first rule whose mesh axes are not yet used by the same array,
  * a dimension not divisible by the product of its mesh axis sizes stays replicated on it,
  * an array with fewer than `c.mesh.min_shard_size` elements (and every unboxed leaf) is
    replicated.

The batch is sharded on its leading axis over ('data', 'fsdp'); each process feeds its own rows
(`process_batch_rows`) and `to_global` assembles the global `jax.Array` (sending only the event
rows that can be non-zero).
"""
from __future__ import annotations

import functools
import logging
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


# ------------------------------------------------------------------ multi-host


def add_distributed_arguments(parser) -> None:
  """The multi-host flags of every command that runs on several processes (train, sample)."""
  parser.add_argument("--coordinator", default=None,
                      help="multi-host: coordinator address HOST:PORT")
  parser.add_argument("--num-processes", type=int, default=None,
                      help="multi-host: number of processes")
  parser.add_argument("--process-id", type=int, default=None,
                      help="multi-host: this process's index")


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
  """Starts the multi-process runtime when there is more than one process.

  Explicit flags win; otherwise SLURM (more than one task) and TPU pod slices initialise
  automatically through `jax.distributed.initialize()`; a plain single-process run does nothing. On
  CPU the gloo collectives are switched on (cross-process all-reduces need them).
  Must run before anything touches a device.
  """
  explicit = coordinator is not None or (num_processes or 1) > 1
  slurm = int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ
  tpu_pod = bool(os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","))
  if not (explicit or slurm or tpu_pod):
    return
  platforms = os.environ.get("JAX_PLATFORMS", "") or ""
  if platforms.startswith("cpu") or os.environ.get("JAX_PLATFORM_NAME") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    if coordinator is None or num_processes is None or process_id is None:
      raise ValueError("--coordinator, --num-processes and --process-id go together")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  else:
    jax.distributed.initialize()
  log.info("distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())


def is_main_process() -> bool:
  return jax.process_index() == 0


# ------------------------------------------------------------------ mesh


def mesh_shape(cfg, num_devices: int | None = None) -> dict[str, int]:
  """Mesh axis sizes from `cfg.mesh.shape` with at most one -1 filled from the device count."""
  n = jax.device_count() if num_devices is None else num_devices
  sizes = {a: int(cfg.mesh.shape.get(a, 1)) for a in MESH_AXES}
  unknown = set(cfg.mesh.shape.keys()) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected {MESH_AXES}")
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {fill}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ValueError(f"mesh axis sizes must be positive or -1, got {sizes}")
  if fill:
    if n % known:
      raise ValueError(f"{n} devices cannot fill mesh {sizes}: {n} is not divisible by {known}")
    sizes[fill[0]] = n // known
  if math.prod(sizes.values()) != n:
    raise ValueError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, have {n}")
  return sizes


def make_mesh(cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ('data', 'fsdp', 'tensor') mesh of the config over `devices` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == jax.device_count():
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(cfg, mesh: Mesh) -> None:
  """Clear errors, before anything compiles, for batch sizes the mesh and accumulation cannot
  split."""
  b, acc = int(cfg.train.batch_size), int(cfg.train.grad_accum)
  dp = data_parallel_size(mesh)
  if acc < 1 or b % acc:
    raise ValueError(f"train.batch_size={b} is not divisible by train.grad_accum={acc}")
  micro = b // acc
  if micro % dp:
    raise ValueError(
        f"the micro-batch ({b} / grad_accum {acc} = {micro}) is not divisible by the data-parallel "
        f"size {dp} (mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}); choose a "
        f"global batch that is a multiple of {dp * acc}")
  if b % jax.process_count():
    raise ValueError(f"train.batch_size={b} is not divisible by the process count "
                     f"{jax.process_count()}")


# ------------------------------------------------------------------ logical rules -> shardings


def _axes_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], rules, mesh: Mesh,
                    min_shard_size: int = 0) -> P:
  """PartitionSpec of one array from its logical axis names (see the module docstring)."""
  if math.prod(shape) < min_shard_size:
    return P()
  used: set[str] = set()
  out = []
  for name, dim in zip(names, shape):
    chosen = None
    if name is not None:
      for rule_name, mesh_axes in rules:
        if rule_name != name:
          continue
        if mesh_axes is None:
          break
        axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        axes = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)  # size-1 axes change nothing
        if any(a in used for a in axes):
          continue
        if axes and dim % _axes_size(mesh, axes) == 0:
          chosen = axes[0] if len(axes) == 1 else axes
          used.update(axes)
        break
    out.append(chosen)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules, min_shard_size: int = 0) -> Any:
  """NamedShardings for an abstract pytree whose leaves may be `nn.Partitioned` boxes.

  The result has the structure of `nn.unbox(abstract_tree)`: boxed leaves get the sharding of their
  logical names, plain leaves (step counters, rng keys, ...) are replicated.
  """
  def one(x):
    if _is_box(x):
      names = x.names
      value = x.value
      if len(names) != len(value.shape):
        raise ValueError(f"logical names {names} do not match shape {value.shape}")
      return NamedSharding(mesh, logical_to_spec(names, value.shape, rules, mesh, min_shard_size))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, abstract_tree, is_leaf=_is_box)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def under_rules(fn, rules):
  """`fn` traced with the logical-axis rules active, so that the activations the networks annotate
  (nn/layers.constrain) get their shardings; jit the result under `jax.set_mesh`."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with nn.logical_axis_rules(rules):
      return fn(*args, **kwargs)
  return wrapped


def rules_from_config(cfg) -> tuple:
  return tuple((str(k), None if v is None else (v if isinstance(v, str) else tuple(v)))
               for k, v in cfg.mesh.rules)


# host batch entry (pipeline._Batcher): the rows of `events` that can be non-zero
EVENT_ROWS = "event_rows"


def device_batch(batch: dict) -> dict:
  """The entries of a host batch that go to the devices (numbers and booleans; not `key` bytes)."""
  return {k: v for k, v in batch.items()
          if isinstance(v, (np.ndarray, jax.Array)) and np.dtype(v.dtype).kind in "biuf"}


def process_batch_rows(mesh: Mesh, global_batch: int) -> tuple[int, int]:
  """[start, stop) of the global batch rows that this process feeds (contiguous by construction)."""
  sharding = batch_sharding(mesh)
  rows = set()
  for index in sharding.addressable_devices_indices_map((global_batch,)).values():
    sl = index[0]
    rows.update(range(*sl.indices(global_batch)))
  start, stop = min(rows), max(rows) + 1
  if stop - start != len(rows):
    raise ValueError("this process's batch rows are not contiguous; the mesh device order is "
                     "unusual")
  return start, stop


def _packed_rows(events: np.ndarray, rows: np.ndarray, granule: int) -> np.ndarray:
  """The first rows[i] rows of every events[i], concatenated, zero-padded to a multiple of
  `granule` rows (a few shapes, so a few compilations of the unpacking)."""
  size = max(granule, -(-int(rows.sum()) // granule) * granule)
  out = np.zeros((size,) + events.shape[2:], events.dtype)
  offset = 0
  for x, r in zip(events, rows):
    out[offset:offset + r] = x[:r]
    offset += r
  return out


@functools.partial(jax.jit, static_argnums=2)
def _unpack_rows(packed, rows, max_events: int):
  """_packed_rows inverted on the device: [R, D] + rows [b] -> [b, max_events, D], zero after
  rows[i]."""
  start = jnp.cumsum(rows) - rows
  slot = jnp.arange(max_events, dtype=jnp.int32)
  valid = slot[None, :] < rows[:, None]
  index = jnp.where(valid, start[:, None] + slot[None, :], 0)
  return jnp.where(valid[..., None], packed[index], jnp.zeros((), packed.dtype))


def _local_shards(sharding, shape, first_row: int):
  """(device, slice of this process's rows) for every addressable device of a batch-sharded
  array."""
  for device, index in sharding.addressable_devices_indices_map(tuple(shape)).items():
    lo, hi, _ = index[0].indices(shape[0])
    yield device, slice(lo - first_row, hi - first_row)


def _put_events(events: np.ndarray, rows: np.ndarray, sharding, shape, first_row: int):
  """`events` [b, E, D] (this process's rows; zero from row rows[i] on) -> (global array, bytes
  sent): each device is sent only its samples' first rows, packed, and unpacks them itself."""
  max_events = events.shape[1]
  granule = max(1, max_events // 8)
  rows = np.clip(np.asarray(rows, np.int32), 0, max_events)
  pieces, sent, packed_of = [], 0, {}
  for device, sl in _local_shards(sharding, shape, first_row):
    key = (sl.start, sl.stop)
    if key not in packed_of:
      packed_of[key] = _packed_rows(events[sl], rows[sl], granule)
    sent += packed_of[key].nbytes + rows[sl].nbytes
    pieces.append(_unpack_rows(jax.device_put(packed_of[key], device),
                               jax.device_put(rows[sl], device), max_events))
  return jax.make_array_from_single_device_arrays(tuple(shape), sharding, pieces), sent


def to_global(batch: dict, mesh: Mesh, global_batch: int | None = None,
              stats: dict | None = None) -> dict:
  """Host-local batch (this process's rows) -> global jax.Arrays sharded over the batch axes.

  With the host batch's `event_rows` (the rows of `events` that can be non-zero) only those rows
  of `events` travel (`_put_events`); `event_rows` stays on the host. `stats`: adds the bytes
  sent to the devices under 'bytes'."""
  sharding = batch_sharding(mesh)
  arrays = device_batch(batch)
  rows = arrays.pop(EVENT_ROWS, None)
  if not arrays:
    return {}
  local = next(iter(arrays.values())).shape[0]
  n = local * jax.process_count() if global_batch is None else global_batch
  first_row = 0 if jax.process_count() == 1 else process_batch_rows(mesh, n)[0]
  out, sent = {}, 0
  for k, v in arrays.items():
    v = np.asarray(v)
    shape = (n,) + v.shape[1:]
    if k == "events" and rows is not None:
      out[k], b = _put_events(v, rows, sharding, shape, first_row)
      sent += b
      continue
    if jax.process_count() == 1:
      out[k] = jax.device_put(v, sharding)
    else:
      out[k] = jax.make_array_from_process_local_data(sharding, v, shape)
    sent += sum(v[sl].nbytes for _, sl in _local_shards(sharding, shape, first_row))
  if stats is not None:
    stats["bytes"] = stats.get("bytes", 0) + sent
  return out


def describe(mesh: Mesh) -> str:
  axes = " x ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES)
  return f"mesh {axes} on {mesh.devices.size} devices"
