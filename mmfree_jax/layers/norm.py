"""RMSNorm with a learnable weight, computed in float32 (SPEC §1)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmfree_jax.layers.bitlinear import rms_normalize


class RMSNorm(nn.Module):
  """`x * rsqrt(mean(x^2) + eps) * w`; returns float32 unless `dtype` is given."""

  eps: float = 1e-6
  axis_name: str = "embed"
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                   (x.shape[-1],), jnp.float32)
    y = rms_normalize(x, self.eps)[0] * w
    return y.astype(self.dtype) if self.dtype is not None else y
