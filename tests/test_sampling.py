"""KV-cache decoding against recomputing the whole sequence, and the sampling filters."""

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.model.decoder import Decoder, KVCache
from lm.model.sampling import SamplingConfig, generate, generate_sliding, next_token
from tests.helpers import tiny_model


@functools.cache
def _model_and_params(**overrides):
  model = Decoder(tiny_model(**overrides))
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = jax.jit(model.init)(jax.random.key(0), tokens, tokens + 1, tokens)["params"]
  # Larger weights than the init: sharper distributions, so greedy paths do not hinge on ties.
  return model, jax.tree.map(lambda p: p * 4 if p.ndim > 1 else p, params)


GEMMA_LIKE = dict(sliding_window=4, local_layers_per_global=1, qk_norm=True, post_norms=True,
                  norm_unit_offset=True, mlp_activation="gelu_tanh", embed_scale=True, rope_local_theta=1e4)


@pytest.mark.parametrize("overrides", [{}, {"scan_layers": False}, GEMMA_LIKE], ids=["scan", "loop", "gemma"])
def test_cached_logits_equal_the_full_forward(overrides):
  model, params = _model_and_params(**overrides)
  tokens_BxL = jax.random.randint(jax.random.key(1), (2, 10), 3, 64)
  positions_BxL = jnp.broadcast_to(jnp.arange(10), tokens_BxL.shape)
  ones = jnp.ones_like(tokens_BxL)
  full = jax.jit(model.apply)({"params": params}, tokens_BxL, ones, positions_BxL)
  decode = jax.jit(functools.partial(model.apply, method=Decoder.decode))
  cache = KVCache.zeros(model.cfg, 2, 16)
  parts = []
  for start, stop in ((0, 6), (6, 7), (7, 10)):  # a prefill, one token, three tokens
    logits, cache = decode({"params": params}, tokens_BxL[:, start:stop], positions_BxL[:, start:stop], cache)
    parts.append(logits)
  assert int(cache.index) == 10
  np.testing.assert_allclose(jnp.concatenate(parts, axis=1), full, rtol=1e-5, atol=1e-5)
  last = jax.jit(functools.partial(model.apply, method=Decoder.decode, last_only=True))  # a sampler's prefill
  logits, _ = last({"params": params}, tokens_BxL[:, :6], positions_BxL[:, :6], KVCache.zeros(model.cfg, 2, 16))
  assert logits.shape == (2, 1, 64)
  np.testing.assert_allclose(logits, parts[0][:, -1:], rtol=1e-5, atol=1e-5)


def generate_without_cache(params, prompt_BxP, *, model: Decoder, max_new_tokens: int, eos_id: int):
  """Greedy decoding that runs the model over the whole sequence for every new token: the reference
  of the KV-cache decoder. The sequence lives in a buffer of the final length (one compilation); causal attention
  keeps the not yet written positions from mattering."""
  B, P = prompt_BxP.shape
  tokens_BxL = jnp.zeros((B, P + max_new_tokens), jnp.int32).at[:, :P].set(prompt_BxP)
  positions_BxL = jnp.broadcast_to(jnp.arange(P + max_new_tokens), tokens_BxL.shape)
  forward = jax.jit(lambda p, t: model.apply({"params": p}, t, jnp.ones_like(t), positions_BxL))
  done_B = jnp.zeros(B, jnp.bool_)
  for i in range(max_new_tokens):
    token_B = jnp.where(done_B, eos_id, jnp.argmax(forward(params, tokens_BxL)[:, P + i - 1], axis=-1))
    done_B = done_B | (token_B == eos_id)
    tokens_BxL = tokens_BxL.at[:, P + i].set(token_B)
  return tokens_BxL[:, P:]


def test_cached_greedy_decoding_gives_the_tokens_of_full_recomputation():
  model, params = _model_and_params(num_kv_heads=1)
  prompt = jax.random.randint(jax.random.key(2), (3, 5), 3, 64)
  cached = generate(params, prompt, jax.random.key(0), model=model, max_new_tokens=20,
                    sampling=SamplingConfig(), stop_ids=(2,))
  reference = generate_without_cache(params, prompt, model=model, max_new_tokens=20, eos_id=2)
  np.testing.assert_array_equal(cached, reference)
  assert len(set(np.asarray(cached).ravel().tolist())) > 3  # not a degenerate repetition


def test_generation_stops_at_end_of_sequence():
  model, params = _model_and_params()
  prompt = jnp.full((2, 3), 5, jnp.int32)
  free = np.asarray(generate(params, prompt, jax.random.key(0), model=model, max_new_tokens=12,
                             sampling=SamplingConfig(), stop_ids=(63,)))
  eos = int(free[0, 4])  # make the fifth generated token of row 0 the end of sequence
  stopped = np.asarray(generate(params, prompt, jax.random.key(0), model=model, max_new_tokens=12,
                                sampling=SamplingConfig(), stop_ids=(eos,)))
  first = list(free[0]).index(eos)
  np.testing.assert_array_equal(stopped[0, :first + 1], free[0, :first + 1])
  assert (stopped[0, first:] == eos).all()


def test_generation_stops_at_any_of_several_stop_ids():
  """An instruct model ends a turn with one id and a document with another (SmolLM2: <|im_end|> and
  <|endoftext|>): a row ends at the first it draws, the rest filled with the first stop id."""
  model, params = _model_and_params()
  prompt = jnp.full((2, 3), 5, jnp.int32)
  free = np.asarray(generate(params, prompt, jax.random.key(0), model=model, max_new_tokens=12,
                             sampling=SamplingConfig(), stop_ids=()))
  second, fifth = int(free[0, 1]), int(free[0, 4])
  assert second not in free[0, :1]
  stopped = np.asarray(generate(params, prompt, jax.random.key(0), model=model, max_new_tokens=12,
                                sampling=SamplingConfig(), stop_ids=(fifth, second)))
  np.testing.assert_array_equal(stopped[0, :2], free[0, :2])
  assert (stopped[0, 2:] == fifth).all()


def test_sampling_is_seeded_and_filters_apply():
  logits_BxV = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.split(jax.random.key(0), 3)

  def draw(cfg, key=keys[0]):
    return np.asarray(next_token(logits_BxV, key, cfg))

  plain = SamplingConfig(temperature=1.0)
  assert (draw(plain) == draw(plain)).all()  # same seed, same tokens
  assert (draw(plain) != draw(plain, keys[1])).any()
  frequencies = np.bincount(draw(plain), minlength=4) / 2000
  np.testing.assert_allclose(frequencies, [0.5, 0.3, 0.15, 0.05], atol=0.04)
  assert set(draw(SamplingConfig(temperature=1.0, top_k=2)).tolist()) == {0, 1}
  # top_p 0.7: tokens 0 and 1 (0.5 before token 1 < 0.7; 0.8 before token 2 >= 0.7).
  assert set(draw(SamplingConfig(temperature=1.0, top_p=0.7)).tolist()) == {0, 1}
  assert set(draw(SamplingConfig(temperature=1.0, top_p=0.01)).tolist()) == {0}
  assert (draw(SamplingConfig(temperature=0.0)) == 0).all()
  # A low temperature concentrates on the most likely token.
  assert (draw(SamplingConfig(temperature=0.05)) == 0).mean() > 0.99
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(top_p=0.0)


def test_prompt_and_length_over_the_model_length_is_an_error():
  model, params = _model_and_params()
  with pytest.raises(ValueError, match="max_seq_len = 64"):
    generate(params, jnp.ones((1, 60), jnp.int32), jax.random.key(0), model=model, max_new_tokens=10,
             sampling=SamplingConfig(), stop_ids=(2,))


def test_past_the_model_length_the_context_slides_as_nanogpt_crops():
  """Greedy: the tokens that fit come from the cache; each later one is the argmax of a full forward pass
  over the last max_seq_len (64) tokens, positions from 0."""
  model, params = _model_and_params()
  prompt_BxP = np.asarray(jax.random.randint(jax.random.key(2), (2, 60), 3, 64))
  new_BxT, slid = generate_sliding(params, prompt_BxP, jax.random.key(0), model=model, max_new_tokens=10,
                                   sampling=SamplingConfig(), stop_ids=())
  assert new_BxT.shape == (2, 10) and slid == 6
  cached = generate(params, jnp.asarray(prompt_BxP), jax.random.key(0), model=model, max_new_tokens=4,
                    sampling=SamplingConfig(), stop_ids=())
  assert np.array_equal(new_BxT[:, :4], cached)
  tokens = np.concatenate([prompt_BxP, new_BxT[:, :4]], axis=1)
  forward = jax.jit(model.apply)
  for i in range(4, 10):
    window = jnp.asarray(tokens[:, -64:])
    logits = forward({"params": params}, window, jnp.ones_like(window), jnp.broadcast_to(jnp.arange(64), window.shape))
    tokens = np.concatenate([tokens, np.asarray(jnp.argmax(logits[:, -1], axis=-1))[:, None]], axis=1)
  assert np.array_equal(new_BxT, tokens[:, 60:])


@pytest.mark.parametrize("overrides", [{}, GEMMA_LIKE], ids=["scan", "gemma"])
def test_left_padded_prompts_decode_as_each_prompt_alone(overrides):
  """Prompts of 5 and 9 tokens in one batch (the short one left-padded): greedy, each row's new tokens
  are those of its prompt decoded alone."""
  model, params = _model_and_params(**overrides)
  short = jax.random.randint(jax.random.key(3), (1, 5), 3, 64)
  long = jax.random.randint(jax.random.key(4), (1, 9), 3, 64)
  padded = jnp.concatenate([jnp.concatenate([jnp.zeros((1, 4), jnp.int32), short], axis=1), long])
  run = functools.partial(generate, params, rng=jax.random.key(0), model=model, max_new_tokens=6,
                          sampling=SamplingConfig(), stop_ids=())
  both = run(padded, prompt_lengths_B=jnp.asarray([5, 9]))
  assert np.array_equal(both[0], run(short)[0]) and np.array_equal(both[1], run(long)[0])


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "loop"])
def test_decoding_writes_the_new_keys_into_the_one_cache_in_place(scan_layers):
  """Each decoding step writes its keys and values into the cache where it lies (the layers' carry), so
  `generate` holds the cache once (1.5x it in all here): a cache passed through the layer scan as its input
  and output was held, and copied each step, twice (3x in all)."""
  model, params = _model_and_params(scan_layers=scan_layers, max_seq_len=256, num_heads=4, num_kv_heads=4,
                                    head_dim=32)
  B, P, T = 64, 4, 252  # a short prompt: the prefill's attention scores stay small beside the cache
  cfg = model.cfg
  cache_bytes = 2 * cfg.num_layers * B * (P + T) * cfg.num_kv_heads * cfg.head_dim * 4
  compiled = generate.lower(params, jnp.ones((B, P), jnp.int32), jax.random.key(0), model=model,
                            max_new_tokens=T, sampling=SamplingConfig(temperature=1.0), stop_ids=(2,)).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert cache_bytes <= temp < 2 * cache_bytes, (temp, cache_bytes)
