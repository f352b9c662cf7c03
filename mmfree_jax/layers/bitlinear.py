"""Ternary BitLinear (SPEC §1.1): input RMSNorm, 8-bit activations, ternary weights, STE.

`bitlinear` is the memory-lean version: a `custom_vjp` that saves only the input `x`
(plus the parameters it already has) and recomputes the normalized, quantized
activations in the backward pass. `bitlinear_naive` is plain autodiff through
straight-through estimators and serves as the reference.

The matmul runs on the exact integer codes (int8 activations, ternary weights; both exact
in bfloat16) with float32 accumulation, then applies both scales. With float32 compute the
result is the quantized product up to float32 rounding; with bf16 compute the integer
product is rounded once to bf16 before scaling (relative error <= 2^-9, like any bf16
matmul output). `mmfree_jax.infer.packed` has an exact int8 x int8 -> int32 path.
impl "pallas" computes the codes with one fused Pallas kernel on CUDA GPUs
(`bitlinear_pallas`).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mmfree_jax import sharding
from mmfree_jax.layers import bitlinear_pallas

F32 = jnp.float32
KERNEL_MIN_ROWS = 256


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


def _mm(a: jax.Array, b: jax.Array, dtype, out=F32) -> jax.Array:
  """`a[..., K] @ b[K, N]` with operands in `dtype`, float32 accumulation, `out` result."""
  return jax.lax.dot_general(
      a.astype(dtype), b.astype(dtype), (((a.ndim - 1,), (0,)), ((), ())),
      preferred_element_type=out)


def _xla_codes(x, norm_w, eps, out_dtype=F32):
  xhat, rstd = rms_normalize(x, eps)
  q, s = activation_codes(xhat * norm_w.astype(F32))
  return q.astype(out_dtype), s, rstd


def _codes(x, norm_w, eps, dtype, impl):
  """(activation codes as `dtype`, per-token scale s, rstd) of the normalized input.

  impl "pallas": one fused kernel on CUDA GPUs (`bitlinear_pallas`; per device under a
  data/fsdp mesh), the XLA expression on other platforms, on tensor-parallel meshes and
  for fewer than `KERNEL_MIN_ROWS` tokens (decode steps: XLA fuses those few rows into
  neighbouring ops); "xla": the XLA expression everywhere.
  """
  xla = lambda x, norm_w: _xla_codes(x, norm_w, eps, dtype)
  if impl != "pallas" or math.prod(x.shape[:-1]) < KERNEL_MIN_ROWS:
    return xla(x, norm_w)
  k = x.shape[-1]

  def kernel(x, norm_w):
    q, s, rstd = bitlinear_pallas.activation_codes(x.reshape(-1, k), norm_w, eps, dtype)
    lead = x.shape[:-1]
    return q.reshape(*lead, k), s.reshape(*lead, 1), rstd.reshape(*lead, 1)
  return sharding.cuda_kernel(kernel, xla, x, norm_w, replicated_args=(1,))


def _forward(x, norm_w, w, eps, dtype, impl):
  q, s, _ = _codes(x, norm_w, eps, dtype, impl)
  t, g = weight_codes(w)
  # The integer product is rounded once to the compute dtype (exact in float32; in
  # bf16 the same relative error as rounding the scaled result), then scaled in f32.
  return _mm(q, t, dtype, out=dtype).astype(F32) * (g / s)


def _split(out, splits):
  return out if splits == 1 else tuple(jnp.split(out, splits, axis=-1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def bitlinear(x: jax.Array, norm_w: jax.Array, w: jax.Array, eps: float = 1e-8,
              dtype=jnp.bfloat16, out_dtype=None, impl: str = "xla", splits: int = 1):
  """BitLinear forward `x[..., K] -> [..., N]` with a recomputing backward.

  Args:
    x: input activations [..., K] (any float dtype).
    norm_w: the input RMSNorm weight [K].
    w: latent float weights [K, N].
    eps: RMSNorm epsilon.
    dtype: matmul operand dtype (bfloat16 or float32).
    out_dtype: output dtype (default: `dtype`).
    impl: "xla" or "pallas" (fused input prologue on CUDA GPUs; see `_codes`).
    splits: > 1 returns the output as that many equal slices of N (one matmul, one
      weight scale); their cotangents never get concatenated in the backward pass.

  Returns:
    [..., N] in out_dtype, or a tuple of `splits` arrays [..., N / splits].
  """
  return _split(_forward(x, norm_w, w, eps, dtype, impl).astype(out_dtype or dtype), splits)


def _bitlinear_fwd(x, norm_w, w, eps, dtype, out_dtype, impl, splits):
  out = _forward(x, norm_w, w, eps, dtype, impl).astype(out_dtype or dtype)
  return _split(out, splits), (x, norm_w, w)


def _bitlinear_bwd(eps, dtype, out_dtype, impl, splits, res, g_out):
  del out_dtype
  x, norm_w, w = res
  q, s, rstd = _codes(x, norm_w, eps, dtype, impl)
  xhat = x.astype(F32) * rstd
  t, g = weight_codes(w)
  g_outs = g_out if splits > 1 else (g_out,)
  t_parts = jnp.split(t.astype(dtype), splits, axis=1)
  # STE: d(out)/d(y) = W_q^T, d(out)/d(W) = y_q^T (per output slice).
  dy = sum(jax.lax.dot_general(go.astype(dtype), tp, (((go.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=dtype).astype(F32)
           for go, tp in zip(g_outs, t_parts)) * g
  yq = (q.astype(F32) / s).reshape(-1, q.shape[-1]).astype(dtype)
  dw = jnp.concatenate([
      jax.lax.dot_general(yq, go.reshape(-1, go.shape[-1]).astype(dtype),
                          (((0,), (0,)), ((), ())), preferred_element_type=F32)
      for go in g_outs], axis=1)
  # RMSNorm backward.
  red = tuple(range(x.ndim - 1))
  dnorm_w = jnp.sum(dy * xhat, axis=red)
  dxhat = dy * norm_w.astype(F32)
  dx = rstd * (dxhat - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True))
  return dx.astype(x.dtype), dnorm_w.astype(norm_w.dtype), dw.astype(w.dtype)


bitlinear.defvjp(_bitlinear_fwd, _bitlinear_bwd)


def bitlinear_naive(x, norm_w, w, eps: float = 1e-8, dtype=jnp.bfloat16, out_dtype=None,
                    impl: str = "xla", splits: int = 1):
  """Reference BitLinear: autodiff through straight-through estimators (keeps y, y_q)."""
  del impl
  xhat, _ = rms_normalize(x, eps)
  y = xhat * norm_w.astype(F32)
  y_q = y + jax.lax.stop_gradient(activation_quant(y) - y)
  w32 = w.astype(F32)
  w_q = w32 + jax.lax.stop_gradient(weight_quant(w32) - w32)
  return _split(_mm(y_q, w_q, dtype).astype(out_dtype or dtype), splits)


class BitLinear(nn.Module):
  """Ternary projection with its own input RMSNorm; kernel stored [in, out] in float32."""

  features: int
  axes: tuple[str, str] = ("embed", "mlp")
  eps: float = 1e-8
  dtype: jnp.dtype = jnp.bfloat16
  out_dtype: jnp.dtype | None = None
  kernel_init: Callable = nn.initializers.normal(0.02)
  lean: bool = True
  impl: str = "xla"
  splits: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = x.shape[-1]
    norm_w = self.param("norm", nn.with_logical_partitioning(nn.initializers.ones, self.axes[:1]),
                        (k,), F32)
    w = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                   (k, self.features), F32)
    fn = bitlinear if self.lean else bitlinear_naive
    out = fn(x, norm_w, w, self.eps, self.dtype, self.out_dtype, self.impl, self.splits)
    return jax.tree.map(lambda o: checkpoint_name(o, "proj"), out)


def xavier_uniform(gain: float) -> Callable:
  """Xavier/Glorot uniform with a gain (variance_scaling(gain^2, fan_avg, uniform))."""
  return nn.initializers.variance_scaling(gain**2, "fan_avg", "uniform")


def ternary_stats(w: jax.Array) -> dict[str, jax.Array]:
  """Fractions of -1/0/+1 codes and the absmean scale of a latent weight."""
  t, g = weight_codes(w)
  return {"neg": jnp.mean(t < 0), "zero": jnp.mean(t == 0), "pos": jnp.mean(t > 0), "scale": g}


__all__: Sequence[str] = (
    "BitLinear", "bitlinear", "bitlinear_naive", "activation_codes", "activation_quant",
    "weight_codes", "weight_quant", "round_half_away", "rms_normalize", "xavier_uniform",
    "ternary_stats")
