"""The decoder: RMSNorm, rotary embeddings, grouped-query attention, gated MLP, (scanned) blocks.

Tensor names end in their shape, one letter per axis:
  B batch          L sequence (query positions)   S sequence (key positions)
  D d_model        N query heads                  K key/value heads
  G query heads per key/value head (N / K)        H head_dim
  F MLP hidden     V vocabulary

Parameters carry logical axis names (`embed`, `mlp`, `q_heads`, ...); `lm/model/sharding.py` maps them to mesh axes.
Activations are constrained with the `act_*` names at block boundaries.

One decoder covers LLaMA, Qwen3 and Gemma3; switches of `ModelConfig` choose the differences: per-head
query/key norms (`qk_norm`), norms after attention and MLP (`post_norms`), RMSNorm scaling by `1 + scale`
(`norm_unit_offset`), the gate activation (`mlp_activation`), embeddings scaled by sqrt(d_model)
(`embed_scale`), the attention logit scale (`query_scale_dim`), and sliding-window local layers between
global ones (`sliding_window`, `local_layers_per_global`) with their own RoPE base (`rope_local_theta`).
What differs between layers (window on or off, RoPE frequencies) is data scanned over with the layers,
so a scan still compiles one layer body.

`Decoder.__call__` is training and eval (masks from the segment ids); `Decoder.decode` is decoding with a
`KVCache` (`lm/model/sampling.py`): each layer writes the keys and values of the new tokens at the cache's `index`
and attends over the cache. Both run the same layers (made in `setup`) over the same parameters.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from lm.config import ModelConfig
from lm.model import attention, lora

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ACTIVATIONS = {
    "silu": nn.silu,  # SwiGLU (LLaMA, Qwen3)
    "gelu_tanh": functools.partial(nn.gelu, approximate=True),  # GeGLU (Gemma3)
}
Q_NAMES = ("embed", "q_heads", "head_dim")
KV_NAMES = ("embed", "kv_heads", "head_dim")
O_NAMES = ("q_heads", "head_dim", "embed")
REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _init(cfg: ModelConfig, names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), names)


def _param(module: nn.Module, cfg: ModelConfig, name: str, shape, names):
  return module.param(name, _init(cfg, names), shape, DTYPES[cfg.param_dtype])


class RMSNorm(nn.Module):
  """Normalises the last axis in float32; multiplies by `scale`, or by `1 + scale` with norm_unit_offset
  (Gemma: the stored scale starts at 0)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    offset = self.cfg.norm_unit_offset
    init = nn.initializers.zeros if offset else nn.initializers.ones
    scale = self.param("scale", nn.with_logical_partitioning(init, ("norm",)), (x.shape[-1],),
                       DTYPES[self.cfg.param_dtype])
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
    scale32 = scale.astype(jnp.float32)
    return (normed * (1.0 + scale32 if offset else scale32)).astype(DTYPES[self.cfg.dtype])


def rope_frequencies(head_dim: int, theta: float, scaling_factor: float = 1.0):
  """The H/2 inverse frequencies theta^(-2i/H); linear scaling divides them (stretches positions)."""
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)) / scaling_factor


def layer_pattern(cfg: ModelConfig) -> list[bool]:
  """Per layer: True for a sliding-window (local) layer. Every (local_layers_per_global + 1)-th layer is
  global, starting after the first local_layers_per_global local ones (Gemma3: 5 local, 1 global)."""
  if cfg.sliding_window == 0:
    return [False] * cfg.num_layers
  period = cfg.local_layers_per_global + 1
  return [(i + 1) % period != 0 for i in range(cfg.num_layers)]


def layer_inputs(cfg: ModelConfig) -> dict[str, jax.Array]:
  """What differs between layers, stacked over the layer axis: scanned with the layers."""
  local = layer_pattern(cfg)
  global_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor)
  local_freq = rope_frequencies(cfg.head_dim, cfg.rope_local_theta)
  return {"local": jnp.array(local, jnp.bool_),
          "inv_freq": jnp.stack([local_freq if is_local else global_freq for is_local in local])}


def rotary(x_BxLxNxH, positions_BxL, inv_freq):
  """Rotary embedding in the half-split layout (the Hugging Face layout: `rotate_half`)."""
  angle_BxLx1xH = positions_BxL[:, :, None, None].astype(jnp.float32) * inv_freq
  sin, cos = jnp.sin(angle_BxLx1xH), jnp.cos(angle_BxLx1xH)
  x1, x2 = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BxLxNxH.dtype)


def cache_context(cfg: ModelConfig, positions_BxL, length: int, start_B=None) -> attention.Context:
  """XLA attention over a cache whose slot s of row b holds position s - start_B[b] (0 without start_B;
  left-padded prompts: the slots before start_B[b] are padding, never seen): (global, sliding-window or
  None) masks B x 1 x L x S."""
  slots_1x1xS = jnp.arange(length)[None, None, :]
  start_Bx1x1 = jnp.zeros((1, 1, 1), jnp.int32) if start_B is None else start_B[:, None, None]
  distance_BxLxS = positions_BxL[:, :, None] - (slots_1x1xS - start_Bx1x1)
  visible = (distance_BxLxS >= 0) & (slots_1x1xS >= start_Bx1x1)
  local = (visible & (distance_BxLxS < cfg.sliding_window))[:, None] if cfg.sliding_window else None
  return attention.Context("xla", cfg.sliding_window, masks=(visible[:, None], local))


class KVCache(struct.PyTreeNode):
  """Keys and values of every layer for the first `index` positions of each row (rows in step), each in the
  layout its product with a new token takes (`attention.over_cache`): keys slot by slot (q k over H), values
  head dimension by head dimension (the probabilities p v over the slots S). In training's layout,
  B x S x K x H, XLA:CPU transposed both caches of every layer at every decoded token (SmolLM2-135M, 32
  rows, 128 new tokens: 3.8 of the rollout's 30 s)."""
  k_TxBxKxSxH: jax.Array  # T: layers
  v_TxBxKxHxS: jax.Array
  index: jax.Array  # int32 scalar: cache slots filled so far

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, length: int) -> KVCache:
    T, K, H, dtype = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, DTYPES[cfg.dtype]
    return cls(k_TxBxKxSxH=jnp.zeros((T, batch, K, length, H), dtype),
               v_TxBxKxHxS=jnp.zeros((T, batch, K, H, length), dtype), index=jnp.zeros((), jnp.int32))

  @property
  def length(self) -> int:
    return self.k_TxBxKxSxH.shape[3]


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, ctx: attention.Context, local, inv_freq, cache_kv=None,
               cache_at=None):
    """local: this layer has the sliding window. cache_kv: when decoding, every layer's (keys, values) in
    `KVCache`'s layouts, and cache_at (this layer, the slot of the first new position): the new keys and
    values are written there in place and the layer attends over its slots; returned updated (else None)."""
    cfg = self.cfg
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    w_q_DxNxH = _param(self, cfg, "q_proj", (D, N, H), Q_NAMES)
    w_k_DxKxH = _param(self, cfg, "k_proj", (D, K, H), KV_NAMES)
    w_v_DxKxH = _param(self, cfg, "v_proj", (D, K, H), KV_NAMES)
    w_o_NxHxD = _param(self, cfg, "o_proj", (N, H, D), O_NAMES)

    q_BxLxNxH = lora.project(self, cfg, "BLD,DNH->BLNH", x_BxLxD, w_q_DxNxH, "q_proj", Q_NAMES, 1)
    k_BxSxKxH = lora.project(self, cfg, "BSD,DKH->BSKH", x_BxLxD, w_k_DxKxH, "k_proj", KV_NAMES, 1)
    v_BxSxKxH = lora.project(self, cfg, "BSD,DKH->BSKH", x_BxLxD, w_v_DxKxH, "v_proj", KV_NAMES, 1)
    q_BxLxNxH = nn.with_logical_constraint(q_BxLxNxH, ("act_batch", "act_length", "act_heads", None))
    if cfg.qk_norm:  # RMSNorm of each head's query and key (over H), before the rotation
      q_BxLxNxH = RMSNorm(cfg, name="q_norm")(q_BxLxNxH)
      k_BxSxKxH = RMSNorm(cfg, name="k_norm")(k_BxSxKxH)
    q_BxLxNxH = rotary(q_BxLxNxH, positions_BxL, inv_freq)
    k_BxSxKxH = rotary(k_BxSxKxH, positions_BxL, inv_freq)
    scale = (cfg.query_scale_dim or H) ** -0.5
    if cache_kv is not None:  # the new positions' keys and values into their slots; attend over all
      layer, slot = cache_at
      k_cache, v_cache = cache_kv
      k_cache = jax.lax.dynamic_update_slice(
          k_cache, jnp.swapaxes(k_BxSxKxH, 1, 2).astype(k_cache.dtype)[None], (layer, 0, 0, slot, 0))
      v_cache = jax.lax.dynamic_update_slice(
          v_cache, jnp.transpose(v_BxSxKxH, (0, 2, 3, 1)).astype(v_cache.dtype)[None], (layer, 0, 0, 0, slot))
      cache_kv = (k_cache, v_cache)
      k_BxKxSxH, v_BxKxHxS = (jax.lax.dynamic_index_in_dim(c, layer, 0, keepdims=False) for c in cache_kv)
      out_BxLxNxH = attention.over_cache(ctx, q_BxLxNxH, k_BxKxSxH, v_BxKxHxS, local, scale)
    else:  # grouped-query attention: each of the K key/value heads serves N / K query heads
      out_BxLxNxH = attention.attend(ctx, q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, local, scale)
    return lora.project(self, cfg, "BLNH,NHD->BLD", out_BxLxNxH, w_o_NxHxD, "o_proj", O_NAMES, 2), cache_kv


class MLP(nn.Module):
  """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU with silu, GeGLU with gelu_tanh."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    w_gate_DxF = _param(self, cfg, "gate_proj", (cfg.d_model, cfg.mlp_dim), ("embed", "mlp"))
    w_up_DxF = _param(self, cfg, "up_proj", (cfg.d_model, cfg.mlp_dim), ("embed", "mlp"))
    w_down_FxD = _param(self, cfg, "down_proj", (cfg.mlp_dim, cfg.d_model), ("mlp", "embed"))
    gate_BxLxF = lora.project(self, cfg, "BLD,DF->BLF", x_BxLxD, w_gate_DxF, "gate_proj", ("embed", "mlp"), 1)
    up_BxLxF = lora.project(self, cfg, "BLD,DF->BLF", x_BxLxD, w_up_DxF, "up_proj", ("embed", "mlp"), 1)
    hidden_BxLxF = nn.with_logical_constraint(ACTIVATIONS[cfg.mlp_activation](gate_BxLxF) * up_BxLxF,
                                              ("act_batch", "act_length", "act_mlp"))
    return lora.project(self, cfg, "BLF,FD->BLD", hidden_BxLxF, w_down_FxD, "down_proj", ("mlp", "embed"), 1)


class Block(nn.Module):
  """Pre-norm residual block, with post_norms also normalising each branch's output before it is added
  (Gemma). The body of `nn.scan`: returns (carry, None), the carry being x, or when decoding (x, every
  layer's keys and values in `KVCache`'s layouts, this layer's updated in place).

  Args:
    ctx: the attention's masks or segment ids (`lm.model.attention.Context`).
    layer: this layer's slice of `layer_inputs` ({"local": bool, "inv_freq": H/2}), and when decoding
      its index ("index").
    cache_index: when decoding, the cache slot of the first new position.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, carry, positions_BxL, ctx, layer, cache_index=None):
    cfg = self.cfg
    x_BxLxD, cache_kv = (carry, None) if cache_index is None else carry
    cache_at = None if cache_index is None else (layer["index"], cache_index)
    attn_BxLxD, cache_kv = Attention(cfg, name="attn")(
        RMSNorm(cfg, name="attn_norm")(x_BxLxD), positions_BxL, ctx, layer["local"], layer["inv_freq"],
        cache_kv, cache_at)
    if cfg.post_norms:
      attn_BxLxD = RMSNorm(cfg, name="attn_post_norm")(attn_BxLxD)
    x_BxLxD = x_BxLxD + attn_BxLxD
    mlp_BxLxD = MLP(cfg, name="mlp")(RMSNorm(cfg, name="mlp_norm")(x_BxLxD))
    if cfg.post_norms:
      mlp_BxLxD = RMSNorm(cfg, name="mlp_post_norm")(mlp_BxLxD)
    x_BxLxD = x_BxLxD + mlp_BxLxD
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("act_batch", "act_length", "act_embed"))
    return (x_BxLxD if cache_index is None else (x_BxLxD, cache_kv)), None


class Decoder(nn.Module):
  """The language model. `__call__` (training and eval): tokens, segment ids, positions [B, L] -> logits
  [B, L, V] in float32. `decode`: the same over a `KVCache`, one document per row from position 0.

  Both run the parameters and layers made in `setup`, so they share one parameter tree: `embedding`,
  `layers` (scanned, each leaf with a leading layer axis) or `layers_0` ... (a loop), `final_norm`, and
  `lm_head` unless the embeddings are tied.
  """
  cfg: ModelConfig  # attention "auto" means the default backend's: lm.training.runtime.setup resolves it for its mesh
  interpret: bool = False  # splash attention in Pallas' interpreter (tests on CPU)

  def setup(self):
    cfg = self.cfg
    self.embedding_VxD = _param(self, cfg, "embedding", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
    block = Block
    if cfg.remat != "none":
      # prevent_cse only matters outside scan; inside, it would block useful optimisations.
      block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=cfg.num_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      self.layers = scanned(cfg)  # named after the attribute: "layers"
    else:
      self.layers = [block(cfg) for _ in range(cfg.num_layers)]  # a list: "layers_0", "layers_1", ...
    self.final_norm = RMSNorm(cfg)
    if not cfg.tie_embeddings:
      self.w_out_DxV = _param(self, cfg, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))

  def __call__(self, tokens_BxL, segment_ids_BxL, positions_BxL):
    """Training and eval: each position attends to the earlier ones of its segment (document)."""
    return self.head(self.hidden(tokens_BxL, segment_ids_BxL, positions_BxL))

  def hidden(self, tokens_BxL, segment_ids_BxL, positions_BxL):
    """`__call__` up to the logits: the last layer's output after the final norm [B, L, D], which `head`
    turns into logits (the loss does so a chunk of positions at a time: lm.training.train_step)."""
    x_BxLxD = self._embed(tokens_BxL)
    implementation = self.cfg.attention  # checked against the mesh's platform by lm.training.runtime.setup
    if implementation == "auto":
      implementation = attention.resolve(self.cfg, tokens_BxL.shape[1], jax.default_backend())
    ctx = attention.context(implementation, segment_ids_BxL, self.cfg.sliding_window, interpret=self.interpret)
    x_BxLxD = self._layers(x_BxLxD, positions_BxL, ctx, layer_inputs(self.cfg))
    return self.final_norm(x_BxLxD)

  def decode(self, tokens_BxL, positions_BxL, cache: KVCache, start_B=None,
             last_only: bool = False) -> tuple[jax.Array, KVCache]:
    """(logits [B, L, V], or [B, 1, V] of the last position with last_only (a sampler's prefill: no output
    projection of the other positions), the cache with the new tokens): tokens_BxL go into cache slots index ...
    index + L - 1 of every row, at positions_BxL; each layer writes their keys and values into the cache at
    `index` and attends over the cache's slots up to each position (the later slots are masked, and with
    start_B the slots before start_B[b]: a left-padded prompt's padding)."""
    x_BxLxD = self._embed(tokens_BxL)
    per_layer = {**layer_inputs(self.cfg), "index": jnp.arange(self.cfg.num_layers)}
    ctx = cache_context(self.cfg, positions_BxL, cache.length, start_B)
    carry = (x_BxLxD, (cache.k_TxBxKxSxH, cache.v_TxBxKxHxS))
    x_BxLxD, (k_TxBxKxSxH, v_TxBxKxHxS) = self._layers(carry, positions_BxL, ctx, per_layer, cache.index)
    cache = KVCache(k_TxBxKxSxH=k_TxBxKxSxH, v_TxBxKxHxS=v_TxBxKxHxS, index=cache.index + tokens_BxL.shape[1])
    return self._logits(x_BxLxD[:, -1:] if last_only else x_BxLxD), cache

  def _embed(self, tokens_BxL):
    dtype = DTYPES[self.cfg.dtype]
    x_BxLxD = jnp.take(self.embedding_VxD, tokens_BxL, axis=0).astype(dtype)
    if self.cfg.embed_scale:  # Gemma: the scale is rounded to the compute dtype, as its reference does
      x_BxLxD = x_BxLxD * jnp.asarray(self.cfg.d_model ** 0.5, dtype)
    return nn.with_logical_constraint(x_BxLxD, ("act_batch", "act_length", "act_embed"))

  def _layers(self, carry, positions_BxL, ctx, per_layer, cache_index=None):
    """All blocks over the carry: x, or when decoding (x, the cache's (keys, values) in `KVCache`'s layouts)."""
    if self.cfg.scan_layers:
      return self.layers(carry, positions_BxL, ctx, per_layer, cache_index)[0]
    for i, block in enumerate(self.layers):
      carry, _ = block(carry, positions_BxL, ctx, jax.tree.map(lambda x: x[i], per_layer), cache_index)
    return carry

  def _logits(self, x_BxLxD):
    return self.head(self.final_norm(x_BxLxD))

  def head(self, x_BxLxD):
    """float32 logits [B, L, V] of the normed hidden states."""
    w_out_DxV = self.embedding_VxD.T if self.cfg.tie_embeddings else self.w_out_DxV
    return output_logits(x_BxLxD, w_out_DxV, self.cfg)


def output_weight(params, cfg: ModelConfig):
  """The output projection [D, V] in a parameter tree: `lm_head`, or the embedding's transpose when tied."""
  return params["embedding"].T if cfg.tie_embeddings else params["lm_head"]


def output_logits(x_BxLxD, w_out_DxV, cfg: ModelConfig):
  """`Decoder.head`: float32 logits [B, L, V] of normed hidden states and the output projection."""
  # float32 logits: the cross-entropy over a large vocabulary needs the precision.
  logits_BxLxV = jnp.einsum("BLD,DV->BLV", x_BxLxD, w_out_DxV.astype(DTYPES[cfg.dtype]),
                            preferred_element_type=jnp.float32)
  return nn.with_logical_constraint(logits_BxLxV, ("act_batch", "act_length", "act_vocab"))


def param_count(cfg: ModelConfig) -> int:
  """Closed-form number of parameters (tests check it against the initialised model)."""
  D, N, K, H, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  attention = D * N * H + 2 * D * K * H + N * H * D + (2 * H if cfg.qk_norm else 0)
  norms = (4 if cfg.post_norms else 2) * D
  per_layer = attention + 3 * D * F + norms
  embeddings = cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2)
  return embeddings + cfg.num_layers * per_layer + D  # final norm
