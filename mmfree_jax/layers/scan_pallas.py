"""Pallas (Triton backend) kernels for `h_t = f_t * h_{t-1} + x_t` and its reverse pass.

One program per (batch row, block of `block_d` channels) walks the sequence once,
keeping the float32 state in registers: the forward reads f and x and writes h (plus
the last state), the backward reads f, h and dh and writes dx and df — each tensor
crosses HBM exactly once. Time is unrolled in tiles of `tile_t` steps whose loads are
all issued before the tile's arithmetic, so many loads are in flight per program (the
sequence dimension is the only source of latency hiding: there are just B*D/block_d
programs).

With few lanes (small B*D) those programs leave the GPU mostly idle and their dependent
chains set the time. `chunk_t` > 0 cuts the sequence into time chunks instead, one program
each, chained by a decoupled look-back (the kernels at the end of this file);
`kernel_for` picks them for B*D <= 8,192 (0.39 of the HBM floor forward+backward at
8x2048x1024 on the H200, against 0.29 for the whole-sequence kernels; BENCHMARKS.md).

`gate_forward`/`gate_backward` are the whole-sequence kernels with the MLGRU's gates
formed in registers from its bf16 projections (`scan.mlgru_recurrence`).

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


# Time-chunked look-back kernels for few lanes (B*D <= LOOKBACK_MAX_LANES): at 8x2048x1024
# they run fwd+bwd in 0.156 ms against 0.214 for the whole-sequence kernels (H200).
LOOKBACK_MAX_LANES, LOOKBACK_BLOCK = 8192, 64


def _chunked(t: int, chunk_t: int) -> bool:
  """Whether `chunk_t` selects the look-back kernels: it divides T into >= 2 chunks."""
  return chunk_t > 0 and t % chunk_t == 0 and t // chunk_t > 1


def kernel_for(b: int, t: int, d: int) -> dict | None:
  """Keyword arguments of `forward`/`backward` for a [b, t, d] recurrence (None: no kernel,
  D has no power-of-two block of >= 16 channels)."""
  if b * d <= LOOKBACK_MAX_LANES and d % LOOKBACK_BLOCK == 0 and _chunked(t, LOOKBACK_BLOCK):
    return {"block_d": LOOKBACK_BLOCK, "chunk_t": LOOKBACK_BLOCK}
  bd = block_d_for(b, d)
  return None if bd is None else {"block_d": bd}


def _walk(rows, t: int, tile: int, h):
  """`rows(t0, n, h)` over steps 0..t-1: in tiles of `tile` steps, then the rest singly."""
  n_tiles = t // tile
  h = jax.lax.fori_loop(0, n_tiles, lambda i, h: rows(i * tile, tile, h), h)
  return jax.lax.fori_loop(n_tiles * tile, t, lambda s, h: rows(s, 1, h), h)


def _walk_back(rows, t: int, tile: int, c):
  """`rows(top, n, c)` (rows top, top-1, ...) over steps t-1..1, in tiles of `tile` steps
  from the end, then the rest singly; step 0 is the caller's."""
  n_tiles = (t - 1) // tile
  c = jax.lax.fori_loop(0, n_tiles, lambda i, c: rows(t - 1 - i * tile, tile, c), c)
  rest = t - 1 - n_tiles * tile
  return jax.lax.fori_loop(0, rest, lambda i, c: rows(rest - i, 1, c), c)


def _fwd_kernel(f_ref, x_ref, h0_ref, h_ref, hlast_ref, *, t: int, tile: int):
  def rows(t0, n, h):
    fs = [f_ref[t0 + k, :].astype(F32) for k in range(n)]
    xs = [x_ref[t0 + k, :].astype(F32) for k in range(n)]
    for k in range(n):
      h = fs[k] * h + xs[k]
      h_ref[t0 + k, :] = h.astype(h_ref.dtype)
    return h

  hlast_ref[...] = _walk(rows, t, tile, h0_ref[...].astype(F32))


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

  c = _walk_back(rows, t, tile, dlast_ref[...].astype(F32))
  g = dh_ref[0, :].astype(F32) + c
  dx_ref[0, :] = g.astype(dx_ref.dtype)
  df_ref[0, :] = (g * h0_ref[...].astype(F32)).astype(df_ref.dtype)
  dh0_ref[...] = f_ref[0, :].astype(F32) * g


def _specs(t: int, bd: int):
  seq = pl.BlockSpec((pl.squeezed, t, bd), lambda b, j: (b, 0, j))
  vec = pl.BlockSpec((pl.squeezed, bd), lambda b, j: (b, j))
  return seq, vec


_STATIC = ("block_d", "tile_t", "num_warps", "chunk_t", "publish_inclusive", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def forward(f_BxTxD, x_BxTxD, h0_BxD, *, block_d: int, tile_t: int = TILE_T,
            num_warps: int = NUM_WARPS, chunk_t: int = 0, publish_inclusive: bool = True,
            interpret: bool = False):
  """Returns (h in x's dtype, last state float32). `block_d` must divide D.

  `chunk_t` > 0 (dividing T into >= 2 chunks) runs time chunks of that length with the
  look-back kernel; `publish_inclusive=False` makes every chunk walk back over summaries
  to the first one (slower; exercises the summary path in tests, where interpret mode
  runs the programs in order)."""
  b, t, d = x_BxTxD.shape
  if _chunked(t, chunk_t):
    return _lookback_call(
        _lookback_fwd_kernel, (f_BxTxD, x_BxTxD, h0_BxD),
        [jax.ShapeDtypeStruct((b, t, d), x_BxTxD.dtype), jax.ShapeDtypeStruct((b, d), F32)],
        b=b, t=t, d=d, block_d=block_d, chunk_t=chunk_t, num_warps=num_warps,
        interpret=interpret, name="mlgru_scan_fwd_lookback", inclusive=publish_inclusive)
  seq, vec = _specs(t, block_d)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, t=t, tile=min(tile_t, t)),
      grid=(b, d // block_d), in_specs=[seq, seq, vec], out_specs=[seq, vec],
      out_shape=[jax.ShapeDtypeStruct((b, t, d), x_BxTxD.dtype),
                 jax.ShapeDtypeStruct((b, d), F32)],
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="mlgru_scan_fwd",
  )(f_BxTxD, x_BxTxD, h0_BxD)


@functools.partial(jax.jit, static_argnames=_STATIC)
def backward(f_BxTxD, h_BxTxD, dh_BxTxD, h0_BxD, dlast_BxD, *, block_d: int,
             tile_t: int = TILE_T, num_warps: int = NUM_WARPS, chunk_t: int = 0,
             publish_inclusive: bool = True, interpret: bool = False):
  """Returns (df in f's dtype, dx in h's dtype, dh0 float32); arguments as `forward`."""
  b, t, d = h_BxTxD.shape
  if _chunked(t, chunk_t):
    return _lookback_call(
        _lookback_bwd_kernel, (f_BxTxD, h_BxTxD, dh_BxTxD, h0_BxD, dlast_BxD),
        [jax.ShapeDtypeStruct((b, t, d), f_BxTxD.dtype),
         jax.ShapeDtypeStruct((b, t, d), h_BxTxD.dtype), jax.ShapeDtypeStruct((b, d), F32)],
        b=b, t=t, d=d, block_d=block_d, chunk_t=chunk_t, num_warps=num_warps,
        interpret=interpret, name="mlgru_scan_bwd_lookback", inclusive=publish_inclusive)
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


# ---- Time-chunked kernels with a decoupled look-back (small B*D) -------------------------
#
# One program per (batch row, channel block, time chunk of `chunk_t` steps): B*D/block_d*T/
# chunk_t programs instead of B*D/block_d, each with a short dependent chain. A program takes
# a ticket (a global atomic counter: tickets are handed out in launch order, so every chunk's
# predecessors have started), loads its chunk into registers, publishes the chunk's affine
# summary (product of f, local state), then walks back over its predecessors' published
# summaries until it meets one whose inclusive carry is known, publishes its own inclusive
# carry, and only then runs its chunk from that carry and writes the outputs. Each tensor
# crosses HBM once, as in the one-program-per-lane kernels above.

AGGREGATE, INCLUSIVE = 1, 2  # flag values; INCLUSIVE must be AGGREGATE + 1 (_publish)


def _ticket(ctr_ref, n_chunks: int, n_blk: int, reverse: bool):
  ticket = pltriton.atomic_add(ctr_ref, jnp.int32(0), jnp.int32(1))
  c = ticket % n_chunks
  lane = ticket // n_chunks
  return lane, (n_chunks - 1 - c if reverse else c), lane // n_blk, lane % n_blk


def _carry_in(flag_ref, a_ref, s_ref, incl_ref, *, lane, b, c, cols, first, init,
              n_chunks: int, step: int):
  """The carry entering chunk c: `init` for the first chunk, else the composition of the
  predecessors' summaries (c - step, c - 2 step, ...) down to one with an inclusive carry."""
  ones = jnp.ones(init.shape, F32)

  def body(st):
    j, acc_a, acc_s, carry, done = st
    flag = pltriton.atomic_add(flag_ref, lane * n_chunks + j, j * 0)  # acquire read
    at = lambda r: pltriton.load(r.at[b, j, cols], volatile=True)
    incl, a, s = at(incl_ref), at(a_ref), at(s_ref)
    is_incl, is_agg = flag == INCLUSIVE, flag == AGGREGATE
    carry = jnp.where(is_incl, acc_a * incl + acc_s, carry)
    acc_s = jnp.where(is_agg, acc_a * s + acc_s, acc_s)
    acc_a = jnp.where(is_agg, acc_a * a, acc_a)
    return j - step * is_agg.astype(jnp.int32), acc_a, acc_s, carry, is_incl.astype(jnp.int32)

  st = (c - step, ones, jnp.zeros_like(ones), init, first.astype(jnp.int32))
  return jax.lax.while_loop(lambda st: st[-1] == 0, body, st)[3]


def _publish(flag_ref, a_ref, s_ref, incl_ref, *, lane, b, c, cols, a, s, first, init,
             n_chunks: int):
  """Stores the chunk's summary (a, s): state out = a * state in + s; the first chunk
  publishes its inclusive carry at once."""
  a_ref[b, c, cols] = a
  s_ref[b, c, cols] = s
  incl_ref[b, c, cols] = a * init + s  # only read when the flag says INCLUSIVE
  # INCLUSIVE = AGGREGATE + 1; a jnp.where of the two reaches the atomic as an i1, which
  # Triton's verifier rejects (tests/test_triton_ir.py).
  pltriton.atomic_max(flag_ref, lane * n_chunks + c, AGGREGATE + first.astype(jnp.int32))


def _chain(flag_ref, a_ref, s_ref, incl_ref, *, lane, b, c, cols, first, a, s, init,
           n_chunks: int, step: int, inclusive: bool):
  """The chunk's place in the chain: publishes its summary (a, s), returns the carry
  entering it (look-back over chunks c - step, c - 2 step, ...), and publishes the carry
  leaving it unless `inclusive` is False (successors then walk back to the first chunk)."""
  summaries = (flag_ref, a_ref, s_ref, incl_ref)
  where = dict(lane=lane, b=b, c=c, cols=cols, first=first, n_chunks=n_chunks)
  _publish(*summaries, a=a, s=s, init=init, **where)
  carry = _carry_in(*summaries, init=init, step=step, **where)
  if inclusive:
    @pl.when(jnp.logical_not(first))
    def _():
      incl_ref[b, c, cols] = a * carry + s
      pltriton.atomic_max(flag_ref, lane * n_chunks + c, jnp.int32(INCLUSIVE))
  return carry


def _chunk(ctr_ref, seq_refs, *, n_chunks: int, n_blk: int, chunk: int, bd: int, reverse: bool):
  """This program's (lane, chunk c, batch row b, channel slice cols, first step t0) and the
  chunk's rows of each ref in `seq_refs` (lists of `chunk` [bd] vectors)."""
  lane, c, b, blk = _ticket(ctr_ref, n_chunks, n_blk, reverse)
  cols = pl.ds(pl.multiple_of(blk * bd, bd), bd)
  t0 = c * chunk
  rows = [[r[b, t0 + k, cols] for k in range(chunk)] for r in seq_refs]
  return (lane, c, b, cols, t0), rows


def _lookback_fwd_kernel(f_ref, x_ref, h0_ref, _ctr, _flags, h_ref, hlast_ref, ctr_ref, flag_ref,
                         a_ref, s_ref, incl_ref, *, n_chunks: int, n_blk: int, chunk: int,
                         bd: int, inclusive: bool):
  (lane, c, b, cols, t0), (fs, xs) = _chunk(ctr_ref, (f_ref, x_ref), n_chunks=n_chunks,
                                            n_blk=n_blk, chunk=chunk, bd=bd, reverse=False)
  a, s = jnp.ones((bd,), F32), jnp.zeros((bd,), F32)
  for fk, xk in zip(fs, xs):
    fk = fk.astype(F32)
    s, a = fk * s + xk.astype(F32), a * fk
  first = c == 0
  h0 = h0_ref[b, cols].astype(F32)
  h = _chain(flag_ref, a_ref, s_ref, incl_ref, a=a, s=s, init=h0, step=1, inclusive=inclusive,
             lane=lane, b=b, c=c, cols=cols, first=first, n_chunks=n_chunks)
  for k, (fk, xk) in enumerate(zip(fs, xs)):
    h = fk.astype(F32) * h + xk.astype(F32)
    h_ref[b, t0 + k, cols] = h.astype(h_ref.dtype)

  @pl.when(c == n_chunks - 1)
  def _():
    hlast_ref[b, cols] = h


def _lookback_bwd_kernel(f_ref, h_ref, dh_ref, h0_ref, dlast_ref, _ctr, _flags, df_ref, dx_ref,
                         dh0_ref, ctr_ref, flag_ref, a_ref, s_ref, incl_ref, *, n_chunks: int,
                         n_blk: int, chunk: int, bd: int, inclusive: bool):
  # Right to left: the carry (= f_{s+1} g_{s+1}) maps to f_s (dh_s + carry) at each step s.
  (lane, c, b, cols, t0), (fs, dhs) = _chunk(ctr_ref, (f_ref, dh_ref), n_chunks=n_chunks,
                                             n_blk=n_blk, chunk=chunk, bd=bd, reverse=True)
  a, s = jnp.ones((bd,), F32), jnp.zeros((bd,), F32)
  for fk, dk in zip(fs[::-1], dhs[::-1]):
    fk = fk.astype(F32)
    s, a = fk * (s + dk.astype(F32)), a * fk
  first = c == n_chunks - 1
  dlast = dlast_ref[b, cols].astype(F32)
  carry = _chain(flag_ref, a_ref, s_ref, incl_ref, a=a, s=s, init=dlast, step=-1,
                 inclusive=inclusive, lane=lane, b=b, c=c, cols=cols, first=first,
                 n_chunks=n_chunks)
  h_before = jnp.where(c == 0, h0_ref[b, cols].astype(F32),
                       h_ref[b, jnp.maximum(t0 - 1, 0), cols].astype(F32))
  h_prev = [h_before] + [h_ref[b, t0 + k, cols].astype(F32) for k in range(chunk - 1)]
  for k in range(chunk - 1, -1, -1):
    g = dhs[k].astype(F32) + carry
    dx_ref[b, t0 + k, cols] = g.astype(dx_ref.dtype)
    df_ref[b, t0 + k, cols] = (g * h_prev[k]).astype(df_ref.dtype)
    carry = fs[k].astype(F32) * g

  @pl.when(c == 0)
  def _():
    dh0_ref[b, cols] = carry


def _lookback_call(kernel, args, outs, *, b: int, t: int, d: int, block_d: int, chunk_t: int,
                   num_warps: int, interpret: bool, name: str, inclusive: bool):
  n_chunks, n_blk = t // chunk_t, d // block_d
  lanes = b * n_blk
  state = [jnp.zeros((1,), jnp.int32), jnp.zeros((lanes * n_chunks,), jnp.int32)]
  summaries = [jax.ShapeDtypeStruct((b, n_chunks, d), F32)] * 3
  nin, nout = len(args), len(outs)
  res = pl.pallas_call(
      functools.partial(kernel, n_chunks=n_chunks, n_blk=n_blk, chunk=chunk_t, bd=block_d,
                        inclusive=inclusive),
      grid=(lanes * n_chunks,),
      out_shape=[*outs, *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in state), *summaries],
      input_output_aliases={nin: nout, nin + 1: nout + 1},
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name=name,
  )(*args, *state)
  return res[:nout]


# ---- The MLGRU's gates fused into the whole-sequence kernels -------------------------------
#
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
# warps) and 16 steps per tile. H200, 16x2048x2048 (BENCHMARKS.md, 2026-12-02 fifth
# session): fwd + bwd 0.752 ms at 64 channels, 2 warps, 16 steps against 0.930 with one warp
# and 1.133 for the two steps (XLA gates + the plain kernels); 64 steps per tile took ~80 s
# to compile the backward.
GATE_TILE_T = 16


def gate_kernel_for(b: int, t: int, d: int) -> dict | None:
  """Keyword arguments of `gate_forward`/`gate_backward` for a [b, t, d] recurrence: where
  the whole-sequence kernels run (None for no kernel or the look-back kernels)."""
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

  hlast_ref[...] = _walk(rows, t, tile, h0_ref[...].astype(F32))


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

  carry = _walk_back(rows, t, tile, (dlast_ref[...].astype(F32), jnp.zeros(lb.shape, F32)))
  c, dlb = step(0, fp_ref[0, :].astype(F32), ip_ref[0, :].astype(F32),
                dh_ref[0, :].astype(F32), h0_ref[...].astype(F32), carry)
  dlb_ref[...] = dlb
  dh0_ref[...] = c


def _gate_specs(t: int, bd: int, resets: bool):
  seq, vec = _specs(t, bd)
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
