"""Splash attention (run in Pallas' interpreter on CPU) against the XLA path; the choice of kernel."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.errors import ConfigError
from lm.model import attention
from lm.model.decoder import Decoder
from tests.helpers import tiny_model

B, L, N, K, H = 2, 256, 4, 2, 32  # grouped-query: 2 query heads per key/value head
# Several documents per row, a padding tail (segment 0) in the second row; boundaries inside splash tiles.
SEGMENTS = np.array([[1] * 40 + [2] * 100 + [3] * 116, [1] * 130 + [2] * 90 + [0] * 36], np.int32)


def _qkv(seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (B, L, N, H), jnp.float32)
  k = jax.random.normal(keys[1], (B, L, K, H), jnp.float32)
  v = jax.random.normal(keys[2], (B, L, K, H), jnp.float32)
  cotangent = jax.random.normal(keys[3], (B, L, N, H), jnp.float32)
  return q, k, v, cotangent


def _output_and_grads(implementation, window, local):
  q, k, v, cotangent = _qkv()
  segments = jnp.asarray(SEGMENTS)

  def loss(q, k, v, local):
    ctx = attention.context(implementation, segments, window, interpret=True)
    out = attention.attend(ctx, q, k, v, local, scale=H ** -0.5)
    return jnp.sum(out * cotangent), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v, local)
  return out, grads


def _assert_close(actual, expected):
  """Within 1e-5 of the largest magnitude of the expected array (float32 rounding of two summation
  orders), and not all zero."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  scale = np.max(np.abs(expected))
  assert scale > 0
  np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("window,local", [(0, False), (48, True), (48, False), (200, True)])
def test_splash_equals_xla_forward_and_gradients(window, local):
  xla_out, xla_grads = _output_and_grads("xla", window, jnp.asarray(local))
  splash_out, splash_grads = _output_and_grads("splash", window, jnp.asarray(local))
  _assert_close(splash_out, xla_out)
  for got, want in zip(splash_grads, xla_grads):
    _assert_close(got, want)


def test_window_changes_the_result():
  """The equality above must not hold trivially: a window of 48 differs from global attention."""
  local_out, _ = _output_and_grads("xla", 48, jnp.asarray(True))
  global_out, _ = _output_and_grads("xla", 48, jnp.asarray(False))
  assert np.max(np.abs(np.asarray(local_out) - np.asarray(global_out))) > 0.1


def test_decoder_with_splash_equals_xla():
  """The whole decoder (scanned layers, sliding-window and global layers, grouped-query heads): logits
  and parameter gradients of splash (interpreted) and XLA attention agree."""
  cfg = tiny_model(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_seq_len=128,
                   sliding_window=32, local_layers_per_global=1)
  segments = jnp.asarray(np.array([[1] * 50 + [2] * 78, [1] * 128], np.int32))
  tokens = jax.random.randint(jax.random.key(1), (2, 128), 0, cfg.vocab_size)
  positions = jnp.asarray(np.concatenate([np.arange(50), np.arange(78)])[None].repeat(2, 0))
  params = Decoder(cfg).init(jax.random.key(0), tokens, segments, positions)["params"]

  def loss(params, implementation):
    model = Decoder(dataclasses.replace(cfg, attention=implementation), interpret=implementation == "splash")
    logits = model.apply({"params": params}, tokens, segments, positions)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

  results = {impl: jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, impl)
             for impl in ("xla", "splash")}
  (_, xla_logits), xla_grads = results["xla"]
  (_, splash_logits), splash_grads = results["splash"]
  _assert_close(splash_logits, xla_logits)
  for got, want in zip(jax.tree.leaves(splash_grads), jax.tree.leaves(xla_grads)):
    _assert_close(got, want)


@pytest.mark.parametrize("choice,platform,dtype,expected", [
    ("auto", "tpu", "float32", "splash"), ("auto", "gpu", "bfloat16", "cudnn"), ("auto", "gpu", "float32", "xla"),
    ("auto", "cpu", "bfloat16", "xla"), ("xla", "tpu", "float32", "xla"), ("splash", "tpu", "bfloat16", "splash"),
])
def test_resolve(choice, platform, dtype, expected):
  cfg = tiny_model(attention=choice, dtype=dtype)
  assert attention.resolve(cfg, 256, platform) == expected


@pytest.mark.parametrize("choice,platform,dtype,seq_len,named", [
    ("splash", "cpu", "float32", 256, "runs on TPU only"),
    ("splash", "gpu", "bfloat16", 256, "runs on TPU only"),
    ("cudnn", "tpu", "bfloat16", 256, "runs on GPU only"),
    ("splash", "tpu", "float32", 200, "multiple of 128"),
    ("cudnn", "gpu", "float32", 256, "model.dtype = bfloat16"),
])
def test_resolve_refuses_what_cannot_run(choice, platform, dtype, seq_len, named):
  with pytest.raises(ConfigError, match="config.model.attention") as error:
    attention.resolve(tiny_model(attention=choice, dtype=dtype), seq_len, platform)
  assert named in str(error.value)


def test_auto_on_tpu_with_an_odd_seq_len_takes_xla():
  assert attention.resolve(tiny_model(attention="auto"), 200, "tpu") == "xla"


def test_xla_attention_keeps_its_scores_in_the_compute_dtype():
  """`attention.dot_product` (model.attention=xla): in float32 the numbers of
  `jax.nn.dot_product_attention` within float32 rounding (its einsums grouped otherwise), forward and
  gradient; in bfloat16 its scores stay bfloat16 (MaxText's
  choice), within bfloat16 rounding of the float32-score result, and the compiled gradient holds fewer
  bytes of them."""
  rng = np.random.default_rng(0)
  B, L, N, K, H = 2, 128, 8, 2, 16
  segments = np.ones((B, L), np.int32)
  segments[:, 50:] = 2
  mask_Bx1xLxS = attention.mask(jnp.asarray(segments))
  results = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for shape in ((B, L, N, H), (B, L, K, H), (B, L, K, H)))
    for name, fn in (("ours", lambda q, k, v: attention.dot_product(q, k, v, mask_Bx1xLxS, 0.25)),
                     ("jax", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask_Bx1xLxS, scale=0.25))):
      loss = jax.jit(jax.value_and_grad(lambda q, k, v, fn=fn: fn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
      value, grads = loss(q, k, v)
      results[dtype, name] = (fn(q, k, v), grads, loss.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes)
  ours, theirs = results[jnp.float32, "ours"], results[jnp.float32, "jax"]
  np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), ours[1], theirs[1])
  ours, theirs = results[jnp.bfloat16, "ours"], results[jnp.bfloat16, "jax"]
  np.testing.assert_allclose(np.asarray(ours[0], np.float32), np.asarray(theirs[0], np.float32), atol=0.05)
  assert ours[2] < theirs[2]
