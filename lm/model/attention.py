"""Attention of training and eval: causal, within each packed document, optionally in a sliding window.

`model.attention` chooses the implementation:
  xla     `dot_product`, with a B x 1 x L x S mask: XLA writes the scores of every head, B x N x L x S in the
          compute dtype, and keeps them for the backward pass. Every platform; the reference.
  splash  TPU: Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), a flash
          kernel: tiles of 512 x 512 (256 or 128 where they do not divide seq_len), scores never stored whole, fully masked blocks skipped.
          Packed documents by segment ids, causal and sliding-window masks, grouped-query heads.
          Runs per device under `shard_map` (batch over data x fsdp, heads over tensor).
  cudnn   GPU: `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's flash attention, causal
          and sliding window in the kernel. It has no segment ids: when rows pack several documents the
          document boundaries go in as a B x 1 x L x S mask (one per row, not per head). bfloat16 or
          float16 only (cuDNN's fused attention has no float32).
  auto    splash on TPU; cudnn on GPU when model.dtype is bfloat16; xla otherwise. Resolved against the
          mesh's devices by `resolve` (lm/training/runtime.py), so a plan for a TPU slice uses splash.

Decoding with a KV cache (`Decoder.decode`) always takes the XLA path: one new token per row is no
place for a flash kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct
from jax.sharding import PartitionSpec as P

from lm.config import ModelConfig
from lm.errors import ConfigError


SPLASH_BLOCK = 512  # splash tile (query and key blocks); 256 or 128 where seq_len is no multiple of it
LANES = 128  # splash tiles are multiples of the TPU's 128 lanes


def resolve(cfg: ModelConfig, seq_len: int, platform: str) -> str:
  """The implementation `cfg.attention` means on `platform` (cpu | gpu | tpu); ConfigError when it
  cannot run there or on these shapes."""
  choice = cfg.attention
  if choice == "auto":
    if platform == "tpu" and seq_len % LANES == 0:
      choice = "splash"
    elif platform == "gpu" and cfg.dtype == "bfloat16":
      choice = "cudnn"
    else:
      choice = "xla"
  wanted = {"splash": "tpu", "cudnn": "gpu"}.get(choice)
  if wanted and platform != wanted:
    raise ConfigError(
        f"config.model.attention = {choice} runs on {wanted.upper()} only, but this run's devices are "
        f"{platform.upper()}. Use --config.model.attention=auto (the best one of the platform) or xla.")
  if choice == "splash" and seq_len % LANES:
    raise ConfigError(
        f"config.model.attention = splash needs config.train.seq_len to be a multiple of {LANES} (the "
        f"kernel's tiles), not {seq_len}. Choose such a seq_len, or --config.model.attention=xla.")
  if choice == "cudnn" and cfg.dtype != "bfloat16":
    raise ConfigError(
        f"config.model.attention = cudnn needs config.model.dtype = bfloat16 (cuDNN's fused attention has "
        f"no {cfg.dtype}). Set --config.model.dtype=bfloat16, or use --config.model.attention=xla.")
  return choice


def mask(segment_ids_BxL, window: int = 0):
  """Causal and within-document: position l sees s <= l of the same segment, and with a window only the
  `window` newest of them (l - s < window, itself included). B x 1 x L x S, broadcast over heads."""
  length = segment_ids_BxL.shape[1]
  distance_LxS = jnp.arange(length)[:, None] - jnp.arange(length)[None, :]
  allowed_LxS = (distance_LxS >= 0) & ((distance_LxS < window) if window else True)
  same_BxLxS = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return (allowed_LxS[None] & same_BxLxS)[:, None]


class Context(struct.PyTreeNode):
  """What every layer's attention needs besides q, k, v: made once per forward pass, broadcast to the
  (scanned) layers. masks: (global, sliding-window or None) B x 1 x L x S for xla; the documents' mask
  for cudnn; none for splash, which takes the segment ids."""
  implementation: str = struct.field(pytree_node=False)
  window: int = struct.field(pytree_node=False)
  masks: tuple = ()
  segment_ids_BxL: jax.Array | None = None
  interpret: bool = struct.field(pytree_node=False, default=False)  # splash in Pallas' interpreter (tests)


def context(implementation: str, segment_ids_BxL, window: int, interpret: bool = False) -> Context:
  """The Context of a training or eval forward pass over packed rows."""
  if implementation == "splash":
    return Context(implementation, window, segment_ids_BxL=segment_ids_BxL, interpret=interpret)
  if implementation == "cudnn":  # causal and window in the kernel; documents as a mask
    return Context(implementation, window, masks=(mask(segment_ids_BxL),))
  return Context(implementation, window,
                 masks=(mask(segment_ids_BxL), mask(segment_ids_BxL, window) if window else None))


def dot_product(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xLxS, scale: float):
  """XLA attention with the scores in the compute dtype (q's), as MaxText's dot-product attention keeps
  them: the B x N x L x S scores kept for the backward pass take half the bytes in bfloat16 that
  `jax.nn.dot_product_attention`'s float32 scores take. The softmax itself runs in float32 (fused, not
  stored), its probabilities back in the compute dtype; grouped-query heads share their key and value.
  In float32 the arithmetic of `jax.nn.dot_product_attention` (within rounding: the einsums are grouped
  otherwise)."""
  return _grouped_query(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xLxS, scale, "BSKH", "BSKH")


def _grouped_query(q_BxLxNxH, k_Bx___, v_Bx___, mask_Bx1xLxS, scale: float, k_axes: str, v_axes: str):
  """`dot_product` with keys and values in the layouts `k_axes` and `v_axes` (of B, S, K, H)."""
  B, L, N, H = q_BxLxNxH.shape
  K = k_Bx___.shape[k_axes.index("K")]
  q_BxLxKxGxH = q_BxLxNxH.reshape(B, L, K, N // K, H)
  scores_BxKxGxLxS = jnp.einsum(f"BLKGH,{k_axes}->BKGLS", q_BxLxKxGxH, k_Bx___) * jnp.asarray(scale, q_BxLxNxH.dtype)
  scores_BxKxGxLxS = jnp.where(mask_Bx1xLxS[:, :, None], scores_BxKxGxLxS,
                               jnp.asarray(-0.7 * jnp.finfo(scores_BxKxGxLxS.dtype).max, scores_BxKxGxLxS.dtype))
  probs_BxKxGxLxS = jax.nn.softmax(scores_BxKxGxLxS.astype(jnp.float32), axis=-1).astype(v_Bx___.dtype)
  return jnp.einsum(f"BKGLS,{v_axes}->BLKGH", probs_BxKxGxLxS, v_Bx___).reshape(B, L, N, H)


def _xla_mask(ctx: Context, local):
  global_mask, local_mask = ctx.masks
  return global_mask if local_mask is None else jnp.where(local, local_mask, global_mask)


def attend(ctx: Context, q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, local, scale: float):
  """Attention output B x L x N x H. `local`: this layer uses the sliding window (a traced bool when the
  layers are scanned; ignored without a window)."""
  if ctx.implementation == "splash":
    return splash(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, ctx.segment_ids_BxL, window=ctx.window, local=local,
                  scale=scale, interpret=ctx.interpret)
  if ctx.implementation == "xla":
    return dot_product(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, _xla_mask(ctx, local), scale)

  body = functools.partial(_cudnn_local, window=ctx.window, scale=scale)
  return per_device(body, q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, ctx.masks[0], jnp.asarray(local if ctx.window else False))


def over_cache(ctx: Context, q_BxLxNxH, k_BxKxSxH, v_BxKxHxS, local, scale: float):
  """Decoding's attention (XLA's, `ctx` a cache's context) over a `KVCache` layer: keys B x K x S x H and
  values B x K x H x S, the layouts whose products with the new tokens need no transposed copy."""
  return _grouped_query(q_BxLxNxH, k_BxKxSxH, v_BxKxHxS, _xla_mask(ctx, local), scale, "BKSH", "BKHS")


def per_device(body, q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, rows_Bx___, local):
  """body(q, k, v, rows, local) on each device's rows and heads (a kernel's attention): batch over the
  batch axes, heads over the tensor axis, under the active mesh's rules (`sharding.activate`, or
  `rules_within` inside a manual region, whose nested shard_map makes the rest manual). rows: the
  segment ids B x L or a mask B x 1 x L x S, split as the rows. A fully manual region is also what cuDNN's
  attention needs: its custom partitioning fails inside a partly manual one (the per-replica accumulation
  of lm.training.train_step)."""
  if jax.sharding.get_abstract_mesh().empty:  # no mesh: one device (tests)
    return body(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, rows_Bx___, local)
  batch, heads = (nn.logical_to_mesh_axes((name,))[0] for name in ("act_batch", "act_heads"))
  spec, rows = P(batch, None, heads, None), P(batch, *[None] * (rows_Bx___.ndim - 1))
  return jax.shard_map(body, in_specs=(spec, spec, spec, rows, P()), out_specs=spec,
                       check_vma=False)(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, rows_Bx___, local)


def _cudnn_local(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xLxS, local, *, window: int, scale: float):
  """cuDNN's flash attention of this device's rows and heads: causal, documents as a mask, the window in
  the kernel on local layers."""
  def cudnn(layer_window: int):
    return jax.nn.dot_product_attention(
        q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_Bx1xLxS, scale=scale, is_causal=True,
        local_window_size=(layer_window - 1, 0) if layer_window else None, implementation="cudnn")

  return jax.lax.cond(local, lambda: cudnn(window), lambda: cudnn(0)) if window else cudnn(0)


def splash(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxL, *, window: int, local, scale: float,
           interpret: bool = False):
  """Splash attention per device (`per_device`)."""
  local = jnp.asarray(local if window else False)
  body = functools.partial(_splash_local, window=window, scale=scale, interpret=interpret)
  return per_device(body, q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxL, local)


def _splash_local(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxL, local, *, window: int, scale: float,
                  interpret: bool):
  """Splash attention of this device's rows and heads: the kernel takes one row, heads first."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib

  length, heads = q_BxLxNxH.shape[1], q_BxLxNxH.shape[2]
  q_BxNxLxH = jnp.swapaxes(q_BxLxNxH * jnp.asarray(scale, q_BxLxNxH.dtype), 1, 2)
  k_BxKxSxH, v_BxKxSxH = (jnp.swapaxes(x, 1, 2) for x in (k_BxSxKxH, v_BxSxKxH))
  segment_ids_BxL = segment_ids_BxL.astype(jnp.int32)

  def run(layer_window: int):
    kernel = _splash_kernel(length, heads, layer_window, interpret)
    one_row = lambda q, k, v, s: kernel(q, k, v, segment_ids=kernel_lib.SegmentIds(q=s, kv=s))
    return jax.vmap(one_row)(q_BxNxLxH, k_BxKxSxH, v_BxKxSxH, segment_ids_BxL)

  out_BxNxLxH = jax.lax.cond(local, lambda: run(window), lambda: run(0)) if window else run(0)
  return jnp.swapaxes(out_BxNxLxH, 1, 2).astype(q_BxLxNxH.dtype)


def _splash_kernel(length: int, heads: int, window: int, interpret: bool):
  """The splash kernel of a causal (window 0) or sliding-window mask over `length` positions, `heads`
  query heads (keys and values may have fewer: grouped-query attention)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

  shape = (length, length)
  head_mask = mask_lib.LocalMask(shape, (window - 1, 0), 0) if window else mask_lib.CausalMask(shape)
  block = next(b for b in (SPLASH_BLOCK, 256, LANES) if length % b == 0)
  sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                                block_kv_dq=block)
  return kernel_lib.make_splash_mha(mask_lib.MultiHeadMask([head_mask] * heads), block_sizes=sizes,
                                    head_shards=1, q_seq_shards=1, interpret=interpret)
