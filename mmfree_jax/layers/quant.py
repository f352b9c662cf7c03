"""The quantizers of BitLinear (SPEC §1.1): RMS normalization, per-token absmax int8
activation codes, per-tensor absmean ternary weight codes, and their fake-quantized forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def round_half_away(x: jax.Array) -> jax.Array:
  """Round to nearest, ties away from zero (what the fused reference kernels do)."""
  return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)


def rms_normalize(x: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  """Returns (x * rstd, rstd) in float32; no learnable weight."""
  x = x.astype(F32)
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
  return x * rstd, rstd


def activation_codes(y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token absmax int8 codes: returns (q in [-128, 127] as float32, scale s)."""
  s = 127.0 / jnp.maximum(jnp.max(jnp.abs(y), axis=-1, keepdims=True), 1e-5)
  return jnp.clip(round_half_away(y * s), -128.0, 127.0), s


def activation_quant(y: jax.Array) -> jax.Array:
  """Fake-quantized activations `q / s` (float32)."""
  q, s = activation_codes(y.astype(F32))
  return q / s


def weight_codes(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-tensor absmean ternary codes: returns (t in {-1, 0, 1} as float32, scale g)."""
  w = w.astype(F32)
  g = jnp.maximum(jnp.mean(jnp.abs(w)), 1e-5)
  return jnp.clip(jnp.round(w * (1.0 / g)), -1.0, 1.0), g


def weight_quant(w: jax.Array) -> jax.Array:
  """Fake-quantized ternary weights `t * g` (float32)."""
  t, g = weight_codes(w)
  return t * g
