"""The MatMul-free forward pass on packed ternary weights (`interop.packed`)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from mmfree_jax.config import ModelConfig
from mmfree_jax.interop.packed import unpack_codes
from mmfree_jax.layers.bitlinear import gated_input, glu_input
from mmfree_jax.layers.mlgru import lower_bounds, mlgru_gates
from mmfree_jax.layers.quant import activation_codes, rms_normalize
from mmfree_jax.layers.scan import linear_recurrence
from mmfree_jax.models import segment_resets

# `forward` mirrors `models.LM` for arch="mmfree" but multiplies int8 activation codes by
# int8 ternary codes with int32 accumulation (`lax.dot_general(..., preferred_element_type=
# int32)`), then applies `g / s`. That integer product is exactly what the latent model's
# float matmul computes, so logits agree up to float32 rounding of the scales. (Measured:
# 1e-7 on small models. At 370M shape the quantizers make the net sensitive to rounding:
# any reassociation, even switching the latent model's `scan_impl`, flips a few activation
# codes and moves logits by ~7% max on H200, the same as packed vs latent there.)

F32 = jnp.float32


def _bitlinear(x, p, k: int, eps: float, out_dtype):
  """BitLinear on packed weights: int8 x int8 -> int32, then `* g / s`."""
  xhat, _ = rms_normalize(x, eps)
  q, s = activation_codes(xhat * p["norm"].astype(F32))
  t = unpack_codes(p["codes"], k)
  acc = jax.lax.dot_general(q.astype(jnp.int8), t, (((q.ndim - 1,), (0,)), ((), ())),
                            preferred_element_type=jnp.int32)
  return (acc.astype(F32) * (p["scale"] / s)).astype(out_dtype)


def _rms(x, w, eps, dtype=None):
  y = rms_normalize(x, eps)[0] * w
  return y if dtype is None else y.astype(dtype)


def forward(cfg: ModelConfig, packed: Any, tokens_BxT: jax.Array,
            segment_ids_BxT: jax.Array | None = None,
            cache: dict | None = None) -> tuple[jax.Array, dict | None]:
  """Same contract as `LM(cfg).apply` for arch="mmfree", on packed params."""
  dt = jnp.dtype(cfg.dtype)
  d, ffn, eps = cfg.d_model, cfg.ffn, cfg.bitlinear_eps
  b = tokens_BxT.shape[0]
  x = jnp.take(packed["embed"], tokens_BxT, axis=0).astype(F32)
  if cfg.lower_bound:
    lb = lower_bounds(packed["lower_bounds"])
  else:
    lb = jnp.zeros((cfg.n_layers, d), F32)
  h0 = cache["h"] if cache is not None else jnp.zeros((cfg.n_layers, b, d), F32)
  resets = None if segment_ids_BxT is None else segment_resets(segment_ids_BxT)

  def block(x, inp):
    lp, lb_D, h0_BxD = inp
    at, mlp = lp["attn"], lp["mlp"]
    a = _rms(x, lp["attn_norm"]["scale"], cfg.norm_eps, dt)
    f, i = mlgru_gates(_bitlinear(a, at["f_proj"], d, eps, dt),
                       _bitlinear(a, at["i_proj"], d, eps, dt), lb_D, F32)
    h, h_last = linear_recurrence(f, i, h0_BxD, resets, cfg.scan_impl, cfg.scan_chunk)
    g = _bitlinear(a, at["g_proj"], d, eps, dt)
    if cfg.gate == "code":
      o = gated_input(g, h, at["g_norm"]["scale"], cfg.norm_eps, dt)
    else:
      o = (jax.nn.sigmoid(g.astype(F32)) * h).astype(dt)
    x = x + _bitlinear(o, at["o_proj"], d, eps, dt).astype(F32)
    m = _rms(x, lp["mlp_norm"]["scale"], cfg.norm_eps, dt)
    gate, up = jnp.split(_bitlinear(m, mlp["gate_proj"], d, eps, dt), 2, axis=-1)
    z = glu_input(gate, up, dt)
    x = x + _bitlinear(z, mlp["down_proj"], ffn, eps, dt).astype(F32)
    return x, h_last

  x, h_last = jax.lax.scan(block, x, (packed["layers"], lb, h0))
  x = _rms(x, packed["norm"]["scale"], cfg.norm_eps)
  logits = _bitlinear(x, packed["lm_head"], d, eps, F32)
  return logits, (None if cache is None else {"h": h_last})


@functools.partial(jax.jit, static_argnums=0)
def packed_logits(cfg: ModelConfig, packed: Any, tokens_BxT: jax.Array) -> jax.Array:
  """Jitted full-sequence logits from packed params."""
  return forward(cfg, packed, tokens_BxT)[0]
