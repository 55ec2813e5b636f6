"""The mesh across processes (hosts) and which rows of a batch each process reads."""

import jax
import numpy as np
import pytest

from lm.errors import ConfigError
from lm.model import sharding
from tests.helpers import mesh_config


def test_each_process_reads_the_rows_of_its_devices():
  mesh = sharding.make_mesh(mesh_config(data=4, fsdp=2, tensor=1))
  devices = mesh.devices.flatten()  # in batch order: data-parallel position d holds rows 2d, 2d + 1
  np.testing.assert_array_equal(sharding.process_rows(mesh, 16), np.arange(16))  # one process: all
  # Two hosts of four devices, data split across them: each reads one contiguous half.
  np.testing.assert_array_equal(sharding.process_rows(mesh, 16, devices[:4]), np.arange(8))
  np.testing.assert_array_equal(sharding.process_rows(mesh, 16, devices[4:]), np.arange(8, 16))
  # Hosts split along fsdp instead (dcn_fsdp): each holds every other block of rows.
  fsdp_column = mesh.devices[:, 1, 0]
  np.testing.assert_array_equal(sharding.process_rows(mesh, 16, fsdp_column), [2, 3, 6, 7, 10, 11, 14, 15])


def test_tensor_replicas_read_the_same_rows():
  mesh = sharding.make_mesh(mesh_config(data=2, fsdp=2, tensor=2))
  replicas = mesh.devices[0, 0, :]  # the same batch block on both tensor devices
  np.testing.assert_array_equal(sharding.process_rows(mesh, 8, replicas), [0, 1])


def test_put_batch_from_the_rows_of_this_process():
  mesh = sharding.make_mesh(mesh_config(data=4, fsdp=2, tensor=1))
  rows = np.arange(16 * 3, dtype=np.int32).reshape(16, 3)
  whole = sharding.put_batch({"tokens": rows}, mesh)["tokens"]
  mine = sharding.put_batch({"tokens": rows[sharding.process_rows(mesh, 16)]}, mesh, 16)["tokens"]
  for a, b in zip(whole.addressable_shards, mine.addressable_shards):
    assert a.device == b.device and a.index == b.index
    np.testing.assert_array_equal(a.data, b.data)
  np.testing.assert_array_equal(sharding.get_batch(mine, mesh), rows)  # back: this process's rows, in order
  np.testing.assert_array_equal(sharding.get_batch(jax.device_put(rows, sharding.replicated(mesh)), mesh), rows)


@pytest.mark.parametrize("dcn,processes,sizes,expected", [
    ({}, 1, {"data": 8, "fsdp": 1, "tensor": 1}, {"data": 1, "fsdp": 1, "tensor": 1}),
    ({}, 4, {"data": 8, "fsdp": 2, "tensor": 1}, {"data": 4, "fsdp": 1, "tensor": 1}),
    ({"dcn_data": 1, "dcn_fsdp": -1}, 2, {"data": 1, "fsdp": 16, "tensor": 1}, {"data": 1, "fsdp": 2, "tensor": 1}),
    ({"dcn_data": 2, "dcn_fsdp": 2}, 4, {"data": 2, "fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 1}),
])
def test_dcn_shape(dcn, processes, sizes, expected):
  assert sharding.dcn_shape(mesh_config(**dcn), sizes, processes) == expected


@pytest.mark.parametrize("dcn,processes,sizes,message", [
    ({}, 2, {"data": 1, "fsdp": 16, "tensor": 1}, "config.mesh.data = 1 cannot be split over config.mesh.dcn_data = 2"),
    ({"dcn_fsdp": 2}, 1, {"data": 8, "fsdp": 2, "tensor": 1}, "config.mesh.dcn_data = -1 cannot fill 1 process"),
    ({"dcn_data": 2}, 4, {"data": 8, "fsdp": 2, "tensor": 1}, r"spans 2 process\(es\), but there are 4"),
    ({"dcn_fsdp": 3}, 4, {"data": 8, "fsdp": 3, "tensor": 1}, "config.mesh.dcn_data = -1 cannot fill 4 process"),
])
def test_dcn_shape_errors_name_the_key(dcn, processes, sizes, message):
  with pytest.raises(ConfigError, match=message):
    sharding.dcn_shape(mesh_config(**dcn), sizes, processes)


def test_one_process_keeps_the_topology_ordered_mesh():
  cfg = mesh_config(data=4, fsdp=2, tensor=1)
  expected = jax.make_mesh((4, 2, 1), sharding.MESH_AXES, devices=jax.devices())
  np.testing.assert_array_equal(sharding.make_mesh(cfg).devices, expected.devices)
  assert sharding.describe(sharding.make_mesh(cfg), cfg) == "data=4 x fsdp=2 x tensor=1"
