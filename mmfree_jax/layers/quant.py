"""The quantizers of BitLinear (SPEC §1.1): RMS normalization, per-token absmax int8
activation codes, per-tensor absmean ternary weight codes (also packed four per byte), and
their fake-quantized forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

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


def pack_codes(t_KxN: np.ndarray) -> np.ndarray:
  """Ternary codes {-1,0,1} [..., K, N] -> uint8 [..., ceil(K/4), N] (K padded with 0s)."""
  t = np.asarray(t_KxN)
  if not np.all(np.isin(t, (-1, 0, 1))):
    raise ValueError("pack_codes takes ternary codes in {-1, 0, 1}; ternarize with "
                     "weight_codes first")
  k = t.shape[-2]
  pad = (-k) % 4
  c = (t.astype(np.int16) + 1).astype(np.uint8)
  if pad:
    c = np.concatenate([c, np.ones(c.shape[:-2] + (pad, c.shape[-1]), np.uint8)], axis=-2)
  c = c.reshape(c.shape[:-2] + ((k + pad) // 4, 4, c.shape[-1]))
  return (c[..., 0, :] | c[..., 1, :] << 2 | c[..., 2, :] << 4 | c[..., 3, :] << 6).astype(np.uint8)


def unpack_codes(packed: jax.Array, k: int) -> jax.Array:
  """uint8 [..., K/4, N] -> int8 ternary codes [..., K, N] (works inside jit)."""
  shifts = jnp.arange(4, dtype=jnp.uint8)[:, None] * 2
  c = (packed[..., :, None, :] >> shifts) & 3  # [..., K/4, 4, N]
  c = c.reshape(packed.shape[:-2] + (packed.shape[-2] * 4, packed.shape[-1]))[..., :k, :]
  return c.astype(jnp.int8) - 1
