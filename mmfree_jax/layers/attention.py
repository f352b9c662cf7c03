"""Causal multi-head attention with RoPE and a KV cache (the Transformer++ mixer, SPEC §1.6)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mmfree_jax.config import ModelConfig

F32 = jnp.float32


def rope(x_BxTxNxH: jax.Array, pos_BxT: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding (half-split convention of Llama / HF)."""
  h = x_BxTxNxH.shape[-1]
  inv = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=F32) / h))
  ang = pos_BxT.astype(F32)[..., None] * inv  # B,T,H/2
  cos, sin = jnp.cos(ang)[:, :, None], jnp.sin(ang)[:, :, None]
  x = x_BxTxNxH.astype(F32)
  x1, x2 = x[..., : h // 2], x[..., h // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


class Attention(nn.Module):
  """Returns (output, new_kv). `kv` = None for training; a dict(k, v) [B,S,N,H] when decoding."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, pos_BxT: jax.Array, segment_ids_BxT: jax.Array | None,
               kv: dict | None, index: jax.Array | None):
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    n, h = cfg.n_heads, cfg.head_dim
    init = nn.initializers.normal(cfg.init_std)
    x = x_BxTxD.astype(dt)

    def qkv(name):
      w = self.param(name, nn.with_logical_partitioning(init, ("embed", "heads", "kv")),
                     (cfg.d_model, n, h), F32)
      return checkpoint_name(jnp.einsum("btd,dnh->btnh", x, w.astype(dt)), "proj")

    q = rope(qkv("q_proj"), pos_BxT, cfg.rope_theta)
    k = rope(qkv("k_proj"), pos_BxT, cfg.rope_theta)
    v = qkv("v_proj")
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    new_kv = None
    if kv is None:
      # Packed documents: causal inside each document. The mask goes to the configured
      # implementation too (cuDNN applies it as a bias on top of its causal mask).
      same = None if segment_ids_BxT is None else (
          segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :])
      o = jax.nn.dot_product_attention(q, k, v, mask=same, is_causal=True,
                                       implementation=cfg.attention_impl)
    else:
      t, s = x.shape[1], kv["k"].shape[1]
      ck = jax.lax.dynamic_update_slice(kv["k"], k.astype(kv["k"].dtype), (0, index, 0, 0))
      cv = jax.lax.dynamic_update_slice(kv["v"], v.astype(kv["v"].dtype), (0, index, 0, 0))
      qpos = index + jnp.arange(t)
      mask = jnp.arange(s)[None, :] <= qpos[:, None]  # T,S
      o = jax.nn.dot_product_attention(q, ck.astype(dt), cv.astype(dt), mask=mask[None, None])
      new_kv = {"k": ck, "v": cv}
    o = checkpoint_name(o, "attn_out")
    wo = self.param("o_proj", nn.with_logical_partitioning(
        nn.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.n_layers)), ("heads", "kv", "embed")),
        (n, h, cfg.d_model), F32)
    return checkpoint_name(jnp.einsum("btnh,nhd->btd", o, wo.astype(dt)), "proj"), new_kv
