"""Pallas (Triton backend) kernels of the MLGRU's recurrence with its gates formed in
registers: the whole-sequence kernels of `scan_pallas` reading the forget and input
projections instead of f and x (`mlgru.mlgru_recurrence` picks them)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from mmfree_jax.layers.scan_pallas import kernel_for, seq_specs, walk, walk_back

F32 = jnp.float32

# `gate_forward` reads the bf16 forget and input projections fp, ip (the BitLinear outputs)
# instead of f and x, and forms in registers what `mmfree_jax.layers.mlgru` computes:
#   f = lb + (1 - lb) sigmoid(fp)   (float32; f := 0 in the recurrence where a document
#                                     starts, not in x),
#   x = silu(ip) (1 - f)            (rounded to h's dtype),   h_t = f_t h_{t-1} + x_t.
# `gate_backward` returns the projections' gradients directly (and per-lane partial sums of
# the lower bounds' gradient), so f (float32), x and df never cross HBM.
#
# The gate arithmetic (two exps and divisions per element) runs inside the sequential walk,
# so these kernels want more threads than the plain ones: one channel per thread (block_d / 32
# warps) and 16 steps per tile, the fastest tiling of the sweep (BENCHMARKS.md, "H200
# recurrence"); longer tiles unroll into a backward that takes minutes to compile.
GATE_TILE_T = 16


def gate_kernel_for(b: int, t: int, d: int) -> dict | None:
  """Keyword arguments of `gate_forward`/`gate_backward` for a [b, t, d] recurrence: where
  the whole-sequence kernels run (None for no kernel or the time-chunked kernels)."""
  k = kernel_for(b, t, d)
  if k is None or "chunk_t" in k:
    return None
  return {"block_d": k["block_d"], "num_warps": _gate_warps(k["block_d"]),
          "tile_t": GATE_TILE_T}


def _gate_warps(block_d: int) -> int:
  """One channel per thread."""
  return max(1, block_d // 32)


def _gates(fp, ip, lb):
  """(f, sigmoid(fp), silu(ip), sigmoid(ip)) in float32."""
  sig = 1.0 / (1.0 + jnp.exp(-fp))
  si = 1.0 / (1.0 + jnp.exp(-ip))
  return lb + (1.0 - lb) * sig, sig, ip * si, si


def _reset(v, r_ref, s):
  """v, or 0 where step s starts a document (`r_ref` None: no resets)."""
  return v if r_ref is None else jnp.where(r_ref[s] != 0, 0.0, v)


def _gate_fwd_kernel(*refs, t: int, tile: int, resets: bool):
  fp_ref, ip_ref, lb_ref, h0_ref = refs[:4]
  r_ref = refs[4] if resets else None
  h_ref, hlast_ref = refs[4 + resets:]
  lb = lb_ref[...].astype(F32)

  def rows(t0, n, h):
    fps = [fp_ref[t0 + k, :].astype(F32) for k in range(n)]
    ips = [ip_ref[t0 + k, :].astype(F32) for k in range(n)]
    for k in range(n):
      f, _, silu_i, _ = _gates(fps[k], ips[k], lb)
      x = (silu_i * (1.0 - f)).astype(h_ref.dtype).astype(F32)
      h = _reset(f, r_ref, t0 + k) * h + x
      h_ref[t0 + k, :] = h.astype(h_ref.dtype)
    return h

  hlast_ref[...] = walk(rows, t, tile, h0_ref[...].astype(F32))


def _gate_bwd_kernel(*refs, t: int, tile: int, resets: bool):
  # As _bwd_kernel, then through the gates: df = g h_{s-1} (0 at a document start) - dx
  # silu(ip), d fp = df (1 - lb) sigma'(fp), d ip = dx (1 - f) silu'(ip), d lb += df (1 - sig).
  fp_ref, ip_ref, h_ref, dh_ref, lb_ref, h0_ref, dlast_ref = refs[:7]
  r_ref = refs[7] if resets else None
  dfp_ref, dip_ref, dlb_ref, dh0_ref = refs[7 + resets:]
  lb = lb_ref[...].astype(F32)

  def step(s, fp, ip, dh, h_prev, carry):
    c, dlb = carry
    f, sig, silu_i, si = _gates(fp, ip, lb)
    g = dh + c
    dx = g.astype(h_ref.dtype).astype(F32)  # the cotangent of x, which is in h's dtype
    df = _reset(g * h_prev, r_ref, s) - dx * silu_i
    dfp_ref[s, :] = (df * (1.0 - lb) * sig * (1.0 - sig)).astype(dfp_ref.dtype)
    dip_ref[s, :] = (dx * (1.0 - f) * si * (1.0 + ip * (1.0 - si))).astype(dip_ref.dtype)
    return _reset(f, r_ref, s) * g, dlb + df * (1.0 - sig)

  def rows(top, n, carry):  # rows top, top-1, ..., top-n+1 (all >= 1)
    fps = [fp_ref[top - k, :].astype(F32) for k in range(n)]
    ips = [ip_ref[top - k, :].astype(F32) for k in range(n)]
    dhs = [dh_ref[top - k, :].astype(F32) for k in range(n)]
    hps = [h_ref[top - k - 1, :].astype(F32) for k in range(n)]
    for k in range(n):
      carry = step(top - k, fps[k], ips[k], dhs[k], hps[k], carry)
    return carry

  carry = walk_back(rows, t, tile, (dlast_ref[...].astype(F32), jnp.zeros(lb.shape, F32)))
  c, dlb = step(0, fp_ref[0, :].astype(F32), ip_ref[0, :].astype(F32),
                dh_ref[0, :].astype(F32), h0_ref[...].astype(F32), carry)
  dlb_ref[...] = dlb
  dh0_ref[...] = c


def _gate_specs(t: int, bd: int, resets: bool):
  seq, vec = seq_specs(t, bd)
  chan = pl.BlockSpec((bd,), lambda b, j: (j,))
  row = pl.BlockSpec((pl.squeezed, t), lambda b, j: (b, 0))
  return seq, vec, chan, [row] * resets


_GATE_STATIC = ("block_d", "tile_t", "num_warps", "interpret")


def _gate_params(block_d: int, num_warps: int | None) -> pltriton.CompilerParams:
  return pltriton.CompilerParams(num_warps=num_warps or _gate_warps(block_d), num_stages=1)


@functools.partial(jax.jit, static_argnames=_GATE_STATIC)
def gate_forward(fp_BxTxD, ip_BxTxD, lb_D, h0_BxD, resets_BxT=None, *, block_d: int,
                 tile_t: int = GATE_TILE_T, num_warps: int | None = None,
                 interpret: bool = False):
  """Returns (h in fp's dtype, last state float32) of the MLGRU recurrence on the gate
  projections (see above); `resets_BxT` (bool or int, None: none) marks document starts.
  `num_warps` None: one channel per thread."""
  b, t, d = fp_BxTxD.shape
  r = () if resets_BxT is None else (resets_BxT.astype(jnp.int32),)
  seq, vec, chan, row = _gate_specs(t, block_d, bool(r))
  return pl.pallas_call(
      functools.partial(_gate_fwd_kernel, t=t, tile=min(tile_t, t), resets=bool(r)),
      grid=(b, d // block_d), in_specs=[seq, seq, chan, vec, *row], out_specs=[seq, vec],
      out_shape=[jax.ShapeDtypeStruct((b, t, d), fp_BxTxD.dtype),
                 jax.ShapeDtypeStruct((b, d), F32)],
      compiler_params=_gate_params(block_d, num_warps),
      interpret=interpret, name="mlgru_gate_scan_fwd",
  )(fp_BxTxD, ip_BxTxD, lb_D, h0_BxD, *r)


@functools.partial(jax.jit, static_argnames=_GATE_STATIC)
def gate_backward(fp_BxTxD, ip_BxTxD, h_BxTxD, dh_BxTxD, lb_D, h0_BxD, dlast_BxD,
                  resets_BxT=None, *, block_d: int, tile_t: int = GATE_TILE_T,
                  num_warps: int | None = None, interpret: bool = False):
  """Returns (d fp, d ip in their dtypes, the lower bounds' gradient summed over each
  batch row [B, D] float32, dh0 float32)."""
  b, t, d = fp_BxTxD.shape
  r = () if resets_BxT is None else (resets_BxT.astype(jnp.int32),)
  seq, vec, chan, row = _gate_specs(t, block_d, bool(r))
  return pl.pallas_call(
      functools.partial(_gate_bwd_kernel, t=t, tile=min(tile_t, max(t - 1, 1)),
                        resets=bool(r)),
      grid=(b, d // block_d), in_specs=[seq, seq, seq, seq, chan, vec, vec, *row],
      out_specs=[seq, seq, vec, vec],
      out_shape=[jax.ShapeDtypeStruct((b, t, d), fp_BxTxD.dtype),
                 jax.ShapeDtypeStruct((b, t, d), ip_BxTxD.dtype),
                 jax.ShapeDtypeStruct((b, d), F32), jax.ShapeDtypeStruct((b, d), F32)],
      compiler_params=_gate_params(block_d, num_warps),
      interpret=interpret, name="mlgru_gate_scan_bwd",
  )(fp_BxTxD, ip_BxTxD, h_BxTxD, dh_BxTxD, lb_D, h0_BxD, dlast_BxD, *r)
