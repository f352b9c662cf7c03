"""Pallas (Triton backend) kernels for `h_t = f_t * h_{t-1} + x_t` and its reverse pass.

One program per (batch row, block of `block_d` channels) walks the sequence once,
keeping the float32 state in registers: the forward reads f and x and writes h (plus
the last state), the backward reads f, h and dh and writes dx and df — each tensor
crosses HBM exactly once. Time is unrolled in tiles of `tile_t` steps whose loads are
all issued before the tile's arithmetic, so many loads are in flight per program (the
sequence dimension is the only source of latency hiding: there are just B*D/block_d
programs).

`mmfree_jax.layers.scan` uses these on GPUs (impl "pallas") and the XLA associative
scan elsewhere; `interpret=True` runs the same kernels on any backend for tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

F32 = jnp.float32
# Defaults chosen on the H200 (BENCHMARKS.md, `python -m mmfree_jax.bench --only=recurrence`).
TILE_T, NUM_WARPS = 64, 1


def block_d_for(b: int, d: int) -> int | None:
  """Channels per program: 64, or 32 when B*D is small (more programs in flight); a
  smaller power of two if D needs it; None below 16 (no kernel)."""
  blk = 64 if b * d > 16384 else 32
  while blk >= 16 and d % blk:
    blk //= 2
  return blk if blk >= 16 else None


def _fwd_kernel(f_ref, x_ref, h0_ref, h_ref, hlast_ref, *, t: int, tile: int):
  def rows(t0, n, h):
    fs = [f_ref[t0 + k, :].astype(F32) for k in range(n)]
    xs = [x_ref[t0 + k, :].astype(F32) for k in range(n)]
    for k in range(n):
      h = fs[k] * h + xs[k]
      h_ref[t0 + k, :] = h.astype(h_ref.dtype)
    return h

  n_tiles = t // tile
  h = jax.lax.fori_loop(0, n_tiles, lambda i, h: rows(i * tile, tile, h),
                        h0_ref[...].astype(F32))
  h = jax.lax.fori_loop(n_tiles * tile, t, lambda s, h: rows(s, 1, h), h)
  hlast_ref[...] = h


def _bwd_kernel(f_ref, h_ref, dh_ref, h0_ref, dlast_ref, df_ref, dx_ref, dh0_ref, *, t: int,
                tile: int):
  # g_s = dh_s + f_{s+1} g_{s+1};  dx_s = g_s;  df_s = g_s h_{s-1};  dh0 = f_0 g_0.
  # The carry c = f_{s+1} g_{s+1} starts as dlast (the cotangent of the last state).
  def rows(top, n, c):  # rows top, top-1, ..., top-n+1 (all >= 1)
    fs = [f_ref[top - k, :].astype(F32) for k in range(n)]
    dhs = [dh_ref[top - k, :].astype(F32) for k in range(n)]
    hps = [h_ref[top - k - 1, :].astype(F32) for k in range(n)]
    for k in range(n):
      g = dhs[k] + c
      dx_ref[top - k, :] = g.astype(dx_ref.dtype)
      df_ref[top - k, :] = (g * hps[k]).astype(df_ref.dtype)
      c = fs[k] * g
    return c

  n_tiles = (t - 1) // tile
  c = jax.lax.fori_loop(0, n_tiles, lambda i, c: rows(t - 1 - i * tile, tile, c),
                        dlast_ref[...].astype(F32))
  rest = t - 1 - n_tiles * tile
  c = jax.lax.fori_loop(0, rest, lambda i, c: rows(rest - i, 1, c), c)
  g = dh_ref[0, :].astype(F32) + c
  dx_ref[0, :] = g.astype(dx_ref.dtype)
  df_ref[0, :] = (g * h0_ref[...].astype(F32)).astype(df_ref.dtype)
  dh0_ref[...] = f_ref[0, :].astype(F32) * g


def _specs(t: int, bd: int):
  seq = pl.BlockSpec((pl.squeezed, t, bd), lambda b, j: (b, 0, j))
  vec = pl.BlockSpec((pl.squeezed, bd), lambda b, j: (b, j))
  return seq, vec


@functools.partial(jax.jit, static_argnames=("block_d", "tile_t", "num_warps", "interpret"))
def forward(f_BxTxD, x_BxTxD, h0_BxD, *, block_d: int, tile_t: int = TILE_T,
            num_warps: int = NUM_WARPS, interpret: bool = False):
  """Returns (h in x's dtype, last state float32). `block_d` must divide D."""
  b, t, d = x_BxTxD.shape
  seq, vec = _specs(t, block_d)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, t=t, tile=min(tile_t, t)),
      grid=(b, d // block_d), in_specs=[seq, seq, vec], out_specs=[seq, vec],
      out_shape=[jax.ShapeDtypeStruct((b, t, d), x_BxTxD.dtype),
                 jax.ShapeDtypeStruct((b, d), F32)],
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="mlgru_scan_fwd",
  )(f_BxTxD, x_BxTxD, h0_BxD)


@functools.partial(jax.jit, static_argnames=("block_d", "tile_t", "num_warps", "interpret"))
def backward(f_BxTxD, h_BxTxD, dh_BxTxD, h0_BxD, dlast_BxD, *, block_d: int,
             tile_t: int = TILE_T, num_warps: int = NUM_WARPS, interpret: bool = False):
  """Returns (df in f's dtype, dx in h's dtype, dh0 float32)."""
  b, t, d = h_BxTxD.shape
  seq, vec = _specs(t, block_d)
  return pl.pallas_call(
      functools.partial(_bwd_kernel, t=t, tile=min(tile_t, max(t - 1, 1))),
      grid=(b, d // block_d), in_specs=[seq, seq, seq, vec, vec], out_specs=[seq, seq, vec],
      out_shape=[jax.ShapeDtypeStruct((b, t, d), f_BxTxD.dtype),
                 jax.ShapeDtypeStruct((b, t, d), h_BxTxD.dtype),
                 jax.ShapeDtypeStruct((b, d), F32)],
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="mlgru_scan_bwd",
  )(f_BxTxD, h_BxTxD, dh_BxTxD, h0_BxD, dlast_BxD)
