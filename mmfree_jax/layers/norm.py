"""RMSNorm with a learnable weight, computed in float32 (SPEC §1)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmfree_jax.layers.quant import rms_normalize


def _scale(module: nn.Module, d: int, axis_name: str) -> jax.Array:
  return module.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (axis_name,)),
                      (d,), jnp.float32)


class RMSNorm(nn.Module):
  """`x * rsqrt(mean(x^2) + eps) * w`; returns float32 unless `dtype` is given."""

  eps: float = 1e-6
  axis_name: str = "embed"
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = rms_normalize(x, self.eps)[0] * _scale(self, x.shape[-1], self.axis_name)
    return y.astype(self.dtype) if self.dtype is not None else y


class RMSNormScale(nn.Module):
  """The weight of an `RMSNorm` (same name and layout) without the norm: for a parent that
  applies it inside a fused function (`bitlinear.gated_bitlinear`)."""

  axis_name: str = "embed"

  @nn.compact
  def __call__(self, d: int) -> jax.Array:
    return _scale(self, d, self.axis_name)
