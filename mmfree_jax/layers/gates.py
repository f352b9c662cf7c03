"""The elementwise gates of the MatMul-free blocks, in XLA: the MLGRU's forget and input gates
(`mlgru_gates`) and output gate (`gated_input`, its backward), the GLU's `silu(gate) * up`.
The Pallas kernels form the same in registers (`mlgru_pallas`, `bitlinear_pallas`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmfree_jax.layers.quant import rms_normalize

F32 = jnp.float32


def mlgru_gates(fp: jax.Array, ip: jax.Array, lb: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """The MLGRU's recurrence inputs from its projections: the forget gate
  `f = lb + (1 - lb) * sigmoid(fp)` (float32) and `x = silu(ip) * (1 - f)` in `dtype`."""
  f = lb + (1.0 - lb) * jax.nn.sigmoid(fp.astype(F32))
  return f, (jax.nn.silu(ip.astype(F32)) * (1.0 - f)).astype(dtype)


def glu_input(gate: jax.Array, up: jax.Array, dtype) -> jax.Array:
  """`silu(gate) * up` in float32, rounded to `dtype` (the GLU's down-projection input)."""
  return (jax.nn.silu(gate.astype(F32)) * up.astype(F32)).astype(dtype)


def glu_gate_up(p: jax.Array, r: jax.Array, dtype) -> jax.Array:
  """gate | up: the gate/up projection's output `p * r` (unscaled integer product
  p [..., 2I], per-row scale r [..., 1]) rounded to `dtype`."""
  return (p.astype(F32) * r).astype(dtype)


def glu_product(gu: jax.Array, dtype) -> jax.Array:
  return glu_input(*jnp.split(gu, 2, axis=-1), dtype)


def gated_input(g: jax.Array, h: jax.Array, gnorm_w: jax.Array, eps: float, dtype) -> jax.Array:
  """The MLGRU's gated output `RMSNorm(g) * gnorm_w * silu(h)` in float32 (as the official
  fused norm-and-gate kernel computes it), rounded to `dtype` (o_proj's input)."""
  ghat, _ = rms_normalize(g, eps)
  return (ghat * gnorm_w.astype(F32) * jax.nn.silu(h.astype(F32))).astype(dtype)


def gated_input_grads(dz: jax.Array, g: jax.Array, h: jax.Array, gnorm_w: jax.Array, eps: float):
  """`gated_input`'s backward from its output's gradient dz (float32): (dg, dh, the rows'
  terms of the g-norm weight's gradient), in float32 and the kernel's arithmetic."""
  ghat, g_rstd = rms_normalize(g, eps)
  h = h.astype(F32)
  sig = jax.nn.sigmoid(h)
  dgn = dz * (h * sig)
  dgh = dgn * gnorm_w
  mean = jnp.mean(dgh * ghat, axis=-1, keepdims=True)
  dh = dz * (ghat * gnorm_w) * (sig * (1.0 + h * (1.0 - sig)))
  return g_rstd * (dgh - ghat * mean), dh, dgn * ghat
