"""The device mesh, the logical-axis -> mesh-axis rules, and the shardings built from them."""

from __future__ import annotations

import contextlib
import math

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lm.config import MeshConfig
from lm.errors import ConfigError


MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both: fsdp is data parallel too

# Parameters (shape of the tensor that uses the name in a comment) and activations (act_*).
RULES = (
    ("vocab", "tensor"),  # embedding V x D, lm_head D x V
    ("embed", "fsdp"),  # every kernel's d_model side: D x N x H, D x F, ...
    ("q_heads", "tensor"),  # q_proj D x N x H, o_proj N x H x D
    ("kv_heads", "tensor"),  # k_proj, v_proj D x K x H
    ("mlp", "tensor"),  # gate/up D x F, down F x D
    ("head_dim", None),
    ("norm", None),  # RMSNorm scale D
    ("layers", None),  # the stacked axis of scanned layers
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),  # the residual stream is replicated over tensor (Megatron style)
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def _fill_wildcard(sizes: dict[str, int], total: int, cannot_fill) -> dict[str, int]:
  """Sets the -1 entry of `sizes` (if any) to what makes the product `total`; raises ConfigError with
  `cannot_fill(name, product of the others)` when that is not a whole number."""
  fixed = math.prod(v for v in sizes.values() if v != -1)
  for name, value in sizes.items():
    if value == -1:
      if total % fixed:
        raise ConfigError(cannot_fill(name, fixed))
      sizes[name] = total // fixed
  return sizes


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
  """Resolves the -1 axis and checks the product against the devices."""
  sizes = _fill_wildcard(
      {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}, num_devices,
      lambda name, fixed: f"config.mesh.{name} = -1 cannot fill {num_devices} devices: the other axes take "
                          f"{fixed}, which does not divide {num_devices}. Choose mesh sizes whose product "
                          "divides the device count.")
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(
        f"config.mesh = {sizes} needs {math.prod(sizes.values())} devices but {num_devices} are present. "
        "Set the axes so that their product is the device count, or set one of them to -1.")
  return sizes


def granule(device) -> int:
  """The group of devices joined by the fast interconnect that `device` belongs to: its TPU slice (the
  chips of a slice, on all its hosts, share ICI; slices talk over the data-centre network), elsewhere its
  process (host)."""
  return getattr(device, "slice_index", 0) if device.platform == "tpu" else device.process_index


def granules(devices) -> tuple[int, str]:
  """(how many granules `devices` span, what they are called in messages)."""
  return len({granule(d) for d in devices}), "TPU slice(s)" if devices[0].platform == "tpu" else "process(es)"


def dcn_shape(cfg: MeshConfig, sizes: dict[str, int], num_granules: int,
              what: str = "process(es)") -> dict[str, int]:
  """How many granules (`what`: TPU slices, or processes) each axis of `sizes` spans: resolves the -1
  and checks the splits."""
  dcn = _fill_wildcard(
      {"data": cfg.dcn_data, "fsdp": cfg.dcn_fsdp, "tensor": cfg.dcn_tensor}, num_granules,
      lambda name, fixed: f"config.mesh.dcn_{name} = -1 cannot fill {num_granules} {what}: the other "
                          f"dcn_ axes take {fixed}, which does not divide {num_granules}. The dcn_ sizes "
                          f"multiply to the number of {what} (1 for a single one).")
  if math.prod(dcn.values()) != num_granules:
    raise ConfigError(
        f"config.mesh dcn_data x dcn_fsdp x dcn_tensor = {dcn} spans {math.prod(dcn.values())} {what}, "
        f"but there are {num_granules}. Make their product the number of {what}, or set one to -1.")
  for name, value in dcn.items():
    if sizes[name] % value:
      raise ConfigError(
          f"config.mesh.{name} = {sizes[name]} cannot be split over config.mesh.dcn_{name} = {value} "
          f"{what}. Put the split across them on an axis with room for it (e.g. "
          f"--config.mesh.dcn_data=1 --config.mesh.dcn_fsdp=-1 when data parallelism is 1), or resize the axes.")
  return dcn


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
  """The mesh over `devices`. Each axis's dcn_ part spans granules (TPU slices, or processes on CPU and
  GPU), outermost; the rest of it stays within a granule."""
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(cfg, len(devices))
  num_granules, what = granules(devices)
  dcn = dcn_shape(cfg, sizes, num_granules, what)
  # Axes are Auto so that jit propagates shardings from the in/out annotations and the constraints.
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if num_granules == 1:
    # make_mesh orders devices for the physical topology (ICI rings on TPU), over all hosts of a slice.
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=axis_types,
                         devices=devices)
  # Each granule's devices form the within-granule part of every axis, ordered for its topology, and the
  # granules are laid out along the dcn_ parts, outermost. With the default (data across hosts) process p
  # of a CPU or GPU run holds the p-th block of consecutive rows of every batch.
  within = tuple(sizes[a] // dcn[a] for a in MESH_AXES)
  grid = mesh_utils.create_hybrid_device_mesh(within, tuple(dcn[a] for a in MESH_AXES), devices,
                                              process_is_granule=devices[0].platform != "tpu")
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)


def describe(mesh: jax.sharding.Mesh, cfg: MeshConfig) -> str:
  """`data=4 x fsdp=2 x tensor=1`, and with several granules the part of each axis across them."""
  text = " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
  count, what = granules(list(mesh.devices.flat))
  if count > 1:
    dcn = dcn_shape(cfg, dict(mesh.shape), count, what)
    text += f" (across {what.replace('(s)', 's').replace('(es)', 'es')}: " + " x ".join(
        f"{k}={v}" for k, v in dcn.items()) + ")"
  return text


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh):
  """Mesh and rules for tracing: the model's activation constraints resolve against them."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    yield


@contextlib.contextmanager
def rules_within(axis: str):
  """The rules inside a `shard_map` that is manual over `axis`: activations name the other axes only
  (the manual axis is already split off)."""
  def without(target):
    if isinstance(target, tuple):
      kept = tuple(a for a in target if a != axis)
      return kept if len(kept) > 1 else (kept[0] if kept else None)
    return None if target == axis else target

  with nn.logical_axis_rules(tuple((name, without(target)) for name, target in RULES)):
    yield


def logical_to_sharding(logical_specs, mesh: jax.sharding.Mesh):
  """A tree of logical PartitionSpecs (from `nn.get_partition_spec`) -> NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, RULES)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def step_batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The global batch of an optimizer step, [micro-batches, rows, ...]: each micro-batch's rows split
  over the batch axes as `batch_sharding` splits one micro-batch."""
  return NamedSharding(mesh, P(None, BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def process_rows(mesh: jax.sharding.Mesh, rows: int, devices=None) -> np.ndarray:
  """Positions, in order, of the rows of a `rows`-row batch that `devices` (this process's, by default)
  hold under `batch_sharding`: the rows a process reads and passes to `put_batch`. All of them for one
  process; replicas (tensor axis) hold the same rows."""
  devices = set(mesh.local_devices if devices is None else devices)
  index_map = batch_sharding(mesh).devices_indices_map((rows,))
  held = {row for device, index in index_map.items() if device in devices for row in range(rows)[index[0]]}
  return np.array(sorted(held), np.int64)


def put_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
              rows: int | None = None) -> dict[str, jax.Array]:
  """Global arrays of `rows` rows from this process's rows of them (`process_rows`, in that order), placed
  with `batch_sharding`; by default the batch is the whole global batch (one process)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v, (rows or len(v), *v.shape[1:]))
          for k, v in batch.items()}


def get_batch(array: jax.Array, mesh: jax.sharding.Mesh) -> np.ndarray:
  """This process's rows of a global array (`process_rows` of it, in that order: what `put_batch` takes), read
  from the shards on its devices, whatever the array's sharding that leaves them there."""
  out, held = np.empty(array.shape, array.dtype), np.zeros(array.shape[0], bool)
  for shard in array.addressable_shards:
    out[shard.index], held[shard.index[0]] = np.asarray(shard.data), True
  rows = process_rows(mesh, array.shape[0])
  if not held[rows].all():
    raise ValueError(f"An array of {array.shape[0]} rows placed with {array.sharding} leaves some of this process's "
                     "rows on other processes' devices.")
  return out[rows]


def put_step_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
                   rows: int | None = None) -> dict[str, jax.Array]:
  """Global arrays [micro-batches, `rows`, ...] from this process's rows of every micro-batch
  ([micro-batches, its rows, ...], `process_rows` of each, in that order), placed with
  `step_batch_sharding`; by default the rows are all of them (one process)."""
  sharding = step_batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0], rows or v.shape[1], *v.shape[2:]))
          for k, v in batch.items()}


def check_divisible(model, sizes: dict[str, int]) -> None:
  """Every sharded parameter dimension must split evenly over its mesh axis."""
  checks = (
      ("fsdp", "model.d_model", model.d_model),
      ("tensor", "model.num_heads", model.num_heads),
      ("tensor", "model.num_kv_heads", model.num_kv_heads),
      ("tensor", "model.mlp_dim", model.mlp_dim),
      ("tensor", "model.vocab_size", model.vocab_size),
  )
  for axis, key, value in checks:
    if value % sizes[axis]:
      raise ConfigError(
          f"config.{key} = {value} does not split over config.mesh.{axis} = {sizes[axis]} devices. "
          f"Choose a mesh.{axis} size that divides {value} (for example 1).")


def strip_boxes(tree):
  """Values out of flax's logical-partitioning boxes, without applying sharding constraints (the
  shardings are given to jit explicitly; constraints here would need concrete arrays)."""
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))
