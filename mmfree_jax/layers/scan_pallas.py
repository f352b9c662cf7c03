"""Pallas (Triton backend) kernels for `h_t = f_t * h_{t-1} + x_t` and its reverse pass,
used by `layers.scan` on CUDA GPUs (impl "pallas"); `interpret=True` runs the same kernels
on any backend for tests."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# One program per (batch row, block of `block_d` channels) walks the sequence once,
# keeping the float32 state in registers: the forward reads f and x and writes h (plus
# the last state), the backward reads f, h and dh and writes dx and df — each tensor
# crosses HBM exactly once. Time is unrolled in tiles of `tile_t` steps whose loads are
# all issued before the tile's arithmetic, so many loads are in flight per program (the
# sequence dimension is the only source of latency hiding: there are just B*D/block_d
# programs).
#
# With few lanes (small B*D) those programs leave the GPU mostly idle and their dependent
# chains set the time. `chunk_t` > 0 cuts the sequence into time chunks instead, one program
# each, in two launches: chunk summaries, then every chunk from its predecessors' composed
# summaries (the kernels after the whole-sequence ones). `kernel_for` picks them for
# B*D <= 8,192, where they beat the whole-sequence kernels (BENCHMARKS.md, "H100 recurrence").
# The MLGRU's gate-fused variants of the whole-sequence kernels are in `mlgru_pallas`.

F32 = jnp.float32
# The fastest tile of the whole-sequence kernels (BENCHMARKS.md, "H200 recurrence").
TILE_T, NUM_WARPS = 64, 1


def block_d_for(b: int, d: int) -> int | None:
  """Channels per program: 64, or 32 when B*D is small (more programs in flight); a
  smaller power of two if D needs it; None below 16 (no kernel)."""
  blk = 64 if b * d > 16384 else 32
  while blk >= 16 and d % blk:
    blk //= 2
  return blk if blk >= 16 else None


# Time-chunked kernels for few lanes (B*D <= CHUNKED_MAX_LANES): 64 channels per program, the
# longest of CHUNK_LENGTHS that cuts T into >= 2 chunks, read in tiles of CHUNK_TILE rows.
CHUNKED_MAX_LANES, CHUNKED_BLOCK, CHUNK_LENGTHS, CHUNK_TILE = 8192, 64, (256, 128, 64), 16


def _chunked(t: int, chunk_t: int) -> bool:
  """Whether `chunk_t` selects the time-chunked kernels: it divides T into >= 2 chunks."""
  return chunk_t > 0 and t % chunk_t == 0 and t // chunk_t > 1


def kernel_for(b: int, t: int, d: int) -> dict | None:
  """Keyword arguments of `forward`/`backward` for a [b, t, d] recurrence (None: no kernel,
  D has no power-of-two block of >= 16 channels)."""
  chunk = next((n for n in CHUNK_LENGTHS if _chunked(t, n)), None)
  if b * d <= CHUNKED_MAX_LANES and d % CHUNKED_BLOCK == 0 and chunk:
    return {"block_d": CHUNKED_BLOCK, "chunk_t": chunk, "tile_t": CHUNK_TILE}
  bd = block_d_for(b, d)
  return None if bd is None else {"block_d": bd}


def walk(rows, t: int, tile: int, h):
  """`rows(t0, n, h)` over steps 0..t-1: in tiles of `tile` steps, then the rest singly."""
  n_tiles = t // tile
  h = jax.lax.fori_loop(0, n_tiles, lambda i, h: rows(i * tile, tile, h), h)
  return jax.lax.fori_loop(n_tiles * tile, t, lambda s, h: rows(s, 1, h), h)


def walk_back(rows, t: int, tile: int, c):
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

  hlast_ref[...] = walk(rows, t, tile, h0_ref[...].astype(F32))


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

  c = walk_back(rows, t, tile, dlast_ref[...].astype(F32))
  g = dh_ref[0, :].astype(F32) + c
  dx_ref[0, :] = g.astype(dx_ref.dtype)
  df_ref[0, :] = (g * h0_ref[...].astype(F32)).astype(df_ref.dtype)
  dh0_ref[...] = f_ref[0, :].astype(F32) * g


def seq_specs(t: int, bd: int):
  seq = pl.BlockSpec((pl.squeezed, t, bd), lambda b, j: (b, 0, j))
  vec = pl.BlockSpec((pl.squeezed, bd), lambda b, j: (b, j))
  return seq, vec


_STATIC = ("block_d", "tile_t", "num_warps", "chunk_t", "groups", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def forward(f_BxTxD, x_BxTxD, h0_BxD, *, block_d: int, tile_t: int = TILE_T,
            num_warps: int = NUM_WARPS, chunk_t: int = 0, groups: int = 1,
            interpret: bool = False):
  """Returns (h in x's dtype, last state float32). `block_d` must divide D.

  `chunk_t` > 0 (dividing T into >= 2 chunks) runs time chunks of that length in two
  launches (below), each chunk read in tiles of min(`tile_t`, `chunk_t`) rows, which must
  divide it; `groups` (dividing B) runs those two launches for that many groups of batch
  rows in turn."""
  b, t, d = x_BxTxD.shape
  if _chunked(t, chunk_t):
    return _chunked_call(
        _fwd_step, _fwd_chunk_kernel, (f_BxTxD, x_BxTxD), (f_BxTxD, x_BxTxD, h0_BxD),
        [jax.ShapeDtypeStruct((b, t, d), x_BxTxD.dtype), jax.ShapeDtypeStruct((b, d), F32)],
        b=b, t=t, d=d, block_d=block_d, chunk_t=chunk_t, tile_t=tile_t, num_warps=num_warps,
        groups=groups, interpret=interpret, name="mlgru_scan_fwd")
  seq, vec = seq_specs(t, block_d)
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
             groups: int = 1, interpret: bool = False):
  """Returns (df in f's dtype, dx in h's dtype, dh0 float32); arguments as `forward`."""
  b, t, d = h_BxTxD.shape
  if _chunked(t, chunk_t):
    return _chunked_call(
        _bwd_step, _bwd_chunk_kernel, (f_BxTxD, dh_BxTxD),
        (f_BxTxD, h_BxTxD, dh_BxTxD, h0_BxD, dlast_BxD),
        [jax.ShapeDtypeStruct((b, t, d), f_BxTxD.dtype),
         jax.ShapeDtypeStruct((b, t, d), h_BxTxD.dtype), jax.ShapeDtypeStruct((b, d), F32)],
        b=b, t=t, d=d, block_d=block_d, chunk_t=chunk_t, tile_t=tile_t, num_warps=num_warps,
        groups=groups, interpret=interpret, name="mlgru_scan_bwd")
  seq, vec = seq_specs(t, block_d)
  return pl.pallas_call(
      functools.partial(_bwd_kernel, t=t, tile=min(tile_t, max(t - 1, 1))),
      grid=(b, d // block_d), in_specs=[seq, seq, seq, vec, vec], out_specs=[seq, seq, vec],
      out_shape=[jax.ShapeDtypeStruct((b, t, d), f_BxTxD.dtype),
                 jax.ShapeDtypeStruct((b, t, d), h_BxTxD.dtype),
                 jax.ShapeDtypeStruct((b, d), F32)],
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="mlgru_scan_bwd",
  )(f_BxTxD, h_BxTxD, dh_BxTxD, h0_BxD, dlast_BxD)


# ---- Time-chunked kernels in two launches (small B*D) ---------------------------------------
#
# One program per (batch row, channel block, time chunk of `chunk_t` steps): B*D/block_d*T/
# chunk_t programs instead of B*D/block_d, each with a short dependent chain. The first launch
# reads each chunk once and writes its affine summary (state out = a * state in + s); the
# second composes the summaries of the chunk's predecessors (a few KB from L2) into the state
# entering it, reads the chunk again and writes the outputs. Each program walks its chunk in
# tiles of `tile_t` rows, issuing each tile's loads in the order its steps use them.
#
# The second read hits L2 only for what the first launch read last: at 8x2048x1024 the f and
# x it reads (64 MiB in bf16) exceed an H100's or H200's 50 MB L2. `groups` > 1 runs both
# launches per group of B/groups batch rows, so a group's second launch re-reads what its
# first just read (the outputs pass from group to group aliased, written in place), at the
# price of fewer programs per launch. `kernel_for` does not pick it: no benchmark row shows
# it faster (BENCHMARKS.md, "H100 recurrence", says how to time it).


def _place(p, *, n_chunks: int, n_blk: int, chunk: int, bd: int, row0: int):
  """Program p's (chunk c, batch row b, its row in this launch's summaries b - row0, channel
  slice cols, first step t0); consecutive programs take consecutive chunks of one lane."""
  lane, c = p // n_chunks, p % n_chunks
  r, blk = lane // n_blk, lane % n_blk
  return c, row0 + r, r, pl.ds(pl.multiple_of(blk * bd, bd), bd), c * chunk


def _tile_rows(refs, b, r0, n: int, cols, reverse: bool = False):
  """Rows r0 .. r0+n-1 (`reverse`: r0+n-1 .. r0) of each [B, T, D] ref, float32 [bd] vectors,
  loaded in list order."""
  ks = range(n - 1, -1, -1) if reverse else range(n)
  return [[r[b, r0 + k, cols].astype(F32) for k in ks] for r in refs]


def _carry_in(a_ref, s_ref, init, b, cols, preds):
  """`init` mapped through the summaries of chunks j in order, where preds = [(j, whether
  chunk j precedes this one)]: the loads of the others are masked off, so all are issued
  at once."""
  for j, is_pred in preds:
    m = jnp.full(init.shape, is_pred)
    a = pltriton.load(a_ref.at[b, jnp.int32(j), cols], mask=m, other=1.0)
    s = pltriton.load(s_ref.at[b, jnp.int32(j), cols], mask=m, other=0.0)
    init = a * init + s
  return init


def _summary_kernel(f_ref, v_ref, a_ref, s_ref, *, step, n_chunks: int, n_blk: int,
                    chunk: int, tile: int, bd: int, row0: int):
  """Writes the chunk's affine summary (a, s), its rows composed first to last by
  `step(a, s, f_t, v_t)` from the identity (1, 0)."""
  c, b, r, cols, t0 = _place(pl.program_id(0), n_chunks=n_chunks, n_blk=n_blk, chunk=chunk,
                             bd=bd, row0=row0)

  def rows(i, st):
    fs, vs = _tile_rows((f_ref, v_ref), b, t0 + i * tile, tile, cols)
    for fk, vk in zip(fs, vs):
      st = step(*st, fk, vk)
    return st

  a, s = jax.lax.fori_loop(0, chunk // tile, rows, (jnp.ones((bd,), F32), jnp.zeros((bd,), F32)))
  a_ref[r, c, cols] = a
  s_ref[r, c, cols] = s


def _fwd_step(a, s, f, x):
  """Forward: state -> f state + x; a chunk maps the state before it to the one after it."""
  s = f * s + x
  return a * f, s


def _fwd_chunk_kernel(f_ref, x_ref, h0_ref, a_ref, s_ref, h_ref, hlast_ref, *, n_chunks: int,
                      n_blk: int, chunk: int, tile: int, bd: int, row0: int):
  c, b, r, cols, t0 = _place(pl.program_id(0), n_chunks=n_chunks, n_blk=n_blk, chunk=chunk,
                             bd=bd, row0=row0)
  preds = [(j, j < c) for j in range(n_chunks - 1)]
  h = _carry_in(a_ref, s_ref, h0_ref[b, cols].astype(F32), r, cols, preds)

  def rows(i, h):
    r0 = t0 + i * tile
    fs, xs = _tile_rows((f_ref, x_ref), b, r0, tile, cols)
    for k, (fk, xk) in enumerate(zip(fs, xs)):
      h = fk * h + xk
      h_ref[b, r0 + k, cols] = h.astype(h_ref.dtype)
    return h

  h = jax.lax.fori_loop(0, chunk // tile, rows, h)

  @pl.when(c == n_chunks - 1)
  def _():
    hlast_ref[b, cols] = h


# The backward runs right to left: the carry (= f_{s+1} g_{s+1}) maps to f_s (dh_s + carry) at
# each step s, so a chunk's summary maps the carry at its last row to the one at its first,
# composed left to right as (a, s) <- (a f_s, s + a f_s dh_s) (`_bwd_step`); composed right
# to left, as the steps run, the summary launch was several times slower (BENCHMARKS.md,
# "H100 recurrence").


def _bwd_step(a, s, f, dh):
  a = a * f
  return a, s + a * dh


def _bwd_chunk_kernel(f_ref, h_ref, dh_ref, h0_ref, dlast_ref, a_ref, s_ref, df_ref, dx_ref,
                      dh0_ref, *, n_chunks: int, n_blk: int, chunk: int, tile: int, bd: int,
                      row0: int):
  c, b, r, cols, t0 = _place(pl.program_id(0), n_chunks=n_chunks, n_blk=n_blk, chunk=chunk,
                             bd=bd, row0=row0)
  succs = [(j, j > c) for j in range(n_chunks - 1, 0, -1)]
  carry = _carry_in(a_ref, s_ref, dlast_ref[b, cols].astype(F32), r, cols, succs)
  h0 = h0_ref[b, cols].astype(F32)
  n_tiles = chunk // tile

  def rows(i, carry):
    r0 = t0 + (n_tiles - 1 - i) * tile
    fs, dhs = _tile_rows((f_ref, dh_ref), b, r0, tile, cols, True)
    # h at the row before each (rows r0+tile-2 .. r0-1; h0 before the sequence's first).
    hps = _tile_rows((h_ref,), b, r0, tile - 1, cols, True)[0]
    hps.append(jnp.where(r0 == 0, h0, h_ref[b, jnp.maximum(r0 - 1, 0), cols].astype(F32)))
    for k, (fk, dk, hp) in enumerate(zip(fs, dhs, hps)):
      g = dk + carry
      dx_ref[b, r0 + tile - 1 - k, cols] = g.astype(dx_ref.dtype)
      df_ref[b, r0 + tile - 1 - k, cols] = (g * hp).astype(df_ref.dtype)
      carry = fk * g
    return carry

  carry = jax.lax.fori_loop(0, n_tiles, rows, carry)

  @pl.when(c == 0)
  def _():
    dh0_ref[b, cols] = carry


def _chunked_call(step, chunk_kernel, summary_args, args, outs, *, b: int, t: int, d: int,
                  block_d: int, chunk_t: int, tile_t: int, num_warps: int, groups: int,
                  interpret: bool, name: str):
  """For each of `groups` groups of batch rows in turn: the summary launch
  (`_summary_kernel` with `step`) on `summary_args`, then `chunk_kernel` on `args` + the
  summaries, writing that group's rows of `outs` in place (the buffers pass from one group's
  launch to the next aliased), so a group's second reads find its first ones in L2."""
  n_chunks, n_blk = t // chunk_t, d // block_d
  tile = min(tile_t, chunk_t)
  if chunk_t % tile:
    raise ValueError(f"tile_t={tile_t} must divide chunk_t={chunk_t} (rows per load tile of "
                     "a time chunk)")
  if groups < 1 or b % groups:
    raise ValueError(f"groups={groups} must divide the batch ({b} rows): pass a divisor of B")
  rows = b // groups
  kw = dict(n_chunks=n_chunks, n_blk=n_blk, chunk=chunk_t, tile=tile, bd=block_d)
  call = lambda kernel, out_shape, suffix, row0, aliases=None: pl.pallas_call(
      functools.partial(kernel, row0=row0, **kw), grid=(rows * n_blk * n_chunks,),
      out_shape=out_shape, input_output_aliases=aliases or {},
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name=f"{name}_{suffix}")
  n_in, res = len(args) + 2, None
  for g in range(groups):
    summary = call(functools.partial(_summary_kernel, step=step),
                   [jax.ShapeDtypeStruct((rows, n_chunks, d), F32)] * 2, "summary",
                   g * rows)(*summary_args)
    if res is None:
      res = call(chunk_kernel, outs, "chunks", g * rows)(*args, *summary)
    else:  # the previous groups' outputs come in aliased to the outputs; the kernel skips them
      skip = lambda *refs, **k: chunk_kernel(*refs[:n_in], *refs[n_in + len(outs):], **k)
      res = call(skip, outs, "chunks", g * rows, {n_in + i: i for i in range(len(outs))})(
          *args, *summary, *res)
  return res
