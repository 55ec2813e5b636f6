"""Autoregressive decoding with a KV cache: greedy, temperature, top-k and top-p sampling.

`generate` is one jitted program: a prefill of the prompt, then a `while_loop` that feeds one token at a
time through the cache until every row has produced end-of-sequence or `max_new_tokens` tokens.
`generate_sliding` goes on past model.max_seq_len, each further token from the last max_seq_len tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lm.model.decoder import Decoder, KVCache


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  temperature: float = 0.0  # 0: greedy (argmax)
  top_k: int = 0  # 0: no top-k cut
  top_p: float = 1.0  # 1.0: no nucleus cut

  def __post_init__(self):
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"{self}: needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1.")


def next_token(logits_BxV: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
  """One token per row from the last position's logits."""
  if cfg.temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV.astype(jnp.float32) / cfg.temperature
  if cfg.top_k:
    kth_Bx1 = jax.lax.top_k(logits_BxV, min(cfg.top_k, logits_BxV.shape[-1]))[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if cfg.top_p < 1:
    # The smallest set of most likely tokens whose probability reaches top_p (always at least one).
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # probability of the tokens ranked above
    kept_BxV = before_BxV < cfg.top_p
    threshold_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


def fill_id(stop_ids: tuple[int, ...]) -> int:
  """What follows a row's end in the tokens out: its first stop id (-1 when there is none)."""
  return stop_ids[0] if stop_ids else -1


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "stop_ids", "num_ids"))
def generate(params, prompt_BxP: jax.Array, rng: jax.Array, *, model: Decoder, max_new_tokens: int,
             sampling: SamplingConfig, stop_ids: tuple[int, ...], num_ids: int = 0,
             prompt_lengths_B=None) -> jax.Array:
  """New tokens [B, max_new_tokens] after the prompt. A row ends at the first of `stop_ids` it draws (the
  model's ends of a turn or document: several for an instruct model); after it, `fill_id(stop_ids)` repeats.

  Prompts of different lengths come left-padded to P with their lengths in `prompt_lengths_B` (None: every
  row is P long): row b's prompt is its last prompt_lengths_B[b] tokens, at positions from 0, and the
  padding before it is never attended to.
  num_ids: ids the tokenizer knows when it has fewer than the embedding rows (0: all); no other is drawn.
  """
  B, P = prompt_BxP.shape
  cfg = model.cfg
  if P + max_new_tokens > cfg.max_seq_len:
    raise ValueError(f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) is over "
                     f"config.model.max_seq_len = {cfg.max_seq_len}.")
  cache = KVCache.zeros(cfg, B, P + max_new_tokens)
  start_B = None if prompt_lengths_B is None else P - jnp.asarray(prompt_lengths_B, jnp.int32)

  def forward(tokens_BxL, cache):
    positions_BxL = cache.index + jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
    if start_B is not None:  # the padding's own positions are clipped to 0: it is masked anyway
      positions_BxL = jnp.maximum(positions_BxL - start_B[:, None], 0)
    logits_Bx1xV, cache = model.apply({"params": params}, tokens_BxL, positions_BxL, cache, start_B,
                                      last_only=True, method=Decoder.decode)
    logits_BxV = logits_Bx1xV[:, -1]
    if num_ids:
      logits_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < num_ids, logits_BxV, -jnp.inf)
    return logits_BxV, cache

  logits_BxV, cache = forward(prompt_BxP, cache)
  fill, stops = fill_id(stop_ids), jnp.asarray(stop_ids or (-1,), jnp.int32)
  out_BxT = jnp.full((B, max_new_tokens), fill, jnp.int32)
  done_B = jnp.zeros((B,), jnp.bool_)

  def cond(carry):
    i, _, _, _, done_B, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    i, logits_BxV, cache, out_BxT, done_B, rng = carry
    rng, step_rng = jax.random.split(rng)
    token_B = jnp.where(done_B, fill, next_token(logits_BxV, step_rng, sampling))
    out_BxT = out_BxT.at[:, i].set(token_B)
    done_B = done_B | jnp.isin(token_B, stops)
    logits_BxV, cache = forward(token_B[:, None], cache)
    return i + 1, logits_BxV, cache, out_BxT, done_B, rng

  carry = (jnp.int32(0), logits_BxV, cache, out_BxT, done_B, rng)
  return jax.lax.while_loop(cond, body, carry)[3]


@functools.partial(jax.jit, static_argnames=("model", "sampling", "num_ids"))
def _window_next(params, window_BxL: jax.Array, rng: jax.Array, *, model: Decoder, sampling: SamplingConfig,
                 num_ids: int) -> jax.Array:
  """The next token of each row from a full forward pass over its window (positions from 0, no cache)."""
  ones_BxL = jnp.ones_like(window_BxL)
  positions_BxL = jnp.cumsum(ones_BxL, axis=1) - 1
  logits_BxV = model.apply({"params": params}, window_BxL, ones_BxL, positions_BxL)[:, -1]
  if num_ids:
    logits_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < num_ids, logits_BxV, -jnp.inf)
  return next_token(logits_BxV, rng, sampling)


def generate_sliding(params, prompt_BxP, rng: jax.Array, *, model: Decoder, max_new_tokens: int,
                     sampling: SamplingConfig, stop_ids: tuple[int, ...], num_ids: int = 0) -> tuple[np.ndarray, int]:
  """(new tokens [B, max_new_tokens], how many of them saw a slid context): `generate` while the prompt and
  the new tokens fit model.max_seq_len; past it, the context slides: each further token comes from the last
  max_seq_len tokens (nanoGPT's crop; positions renumbered from 0), one forward pass over them per token.
  A prompt longer than max_seq_len is cropped to its last max_seq_len tokens."""
  length = model.cfg.max_seq_len
  prompt_BxP = np.asarray(prompt_BxP)
  B, P = prompt_BxP.shape
  cached = min(max_new_tokens, length - P) if P < length else 0
  rng, first = jax.random.split(rng)
  tokens_BxT = prompt_BxP
  if cached:
    new_BxT = np.asarray(generate(params, prompt_BxP, first, model=model, max_new_tokens=cached,
                                  sampling=sampling, stop_ids=stop_ids, num_ids=num_ids))
    tokens_BxT = np.concatenate([prompt_BxP, new_BxT], axis=1)
  fill = fill_id(stop_ids)
  done_B = np.any(np.isin(tokens_BxT[:, P:], stop_ids), axis=1)
  slid = 0
  while tokens_BxT.shape[1] - P < max_new_tokens and not done_B.all():
    rng, step = jax.random.split(rng)
    token_B = np.asarray(_window_next(params, tokens_BxT[:, -length:], step, model=model, sampling=sampling,
                                      num_ids=num_ids))
    token_B = np.where(done_B, fill, token_B)
    done_B |= np.isin(token_B, stop_ids)
    tokens_BxT = np.concatenate([tokens_BxT, token_B[:, None]], axis=1)
    slid += 1
  new_BxT = tokens_BxT[:, P:]
  pad = np.full((B, max_new_tokens - new_BxT.shape[1]), fill, new_BxT.dtype)
  return np.concatenate([new_BxT, pad], axis=1), slid
