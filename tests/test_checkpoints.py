"""lm/checkpoints/checkpoint.py: checkpoints of an earlier layout still restore."""

import jax
import jax.numpy as jnp
import numpy as np

from lm.checkpoints import checkpoint
from lm.model.decoder import Decoder
from lm.training.optimizer import make_optimizer
from lm.training.train_step import init_opt_state
from tests.helpers import base_config, tiny_model
from tests.test_train_step import _init


def test_checkpoints_with_and_without_the_accumulator_restore_into_either_state(tmp_path):
  """MultiSteps' accumulator (opt_state.acc_grads, zeros between steps) is in the train state only where
  the step scans micro-batches into it; every checkpoint before 2026-12-07 held it. Either restores into
  either: the accumulator read and dropped, or zeros; everything else as saved."""
  config = base_config()
  tx = make_optimizer(config.train, 10)
  state = _init(Decoder(tiny_model()), tx)  # the earlier layout: tx.init's full MultiSteps state
  moved = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
  moved = moved.replace(opt_state=moved.opt_state._replace(acc_grads=state.opt_state.acc_grads))  # zeros
  checkpoints = checkpoint.Checkpoints(str(tmp_path), config.train)
  checkpoints.save(2, moved.saved(), {"run": "earlier"})
  lean = moved.replace(opt_state=moved.opt_state._replace(acc_grads=None))
  checkpoints.save(4, lean.saved(), {"run": "today"})
  checkpoints.seal()
  assert checkpoint.saved_tree(str(tmp_path / "2" / "state"))["opt_state"]["acc_grads"] is not None
  assert checkpoint.saved_tree(str(tmp_path / "4" / "state"))["opt_state"]["acc_grads"] is None

  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  for carry in (False, True):
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          {"params": state.params, "opt_state": init_opt_state(tx, state.params, carry)})
    expected = lean.saved() if not carry else {
        **lean.saved(), "opt_state": lean.opt_state._replace(acc_grads=jax.tree.map(jnp.zeros_like, state.params))}
    for step in (2, 4):
      restored = checkpoint.restore_state(checkpoints.manager, step, target)
      assert (restored["opt_state"].acc_grads is None) == (not carry)
      jax.tree.map(np.testing.assert_array_equal, restored, expected)
