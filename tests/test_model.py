import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import llama_1_36b
from lm.config import from_config_dict
from lm.model import Decoder, param_count
from tests.helpers import tiny_model

B, L = 2, 16


def _inputs(seed=0, vocab=64):
  tokens = jax.random.randint(jax.random.key(seed), (B, L), 0, vocab)
  segments = jnp.ones((B, L), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(L), (B, L))
  return tokens, segments, positions


def _init(cfg, seed=0):
  tokens, segments, positions = _inputs()
  return nn.unbox(Decoder(cfg).init(jax.random.key(seed), tokens, segments, positions)["params"])


def _count(params):
  return sum(x.size for x in jax.tree.leaves(params))


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True}, {"scan_layers": False},
                                       {"num_kv_heads": 4, "head_dim": 16}])
def test_param_count_matches_closed_form(overrides):
  cfg = tiny_model(**overrides)
  assert _count(_init(cfg)) == param_count(cfg)


def test_llama_1_36b_shapes_and_count():
  cfg = from_config_dict(llama_1_36b.get_config()).model
  tokens = jax.ShapeDtypeStruct((1, 2048), jnp.int32)
  shapes = jax.eval_shape(lambda t: Decoder(cfg).init(jax.random.key(0), t, t, t), tokens)
  params = nn.unbox(shapes["params"])
  # 2 x 32000 x 2048 embeddings + 24 x (4 x 2048^2 attention + 3 x 2048 x 5632 MLP + 2 norms) + norm.
  assert _count(params) == param_count(cfg) == 1_364_297_728
  assert params["layers"]["attn"]["q_proj"].shape == (24, 2048, 16, 128)
  logits = jax.eval_shape(lambda p, t: Decoder(cfg).apply({"params": p}, t, t, t), params, tokens)
  assert logits.shape == (1, 2048, 32000) and logits.dtype == jnp.float32  # bf16 compute, f32 logits


def test_logits_shape_and_jit_equals_no_jit():
  cfg = tiny_model()
  params = _init(cfg)
  apply = lambda p, *x: Decoder(cfg).apply({"params": p}, *x)
  eager = apply(params, *_inputs())
  jitted = jax.jit(apply)(params, *_inputs())
  assert eager.shape == (B, L, cfg.vocab_size)
  np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-5)


def test_causal_future_tokens_do_not_change_past_logits():
  cfg = tiny_model()
  params = _init(cfg)
  tokens, segments, positions = _inputs()
  changed = tokens.at[:, 10:].set((tokens[:, 10:] + 1) % cfg.vocab_size)
  apply = jax.jit(lambda t: Decoder(cfg).apply({"params": params}, t, segments, positions))
  before, after = apply(tokens), apply(changed)
  np.testing.assert_array_equal(before[:, :10], after[:, :10])
  assert not np.allclose(before[:, 10:], after[:, 10:])


def test_documents_do_not_see_each_other():
  cfg = tiny_model()
  params = _init(cfg)
  tokens, _, _ = _inputs()
  # Two documents per row: positions restart, attention must not cross the boundary at 6.
  segments = jnp.concatenate([jnp.ones((B, 6), jnp.int32), 2 * jnp.ones((B, L - 6), jnp.int32)], 1)
  positions = jnp.concatenate([jnp.arange(6), jnp.arange(L - 6)])[None].repeat(B, 0)
  apply = jax.jit(lambda t: Decoder(cfg).apply({"params": params}, t, segments, positions))
  changed = tokens.at[:, :6].set((tokens[:, :6] + 1) % cfg.vocab_size)
  np.testing.assert_allclose(apply(tokens)[:, 6:], apply(changed)[:, 6:], rtol=1e-6, atol=1e-6)
  # The second document alone, at the start of a row, gives the same logits: positions are relative.
  alone = Decoder(cfg).apply({"params": params}, tokens[:, 6:], segments[:, 6:], positions[:, 6:])
  np.testing.assert_allclose(apply(tokens)[:, 6:], alone, rtol=1e-5, atol=1e-5)


def test_grouped_query_attention_equals_multi_head_with_repeated_kv():
  gqa = tiny_model(num_heads=4, num_kv_heads=2)
  mha = dataclasses.replace(gqa, num_kv_heads=4)
  params = _init(gqa)
  repeated = jax.tree.map(lambda x: x, params)
  for name in ("k_proj", "v_proj"):  # kv head j serves query heads 2j, 2j+1
    repeated["layers"]["attn"][name] = jnp.repeat(params["layers"]["attn"][name], 2, axis=2)
  inputs = _inputs()
  out_gqa = Decoder(gqa).apply({"params": params}, *inputs)
  out_mha = Decoder(mha).apply({"params": repeated}, *inputs)
  np.testing.assert_allclose(out_gqa, out_mha, rtol=1e-5, atol=1e-5)


def test_scan_equals_loop_and_remat_keeps_gradients():
  scanned = tiny_model()
  params = _init(scanned)
  looped_params = {k: v for k, v in params.items() if k != "layers"}
  for i in range(scanned.num_layers):
    looped_params[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
  inputs = _inputs()

  def loss(cfg, p):
    return jnp.mean(Decoder(cfg).apply({"params": p}, *inputs) ** 2)

  looped = dataclasses.replace(scanned, scan_layers=False)
  np.testing.assert_allclose(loss(scanned, params), loss(looped, looped_params), rtol=1e-5)
  grads = jax.grad(functools_partial(loss, scanned))(params)
  for policy in ("full", "save_dots"):
    remat_grads = jax.grad(functools_partial(loss, dataclasses.replace(scanned, remat=policy)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, remat_grads)


def functools_partial(f, cfg):
  return lambda p: f(cfg, p)


def test_bfloat16_compute_keeps_float32_params():
  cfg = tiny_model(dtype="bfloat16")
  params = _init(cfg)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  # Activations are bf16; the vocabulary projection accumulates and returns float32 for the loss.
  assert Decoder(cfg).apply({"params": params}, *_inputs()).dtype == jnp.float32
  jaxpr = str(jax.make_jaxpr(lambda p: Decoder(cfg).apply({"params": p}, *_inputs()))(params))
  assert "bf16[2,16,4,8]" in jaxpr  # the attention runs in bf16
