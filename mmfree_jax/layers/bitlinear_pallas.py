"""Pallas (Triton backend) kernel for the BitLinear input prologue.

One program per token row reads x once and writes the int8 activation codes: RMSNorm
statistic, the learnable norm weight, the per-token absmax scale and round-half-away
quantization all stay in registers. XLA splits the same math into three fusions with a
float32 intermediate (the normalized row) written and read back twice.

`mmfree_jax.layers.bitlinear` uses it on CUDA GPUs and the XLA expression elsewhere;
`interpret=True` runs it on any backend for tests. Results agree with the XLA path up to
float32 summation order in the norm (an activation within an ulp of a rounding boundary
can land on the neighbouring code).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

F32 = jnp.float32


def _kernel(x_ref, w_ref, q_ref, s_ref, rstd_ref, *, k: int, eps: float):
  cols = jnp.arange(x_ref.shape[-1])
  mask = cols < k
  x = pltriton.load(x_ref.at[cols], mask=mask, other=0.0).astype(F32)
  w = pltriton.load(w_ref.at[cols], mask=mask, other=0.0).astype(F32)
  rstd = jax.lax.rsqrt(jnp.sum(x * x) / k + eps)
  y = x * rstd * w
  s = 127.0 / jnp.maximum(jnp.max(jnp.abs(y)), 1e-5)
  z = y * s
  r = jnp.floor(jnp.abs(z) + 0.5)
  q = jnp.clip(jnp.where(z < 0, -r, r), -128.0, 127.0)
  pltriton.store(q_ref.at[cols], q.astype(q_ref.dtype), mask=mask)
  s_ref[...] = s
  rstd_ref[...] = rstd


@functools.partial(jax.jit, static_argnames=("eps", "out_dtype", "interpret"))
def activation_codes(x_MxK: jax.Array, norm_w_K: jax.Array, eps: float, out_dtype=jnp.bfloat16,
                     interpret: bool = False):
  """Returns (codes [M, K] in out_dtype, scale s [M, 1], rstd [M, 1]) (float32 s, rstd).

  codes = clip(round_half_away(x * rstd * w * s)), s = 127 / max|x * rstd * w|.
  """
  m, k = x_MxK.shape
  kp = pl.next_power_of_2(k)
  row = pl.BlockSpec((pl.squeezed, kp), lambda i: (i, 0))
  one = pl.BlockSpec((pl.squeezed,), lambda i: (i,))
  q, s, rstd = pl.pallas_call(
      functools.partial(_kernel, k=k, eps=eps), grid=(m,),
      in_specs=[row, pl.BlockSpec((kp,), lambda i: (0,))], out_specs=[row, one, one],
      out_shape=[jax.ShapeDtypeStruct((m, k), out_dtype), jax.ShapeDtypeStruct((m,), F32),
                 jax.ShapeDtypeStruct((m,), F32)],
      compiler_params=pltriton.CompilerParams(num_warps=min(max(kp // 256, 1), 8), num_stages=1),
      interpret=interpret, name="bitlinear_act_codes",
  )(x_MxK, norm_w_K)
  return q, s[:, None], rstd[:, None]
