"""config.train.batch_invariant: the same bits however the global batch is split (micro-batch size x
accumulation x data-parallel devices), against the default, which agrees only to float32 rounding."""

import dataclasses
import functools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lm.model import sharding
from lm.model.decoder import Decoder
from lm.training.optimizer import make_optimizer
from lm.training.train_step import train_step
from tests.helpers import FAST_COMPILE, mesh_config, tiny_model
from tests.test_train_step import _batch, _init, _train_cfg, micro_batches

ROWS, STEPS = 8, 20


def _train(k: int, devices: int, invariant_rows: int, steps: int = STEPS, dtype: str = "float32"):
  """`steps` AdamW steps (lr 1e-3) of the global batch of ROWS rows split into k micro-batches of
  ROWS / (k x devices) rows on each of `devices` data-parallel devices: (per-sequence losses [steps, ROWS],
  parameters, gradient norms)."""
  model = Decoder(tiny_model(dtype=dtype))
  tx = make_optimizer(dataclasses.replace(_train_cfg(k), learning_rate=1e-3), 100)
  mesh = sharding.make_mesh(mesh_config(data=devices, fsdp=1, tensor=1), jax.devices()[:devices])
  state = _init(model, tx)
  batch = sharding.put_step_batch(micro_batches(_batch(ROWS), k), mesh)
  with sharding.activate(mesh):
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, accumulation_steps=k,
                                     local_axis="data" if devices > 1 else None, invariant_rows=invariant_rows))
    losses, norms = [], []
    for _ in range(steps):
      state, figures = step(state, batch)
      losses.append(np.asarray(figures["sequence_loss"]))
      norms.append(np.asarray(figures["grad_norm"]))
  return np.stack(losses), jax.device_get(state.params), np.stack(norms)


def _bitwise(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.fixture(scope="module")
def reference():
  """One device, one micro-batch of all 8 rows, in the mode."""
  return _train(1, 1, 1)


# (micro-batches, devices): 8 x 1, 4 x 2 and 2 x 4 rows on one device; one row on each of 8 devices; and
# two devices accumulating 2 micro-batches of 2 rows.
@pytest.mark.parametrize("k,devices", [(8, 1), (4, 1), (2, 1), (1, 8), (2, 2)])
def test_every_split_trains_to_the_same_bits(reference, k, devices):
  losses, params, norms = _train(k, devices, 1)
  assert np.array_equal(losses, reference[0])
  assert np.array_equal(norms, reference[2])
  assert _bitwise(params, reference[1])
  # It trained: a comparison of the initial parameters would pass trivially.
  assert reference[0][-1].sum() < reference[0][0].sum()


def test_without_the_mode_the_splits_differ_in_the_last_bits():
  """The default runs a micro-batch's rows through one forward (XLA:CPU may round a batch of 8 rows
  differently from 8 batches of one: here already the first step's losses) and sums their gradients inside
  its matmuls, the micro-batches in the accumulator: 8 x 1 and 1 x 8 agree within float32 rounding only.
  The mode is what makes them equal."""
  one_batch, accumulated = _train(1, 1, 0), _train(8, 1, 0)
  assert not _bitwise(one_batch[1], accumulated[1])
  assert not np.array_equal(one_batch[0], accumulated[0])
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(one_batch[1]),
                                                           jax.tree.leaves(accumulated[1])))
  assert 0 < diff < 1e-4


def test_groups_of_two_rows_agree_across_their_splits():
  """batch_invariant_rows = 2: larger groups, the same guarantee for splits whose rows per device it
  divides."""
  losses, params, _ = _train(1, 1, 2, steps=3)
  for k, devices in [(4, 1), (2, 2)]:
    other_losses, other_params, _ = _train(k, devices, 2, steps=3)
    assert np.array_equal(losses, other_losses) and _bitwise(params, other_params), (k, devices)


def test_bfloat16_compute_agrees_across_devices_with_the_flag_main_sets():
  """With bfloat16 compute XLA may keep intermediates in float32 where a fusion allows, differently in the
  programs of 1 and 2 devices; main.py sets --xla_allow_excess_precision=false in the mode (a flag read
  when jax starts: a process of its own)."""
  code = ("import numpy as np\n"
          "from tests.test_batch_invariant import _train, _bitwise\n"
          "ref = _train(1, 1, 1, steps=3, dtype='bfloat16')\n"
          "for k, devices in [(8, 1), (1, 8), (2, 2)]:\n"
          "  other = _train(k, devices, 1, steps=3, dtype='bfloat16')\n"
          "  assert np.array_equal(other[0], ref[0]) and _bitwise(other[1], ref[1]), (k, devices)\n"
          "print('bitwise')\n")
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE} "
                                   "--xla_allow_excess_precision=false")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0 and "bitwise" in result.stdout, result.stderr[-3000:]
