"""Pallas (Triton backend) kernels for the elementwise work around BitLinear matmuls.

A BitLinear group is n ternary projections of ONE input row x (the MLGRU's f/i/g
projections share theirs; most BitLinears are a group of one), each with its own input
RMSNorm weight. The input is either an array or, with `glu=True`, the pair (gate, up)
whose product `silu(gate) * up` (rounded to `x_dtype`) is the input: the GLU's down
projection reads its two halves directly and never materializes the product.

- `activation_codes`: one program per row reads the input once and writes each
  projection's int8 activation codes and per-token scale (RMSNorm, norm weight, absmax,
  round-half-away all in registers). XLA needs three fusions per projection, with a
  float32 copy of the normalized row written and read back twice.
- `backward`: one program per block of rows reads the input and the n matmul cotangents
  dy_j = d(out_j) @ W_j^T once and writes the input's gradient (RMSNorm backward summed
  over the group, then the GLU backward when `glu`), the fake-quantized activations
  q_j / s_j that the weight-gradient matmuls need, and per-block partial sums of the
  norm-weight gradients (reduced over blocks by XLA: a deterministic order).

`mmfree_jax.layers.bitlinear` uses them on CUDA GPUs and the same math in XLA elsewhere;
`interpret=True` runs them on any backend for tests. Results agree with the XLA path up
to float32 summation order in the row reductions (an activation within an ulp of a
rounding boundary can land on the neighbouring code).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

F32 = jnp.float32
BLOCK_M = 32  # rows per backward program (its norm-weight partial sums are one row each)


def block_rows(m: int) -> int:
  """Rows per backward program: the largest power of two <= BLOCK_M dividing m."""
  return m & -m if m & -m < BLOCK_M else BLOCK_M


def warps_for(kp: int) -> int:
  """Warps per backward program for a padded row width kp (the H200 sweep's best)."""
  return 4 if kp <= 2048 else 8


def _silu_parts(a):
  sig = 1.0 / (1.0 + jnp.exp(-a))
  return a * sig, sig


def _row(x_refs, load, glu: bool, x_dtype):
  """The input row in float32: x, or silu(gate) * up rounded to x_dtype."""
  if not glu:
    return load(x_refs[0]).astype(F32), None
  a, b = (load(r).astype(F32) for r in x_refs)
  silu, sig = _silu_parts(a)
  return (silu * b).astype(x_dtype).astype(F32), (a, b, silu, sig)


def _quantize(y, axis=None):
  s = 127.0 / jnp.maximum(jnp.max(jnp.abs(y), axis=axis, keepdims=axis is not None), 1e-5)
  z = y * s
  r = jnp.floor(jnp.abs(z) + 0.5)
  return jnp.clip(jnp.where(z < 0, -r, r), -128.0, 127.0), s


def _fwd_kernel(*refs, n: int, k: int, eps: float, glu: bool, x_dtype):
  x_refs, (w_ref,), outs = refs[:1 + glu], refs[1 + glu:2 + glu], refs[2 + glu:]
  q_refs, s_refs = outs[:n], outs[n:]
  cols = jnp.arange(x_refs[0].shape[-1])
  mask = cols < k
  load = lambda r: pltriton.load(r.at[cols], mask=mask, other=0.0)
  x, _ = _row(x_refs, load, glu, x_dtype)
  rstd = jax.lax.rsqrt(jnp.sum(x * x) / k + eps)
  xhat = x * rstd
  for j in range(n):
    w = pltriton.load(w_ref.at[j, cols], mask=mask, other=0.0)
    q, s = _quantize(xhat * w)
    pltriton.store(q_refs[j].at[cols], q.astype(q_refs[j].dtype), mask=mask)
    s_refs[j][...] = s


@functools.partial(jax.jit, static_argnames=("eps", "out_dtype", "glu", "x_dtype", "interpret"))
def activation_codes(xs, norm_w_NxK: jax.Array, eps: float, out_dtype=jnp.bfloat16,
                     glu: bool = False, x_dtype=jnp.bfloat16, interpret: bool = False):
  """Codes of each projection's normalized input row.

  Args:
    xs: (x [M, K],), or (gate [M, K], up [M, K]) with `glu`.
    norm_w_NxK: the n input-RMSNorm weights.

  Returns:
    (codes: n arrays [M, K] in out_dtype, scales: n arrays [M, 1] float32) with
    codes_j = clip(round_half_away(xhat * w_j * s_j)), s_j = 127 / max|xhat * w_j|.
  """
  n = norm_w_NxK.shape[0]
  m, k = xs[0].shape
  kp = pl.next_power_of_2(k)
  row = pl.BlockSpec((pl.squeezed, kp), lambda i: (i, 0))
  one = pl.BlockSpec((pl.squeezed,), lambda i: (i,))
  outs = pl.pallas_call(
      functools.partial(_fwd_kernel, n=n, k=k, eps=eps, glu=glu, x_dtype=x_dtype), grid=(m,),
      in_specs=[row] * len(xs) + [pl.BlockSpec((n, kp), lambda i: (0, 0))],
      out_specs=[row] * n + [one] * n,
      out_shape=([jax.ShapeDtypeStruct((m, k), out_dtype)] * n
                 + [jax.ShapeDtypeStruct((m,), F32)] * n),
      compiler_params=pltriton.CompilerParams(num_warps=min(max(kp // 256, 1), 8), num_stages=1),
      interpret=interpret, name="bitlinear_act_codes",
  )(*xs, norm_w_NxK)
  return list(outs[:n]), [s[:, None] for s in outs[n:]]


def _bwd_kernel(*refs, n: int, k: int, eps: float, glu: bool, x_dtype, bm: int, rows: int):
  nx = 1 + glu
  x_refs, dy_refs, (w_ref, wg_ref) = refs[:nx], refs[nx:nx + n], refs[nx + n:nx + n + 2]
  outs = refs[nx + n + 2:]
  dx_refs, yq_refs, part_refs = outs[:nx], outs[nx:nx + n], outs[nx + n:]
  cols = jnp.arange(x_refs[0].shape[-1])
  mask = cols < k
  ws = [pltriton.load(w_ref.at[j, cols], mask=mask, other=0.0) for j in range(n)]
  wgs = [pltriton.load(wg_ref.at[j, cols], mask=mask, other=0.0) for j in range(n)]
  tile_mask = jnp.broadcast_to(mask, (rows, cols.shape[0]))
  rsum = lambda v: jnp.sum(v, axis=-1, keepdims=True)

  def body(i, parts):  # `rows` rows at a time: [rows, K] tiles, per-row reductions
    at = lambda ref: ref.at[pl.ds(i * rows, rows), :]
    load = lambda ref: pltriton.load(at(ref), mask=tile_mask, other=0.0)
    store = lambda ref, v: pltriton.store(at(ref), v.astype(ref.dtype), mask=tile_mask)
    x, glu_parts = _row(x_refs, load, glu, x_dtype)
    rstd = jax.lax.rsqrt(rsum(x * x) / k + eps)
    xhat = x * rstd
    dys = [load(ref).astype(F32) for ref in dy_refs]
    dxhat = sum(dy * wg for dy, wg in zip(dys, wgs))
    dx = rstd * (dxhat - xhat * (rsum(dxhat * xhat) / k))
    for j in range(n):
      q, s = _quantize(xhat * ws[j], axis=-1)
      store(yq_refs[j], q / s)
    if glu:
      a, b, silu, sig = glu_parts
      dz = dx.astype(x_dtype).astype(F32)  # the product is rounded to x_dtype
      store(dx_refs[0], dz * b * sig * (1.0 + a * (1.0 - sig)))
      store(dx_refs[1], dz * silu)
    else:
      store(dx_refs[0], dx)
    return tuple(p + jnp.sum(dy * xhat, axis=0) for p, dy in zip(parts, dys))

  parts = jax.lax.fori_loop(0, bm // rows, body,
                            tuple(jnp.zeros(cols.shape, F32) for _ in range(n)))
  for ref, p in zip(part_refs, parts):
    pltriton.store(ref.at[cols], p, mask=mask)


@functools.partial(jax.jit, static_argnames=("eps", "glu", "x_dtype", "rows", "num_warps",
                                             "interpret"))
def backward(xs, dys, norm_w_NxK: jax.Array, wg_NxK: jax.Array, eps: float, glu: bool = False,
             x_dtype=jnp.bfloat16, rows: int = 1, num_warps: int = 0, interpret: bool = False):
  """The group's backward prologue.

  Args:
    xs: the forward inputs, (x [M, K],) or (gate, up) with `glu`.
    dys: n cotangents [M, K] of the normalized, quantized inputs (the transposed matmuls'
      outputs, before the weight scale).
    norm_w_NxK: the norm weights w_j; wg_NxK: w_j times each weight scale g_j.
    rows: rows per loop step (a [rows, K] tile); num_warps: per program (0 = `warps_for`).
      One row and `warps_for` were the fastest in the H200 sweep (BENCHMARKS.md).

  Returns:
    (input gradients: one array per xs entry, in its dtype; yq: n arrays [M, K] in dys'
    dtype, the fake-quantized activations; partial sums of dy_j * xhat over each block of
    `block_rows(M)` rows: n arrays [M / block_rows(M), K] float32).
  """
  n = norm_w_NxK.shape[0]
  m, k = xs[0].shape
  kp = pl.next_power_of_2(k)
  bm = block_rows(m)
  rows = min(rows, bm)
  block = pl.BlockSpec((bm, kp), lambda i: (i, 0))
  part = pl.BlockSpec((pl.squeezed, kp), lambda i: (i, 0))
  full = pl.BlockSpec((n, kp), lambda i: (0, 0))
  outs = pl.pallas_call(
      functools.partial(_bwd_kernel, n=n, k=k, eps=eps, glu=glu, x_dtype=x_dtype, bm=bm,
                        rows=rows),
      grid=(m // bm,), in_specs=[block] * (len(xs) + n) + [full, full],
      out_specs=[block] * (len(xs) + n) + [part] * n,
      out_shape=([jax.ShapeDtypeStruct((m, k), x.dtype) for x in xs]
                 + [jax.ShapeDtypeStruct((m, k), dys[0].dtype)] * n
                 + [jax.ShapeDtypeStruct((m // bm, k), F32)] * n),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps or warps_for(kp), num_stages=1),
      interpret=interpret, name="bitlinear_bwd",
  )(*xs, *dys, norm_w_NxK, wg_NxK)
  nx = len(xs)
  return list(outs[:nx]), list(outs[nx:nx + n]), list(outs[nx + n:])
