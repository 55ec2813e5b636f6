"""The analytic FLOPs per token against XLA's count of the compiled train step; hardware FLOPs and HFU."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from lm.model import sharding
from lm.training import flop_count, runtime
from lm.training.optimizer import make_optimizer
from tests.helpers import base_config

SEQ_LEN = 128


def config(rows: int = 8, accumulation: int = 1, **model):
  """A model whose matmuls dominate: d_model 256 against 64 keys and a 512-token vocabulary."""
  c = base_config()
  fields = dict(vocab_size=512, d_model=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                mlp_dim=768, max_seq_len=SEQ_LEN, scan_layers=False)
  fields.update(model)
  return dataclasses.replace(
      c, model=dataclasses.replace(c.model, **fields),
      train=dataclasses.replace(c.train, seq_len=SEQ_LEN, micro_batch_size=rows,
                                gradient_accumulation_steps=accumulation),
      mesh=dataclasses.replace(c.mesh, data=-1, fsdp=1, tensor=1))


@functools.cache  # configs are frozen dataclasses: the tests share compiles
def compile_step(cfg, num_devices: int = 1):
  rt = runtime.setup(cfg, jax.devices()[:num_devices])
  with sharding.activate(rt.mesh):
    fns = runtime.train_functions(rt, make_optimizer(cfg.train, 10))
    return fns.step_fn.lower(fns.abstract_state, rt.abstract_step_batch()).compile()


def variants(num_devices: int = 1):
  """config -> its step compiled: what hardware_flops_per_device extrapolates from."""
  return lambda cfg: compile_step(cfg, num_devices)


@pytest.fixture(scope="module")
def plain():
  cfg = config()
  return cfg, compile_step(cfg)


def test_analytic_flops_match_xla_without_remat(plain):
  cfg, compiled = plain
  tokens = cfg.train.micro_batch_size * SEQ_LEN
  per_token = flop_count.flops_per_token(cfg.model, SEQ_LEN)
  xla = flop_count.xla_flops(compiled)
  # XLA multiplies the whole attention square, masked half included: add that half to compare like
  # with like. What remains is elementwise work (norms, rotary, softmax, AdamW) that XLA counts too.
  executed = (per_token.train + 3 * per_token.attention_scores) * tokens
  assert 1.0 <= xla / executed < 1.03, (xla, executed)
  assert 1.0 <= xla / (per_token.train * tokens) < 1.06


def test_sharded_step_counts_one_device_share(plain):
  cfg, compiled = plain
  sharded = compile_step(cfg, num_devices=8)  # 8 rows on each of 8 devices
  assert flop_count.xla_flops(sharded) == pytest.approx(flop_count.xla_flops(compiled), rel=0.01)
  flops = flop_count.step_flops(cfg, num_devices=8, data_parallel=8, compile_variant=variants(8))
  assert flops.hardware == pytest.approx(8 * flop_count.xla_flops(compiled), rel=0.01)
  assert flops.model == flop_count.flops_per_token(cfg.model, SEQ_LEN).train * 64 * SEQ_LEN


# 8: data parallel, so the step accumulates locally; 1 under -m slow.
@pytest.mark.parametrize("num_devices", [pytest.param(1, marks=pytest.mark.slow), 8])
def test_accumulation_counts_every_micro_batch_and_one_update(num_devices):
  # One sequence per micro-batch, so that the optimizer (about 10 FLOPs per parameter, once per step)
  # is a visible part of a micro-step's 6 x 128 FLOPs per parameter.
  single, accumulating = config(rows=1), config(rows=1, accumulation=4)
  one = flop_count.step_flops(single, num_devices, num_devices, variants(num_devices))
  four = flop_count.step_flops(accumulating, num_devices, num_devices, variants(num_devices))
  # XLA counts the scan over the micro-batches once: the program alone undercounts.
  assert flop_count.xla_flops(compile_step(accumulating, num_devices)) * num_devices < 0.8 * four.hardware
  # 4 gradients and 1 update: less than 4 whole single-micro-batch steps, by 3 optimizer updates.
  update = (4 * one.hardware - four.hardware) / num_devices  # every replica runs the whole update
  params = sum(np.prod(x.shape) for x in jax.tree.leaves(runtime.setup(single, jax.devices()[:1]).abstract_params))
  assert 5 * params < update / 3 < 30 * params, (update / 3, params)
  assert four.model == 4 * one.model


@pytest.mark.slow  # ~20 s of compiles
def test_scanned_layers_are_extrapolated_from_unrolled_ones():
  scanned = config(num_layers=3, scan_layers=True)  # unrolled, 2 layers of it is the `plain` step
  compiled = compile_step(scanned)
  three = flop_count.xla_flops(compile_step(dataclasses.replace(scanned, model=dataclasses.replace(
      scanned.model, scan_layers=False))))
  # XLA counts the scan's body once: the scanned step alone misses two of the three layers.
  assert flop_count.xla_flops(compiled) < 0.6 * three
  hardware = flop_count.hardware_flops_per_device(scanned, variants())
  assert hardware == pytest.approx(three, rel=1e-4)


def test_remat_recomputation_is_hardware_flops_not_model_flops(plain):
  cfg, compiled = plain
  remat = config(remat="full")
  flops = flop_count.step_flops(remat, 1, 1, variants())
  assert flops.model == flop_count.step_flops(cfg, 1, 1, variants()).model
  # The backward pass recomputes most of each layer's forward: the layers are about 2/3 of the FLOPs
  # here, the forward a third of them, minus what the backward does not need again.
  assert 1.15 < flops.hardware / flops.model < 1.35
  mfu, hfu = flops.utilisation(step_seconds=1.0, num_devices=1, peak_per_device=flops.hardware * 2)
  assert mfu < hfu == pytest.approx(0.5)


@pytest.mark.parametrize("window", [1, 5, 64, 127, 128, 500])
def test_a_sliding_window_counts_the_keys_it_attends_to(window):
  # The mean over positions of the keys the mask lets each query see, against the closed form. The
  # closed form keeps the full layer's convention (seq_len / 2, not (seq_len + 1) / 2): within half a key.
  from lm.model.attention import mask as attention_mask

  mask = np.asarray(attention_mask(np.ones((1, SEQ_LEN), np.int32), window if window < 500 else 0))
  assert abs(mask.sum() / SEQ_LEN - flop_count.attended_keys(SEQ_LEN, window)) <= 0.5


def test_sliding_window_layers_count_only_their_window():
  gemma_like = config(num_layers=7, sliding_window=16, local_layers_per_global=5).model  # 6 local, 1 global
  full = config(num_layers=7).model
  flops, full_flops = flop_count.flops_per_token(gemma_like, SEQ_LEN), flop_count.flops_per_token(full, SEQ_LEN)
  per_key = 4 * full.num_heads * full.head_dim  # scores and values, 2 FLOPs per multiply-add
  assert flops.attention_scores == per_key * (SEQ_LEN / 2 + 6 * (16 - 16 * 16 / (2 * SEQ_LEN)))
  assert full_flops.attention_scores == per_key * 7 * SEQ_LEN / 2
  # Gated MLP: gate, up and down, 2 FLOPs per multiply-add; the rest does not depend on the window.
  assert flops.mlp == full_flops.mlp == 7 * 2 * 3 * full.d_model * full.mlp_dim
  assert flops.attention_projections == full_flops.attention_projections


def test_lora_counts_no_weight_gradients_of_the_frozen_base():
  """Under LoRA the base weights' gradients are never computed: a step is 2x their forward, not 3x."""
  cfg = config(lora_rank=8)
  tokens = cfg.train.micro_batch_size * SEQ_LEN
  per_token = flop_count.flops_per_token(cfg.model, SEQ_LEN)
  assert per_token.frozen and per_token.adapters > 0
  executed = (per_token.train + 3 * per_token.attention_scores) * tokens  # the masked half, as above
  assert 1.0 <= flop_count.xla_flops(compile_step(cfg)) / executed < 1.05
