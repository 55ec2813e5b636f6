"""The device mesh, the logical-axis -> mesh-axis rules, and the shardings built from them."""

from __future__ import annotations

import contextlib
import math

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lm.config import ConfigError, MeshConfig

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


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
  """Resolves the -1 axis and checks the product against the devices."""
  sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
  fixed = math.prod(v for v in sizes.values() if v != -1)
  for name, value in sizes.items():
    if value == -1:
      if num_devices % fixed:
        raise ConfigError(
            f"config.mesh.{name} = -1 cannot fill {num_devices} devices: the other axes take {fixed}, "
            f"which does not divide {num_devices}. Choose mesh sizes whose product divides the device count.")
      sizes[name] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(
        f"config.mesh = {sizes} needs {math.prod(sizes.values())} devices but {num_devices} are present. "
        "Set the axes so that their product is the device count, or set one of them to -1.")
  return sizes


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  # make_mesh orders devices for the physical topology (ICI rings on TPU); axes are Auto so that
  # jit propagates shardings from the in/out annotations and the constraints.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh):
  """Mesh and rules for tracing: the model's activation constraints resolve against them."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    yield


def logical_to_sharding(logical_specs, mesh: jax.sharding.Mesh):
  """A tree of logical PartitionSpecs (from `nn.get_partition_spec`) -> NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, RULES)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_batch(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Global arrays from the host copy of the whole batch: each process places only the rows of its own
  devices, so this is right for one process or many."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
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
