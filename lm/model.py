"""The decoder: RMSNorm, rotary embeddings, grouped-query attention, gated MLP, (scanned) blocks.

Tensor names end in their shape, one letter per axis:
  B batch          L sequence (query positions)   S sequence (key positions; the cache length when decoding)
  D d_model        N query heads                  K key/value heads
  G query heads per key/value head (N / K)        H head_dim
  F MLP hidden     V vocabulary

Parameters carry logical axis names (`embed`, `mlp`, `q_heads`, ...); `lm/sharding.py` maps them to mesh axes.
Activations are constrained with the `act_*` names at block boundaries.

Decoding passes a `KVCache`: each layer writes the keys and values of the new tokens at `index` and attends
over the whole cache (`lm/sampling.py`). Training and eval pass none.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from lm.config import ModelConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _init(cfg: ModelConfig, names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), names)


def _param(module: nn.Module, cfg: ModelConfig, name: str, shape, names):
  return module.param(name, _init(cfg, names), shape, DTYPES[cfg.param_dtype])


class RMSNorm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), DTYPES[self.cfg.param_dtype])
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
    return (normed * scale.astype(jnp.float32)).astype(DTYPES[self.cfg.dtype])


def rotary(x_BxLxNxH, positions_BxL, theta: float):
  """Rotary embedding in the half-split layout (the Hugging Face LLaMA layout)."""
  half = x_BxLxNxH.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxLx1xH = positions_BxL[:, :, None, None].astype(jnp.float32) * inv_freq
  sin, cos = jnp.sin(angle_BxLx1xH), jnp.cos(angle_BxLx1xH)
  x1, x2 = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BxLxNxH.dtype)


class KVCache(struct.PyTreeNode):
  """Keys and values of every layer for the first `index` positions of each row (rows in step)."""
  k_TxBxSxKxH: jax.Array  # T: layers
  v_TxBxSxKxH: jax.Array
  index: jax.Array  # int32 scalar: cache slots filled so far

  @classmethod
  def zeros(cls, cfg: ModelConfig, batch: int, length: int) -> KVCache:
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    zeros = jnp.zeros(shape, DTYPES[cfg.dtype])
    return cls(k_TxBxSxKxH=zeros, v_TxBxSxKxH=zeros, index=jnp.zeros((), jnp.int32))


def attention_mask(segment_ids_BxL):
  """Causal and within-document: position l sees s <= l of the same (non-padding) segment."""
  length = segment_ids_BxL.shape[1]
  causal_LxS = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))
  same_BxLxS = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return (causal_LxS[None] & same_BxLxS)[:, None]  # B x 1 x L x S, broadcast over heads


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask_Bx1xLxS, cache_kv=None, cache_index=None):
    """cache_kv: this layer's (keys, values) B x S x K x H when decoding; returns them updated."""
    cfg = self.cfg
    dtype = DTYPES[cfg.dtype]
    D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    w_q_DxNxH = _param(self, cfg, "q_proj", (D, N, H), ("embed", "q_heads", "head_dim"))
    w_k_DxKxH = _param(self, cfg, "k_proj", (D, K, H), ("embed", "kv_heads", "head_dim"))
    w_v_DxKxH = _param(self, cfg, "v_proj", (D, K, H), ("embed", "kv_heads", "head_dim"))
    w_o_NxHxD = _param(self, cfg, "o_proj", (N, H, D), ("q_heads", "head_dim", "embed"))

    q_BxLxNxH = jnp.einsum("BLD,DNH->BLNH", x_BxLxD, w_q_DxNxH.astype(dtype))
    k_BxSxKxH = jnp.einsum("BSD,DKH->BSKH", x_BxLxD, w_k_DxKxH.astype(dtype))
    v_BxSxKxH = jnp.einsum("BSD,DKH->BSKH", x_BxLxD, w_v_DxKxH.astype(dtype))
    q_BxLxNxH = nn.with_logical_constraint(q_BxLxNxH, ("act_batch", "act_length", "act_heads", None))
    q_BxLxNxH = rotary(q_BxLxNxH, positions_BxL, cfg.rope_theta)
    k_BxSxKxH = rotary(k_BxSxKxH, positions_BxL, cfg.rope_theta)
    if cache_kv is not None:  # the new positions' keys and values into their slots; attend over all
      k_BxSxKxH, v_BxSxKxH = (jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), cache_index, 1)
                              for c, new in zip(cache_kv, (k_BxSxKxH, v_BxSxKxH)))
      cache_kv = (k_BxSxKxH, v_BxSxKxH)
    # Grouped-query attention: dot_product_attention shares each of the K heads among N / K queries.
    out_BxLxNxH = jax.nn.dot_product_attention(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_Bx1xLxS)
    return jnp.einsum("BLNH,NHD->BLD", out_BxLxNxH, w_o_NxHxD.astype(dtype)), cache_kv


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg = self.cfg
    dtype = DTYPES[cfg.dtype]
    w_gate_DxF = _param(self, cfg, "gate_proj", (cfg.d_model, cfg.mlp_dim), ("embed", "mlp"))
    w_up_DxF = _param(self, cfg, "up_proj", (cfg.d_model, cfg.mlp_dim), ("embed", "mlp"))
    w_down_FxD = _param(self, cfg, "down_proj", (cfg.mlp_dim, cfg.d_model), ("mlp", "embed"))
    gate_BxLxF = jnp.einsum("BLD,DF->BLF", x_BxLxD, w_gate_DxF.astype(dtype))
    up_BxLxF = jnp.einsum("BLD,DF->BLF", x_BxLxD, w_up_DxF.astype(dtype))
    hidden_BxLxF = nn.with_logical_constraint(nn.silu(gate_BxLxF) * up_BxLxF,
                                              ("act_batch", "act_length", "act_mlp"))
    return jnp.einsum("BLF,FD->BLD", hidden_BxLxF, w_down_FxD.astype(dtype))


class Block(nn.Module):
  """Pre-norm residual block. Returns (x, this layer's updated cache or None): the body of `nn.scan`."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask_Bx1xLxS, cache_kv=None, cache_index=None):
    attended_BxLxD, cache_kv = Attention(self.cfg, name="attn")(
        RMSNorm(self.cfg, name="attn_norm")(x_BxLxD), positions_BxL, mask_Bx1xLxS, cache_kv, cache_index)
    x_BxLxD = x_BxLxD + attended_BxLxD
    x_BxLxD = x_BxLxD + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x_BxLxD))
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("act_batch", "act_length", "act_embed"))
    return x_BxLxD, cache_kv


class Decoder(nn.Module):
  """tokens, segment ids, positions [B, L] -> logits [B, L, V] in float32.

  With a `cache` (decoding one document per row, from position 0): returns (logits, updated cache); the
  tokens are those at positions index ... index + L - 1 and segment ids are not used.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, segment_ids_BxL, positions_BxL, cache: KVCache | None = None):
    cfg = self.cfg
    dtype = DTYPES[cfg.dtype]
    embedding_VxD = _param(self, cfg, "embedding", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
    x_BxLxD = jnp.take(embedding_VxD, tokens_BxL, axis=0).astype(dtype)
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("act_batch", "act_length", "act_embed"))
    if cache is None:
      mask_Bx1xLxS, kv, index = attention_mask(segment_ids_BxL), None, None
    else:  # slot s holds position s: visible up to the query's own position
      slots_S = jnp.arange(cache.k_TxBxSxKxH.shape[2])
      mask_Bx1xLxS = (slots_S[None, None, None, :] <= positions_BxL[:, None, :, None])
      kv, index = (cache.k_TxBxSxKxH, cache.v_TxBxSxKxH), cache.index

    block = Block
    if cfg.remat != "none":
      # prevent_cse only matters outside scan; inside, it would block useful optimisations.
      block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=cfg.num_layers,
                       metadata_params={nn.PARTITION_NAME: "layers"})
      x_BxLxD, kv = layers(cfg, name="layers")(x_BxLxD, positions_BxL, mask_Bx1xLxS, kv, index)
    else:
      new_kv = []
      for i in range(cfg.num_layers):
        layer_kv = None if kv is None else (kv[0][i], kv[1][i])
        x_BxLxD, layer_kv = block(cfg, name=f"layers_{i}")(x_BxLxD, positions_BxL, mask_Bx1xLxS,
                                                           layer_kv, index)
        new_kv.append(layer_kv)
      kv = None if kv is None else tuple(jnp.stack(parts) for parts in zip(*new_kv))

    x_BxLxD = RMSNorm(cfg, name="final_norm")(x_BxLxD)
    if cfg.tie_embeddings:
      w_out_DxV = embedding_VxD.T
    else:
      w_out_DxV = _param(self, cfg, "lm_head", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))
    # float32 logits: the cross-entropy over a large vocabulary needs the precision.
    logits_BxLxV = jnp.einsum("BLD,DV->BLV", x_BxLxD, w_out_DxV.astype(dtype),
                              preferred_element_type=jnp.float32)
    logits_BxLxV = nn.with_logical_constraint(logits_BxLxV, ("act_batch", "act_length", "act_vocab"))
    if cache is None:
      return logits_BxLxV
    return logits_BxLxV, KVCache(k_TxBxSxKxH=kv[0], v_TxBxSxKxH=kv[1], index=index + tokens_BxL.shape[1])


def param_count(cfg: ModelConfig) -> int:
  """Closed-form number of parameters (tests check it against the initialised model)."""
  D, N, K, H, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  attention = D * N * H + 2 * D * K * H + N * H * D
  per_layer = attention + 3 * D * F + 2 * D  # two norms
  embeddings = cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2)
  return embeddings + cfg.num_layers * per_layer + D  # final norm
