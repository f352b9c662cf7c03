"""Pallas (Triton backend) kernels for the elementwise work around BitLinear matmuls,
used by `layers.bitlinear` on CUDA GPUs (the same math in XLA elsewhere);
`interpret=True` runs them on any backend for tests."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# A BitLinear group is n ternary projections of ONE input row x (the MLGRU's f/i/g
# projections share theirs; most BitLinears are a group of one), each with its own input
# RMSNorm weight. The input comes in one of three forms:
# - "x": an array x [M, K];
# - "glu": the GLU's gate/up projection as (p [M, 2K], r [M, 1]): its unscaled product and
#   per-row scale, from which the kernels form gate | up = p * r rounded to `x_dtype` and
#   the input `silu(gate) * up` (rounded to `x_dtype`) in registers, so the GLU's down
#   projection never materializes the scaled halves or their product;
# - "gate": the MLGRU's output gate as (g [M, K], h [M, K], gw [1, K]): the input
#   `RMSNorm(g) * gw * silu(h)` (rounded to `x_dtype`) is formed in registers, so o_proj
#   reads g and h and the gated output is never written (nor its gradient: the backward
#   writes dg and dh).
#
# - `activation_codes`: one program per tile of rows reads the input once and writes each
#   projection's int8 activation codes and per-token scale (RMSNorm, norm weight, absmax,
#   round-half-away all in registers). XLA needs three fusions per projection, with a
#   float32 copy of the normalized row written and read back twice.
# - `backward`: one program per block of rows reads the input and the n matmul cotangents
#   dy_j = d(out_j) @ W_j^T once and writes the input's gradient (RMSNorm backward summed
#   over the group; with "glu" the gradient of gate | up as one [M, 2K] array), the
#   fake-quantized activations q_j / s_j that the weight-gradient matmuls need, and
#   per-block partial sums of the norm-weight gradients (reduced over blocks by XLA: a
#   deterministic order; with "gate", also those of the g-norm weight's gradient). It walks
#   its block a few rows at a time, loading the next rows
#   while it computes the current ones, with the three row reductions independent of each
#   other (computed on x, then scaled by the row's rstd).
#
# Both work on a row as column pieces of power-of-two widths (`_pieces`; 5632 = 4096 + 1024
# + 512) rather than one tile padded to the next power of two (8192 for 5632, where 31% of
# the lanes would carry nothing but registers and arithmetic).
#
# Results agree with the XLA path up to float32 summation order and association in the
# row reductions (an activation within an ulp of a rounding boundary can land on the
# neighbouring code).

F32 = jnp.float32
BLOCK_M = 32  # rows per backward program (its norm-weight partial sums are one row each)


def block_rows(m: int) -> int:
  """Rows per backward program: the largest power of two <= BLOCK_M dividing m."""
  return m & -m if m & -m < BLOCK_M else BLOCK_M


def warps_for(k: int, n: int = 1) -> int:
  """Warps per backward program for rows of K and n projections: 4, or more to keep
  <= 24 / n columns per thread (each projection adds a cotangent and its reductions per
  column): the fastest in the sweeps over K = 1024 to 5632 and n = 1 or 3 (BENCHMARKS.md,
  "H200 BitLinear kernels"). The output gate's g-norm partial sums count for nothing: more
  warps made that backward slower."""
  warps = 4
  while k > 24 // n * 32 * warps:
    warps *= 2
  return warps


@dataclasses.dataclass(frozen=True)
class Form:
  """The arrays of an input form (the module docstring's three): `rows` per-row arrays
  (x; p, r; g, h), then `replicated` ones (the gate's g-norm weight); `mk_arrays`: how
  many [M, K] arrays the rows amount to (the GLU's p is [M, 2K]; its r is negligible);
  `grads`: input-gradient arrays the backward writes; `extra_parts`: its partial sums
  beyond the n projections'."""

  rows: int
  replicated: int
  mk_arrays: int
  grads: int
  extra_parts: int


FORMS = {"x": Form(1, 0, 1, 1, 0), "glu": Form(2, 0, 2, 1, 0), "gate": Form(2, 1, 2, 2, 1)}


def form_of(form: str) -> Form:
  """The `Form` named `form`; an unknown name is an error listing the known ones."""
  if form not in FORMS:
    raise ValueError(f"input form {form!r} is unknown; use one of {tuple(FORMS)}")
  return FORMS[form]


def split_input(xs, form: str) -> tuple[tuple, tuple]:
  """(per-row arrays, replicated arrays) of a form's input, as the XLA path takes them."""
  rows = form_of(form).rows
  return tuple(xs[:rows]), tuple(xs[rows:])


def _silu_parts(a):
  sig = 1.0 / (1.0 + jnp.exp(-a))
  return a * sig, sig


# Most column pieces per row (`_pieces`): the prologue takes K's powers of two as they
# are; the backward, which holds more of each row in registers, at most two (a third
# piece's reductions cost more than the padding it saves: BENCHMARKS.md, "History", 748ac11).
CODES_PIECES, BWD_PIECES = 8, 2


def _pieces(k: int, most: int) -> tuple[tuple[int, int], ...]:
  """(offset, width) column pieces of a row of K: the powers of two in K rounded up to a
  multiple of 16 (5632 = 4096 + 1024 + 512), so no lane of a tile is padding except past
  K in the last piece (masked); past `most` pieces the rest is one piece of the next
  power of two (most = 1: one tile of K padded to a power of two)."""
  kr = -(-k // 16) * 16
  widths = [1 << i for i in range(kr.bit_length() - 1, 3, -1) if kr >> i & 1]
  if len(widths) > most:
    widths = widths[:most - 1] + [pl.next_power_of_2(sum(widths[most - 1:]))]
  offsets = [sum(widths[:i]) for i in range(len(widths))]
  return tuple(zip(offsets, widths))


def _mask(off: int, w: int, k: int, rows: int | None = None):
  """None for a piece inside K, else its mask of columns < K ([w], or [rows, w])."""
  if off + w <= k:
    return None
  cols = off + jnp.arange(w) < k
  return cols if rows is None else jnp.broadcast_to(cols, (rows, w))


def _load(ref, r0, rows: int, off: int, w: int, k: int, c0: int = 0):
  """Rows r0 .. r0 + rows, columns c0 + off .. c0 + off + w of ref (zero at columns >= K)."""
  mask = _mask(off, w, k, rows)
  return pltriton.load(ref.at[pl.ds(r0, rows), pl.ds(c0 + off, w)], mask=mask,
                       other=None if mask is None else 0.0)


def _store(ref, r0, rows: int, off: int, w: int, k: int, v, c0: int = 0):
  pltriton.store(ref.at[pl.ds(r0, rows), pl.ds(c0 + off, w)], v.astype(ref.dtype),
                 mask=_mask(off, w, k, rows))


def _vector(ref, j: int, off: int, w: int, k: int):
  """Columns off .. off + w of row j of a [n, K] ref (zero at columns >= K)."""
  mask = _mask(off, w, k)
  return pltriton.load(ref.at[j, off + jnp.arange(w)], mask=mask,
                       other=None if mask is None else 0.0)


def _load_input(x_refs, r0, rows: int, k: int, pieces, form: str):
  """Rows r0 .. r0 + rows of the input as loaded, one [rows, width] tile per piece
  (`_pieces`): (x tiles,); the GLU's (r [rows], (gate tile, up tile) of p per piece); or
  the gate's (g tiles, h tiles, gw pieces)."""
  if form == "x":
    return ([_load(x_refs[0], r0, rows, off, w, k) for off, w in pieces],)
  if form == "glu":
    p_ref, r_ref = x_refs
    return (pltriton.load(r_ref.at[pl.ds(r0, rows)]),
            [tuple(_load(p_ref, r0, rows, off, w, k, c0) for c0 in (0, k)) for off, w in pieces])
  g_ref, h_ref, gw_ref = x_refs
  return ([_load(g_ref, r0, rows, off, w, k) for off, w in pieces],
          [_load(h_ref, r0, rows, off, w, k) for off, w in pieces],
          [_vector(gw_ref, 0, off, w, k) for off, w in pieces])


def _form_input(loaded, form: str, x_dtype, k: int, in_eps: float):
  """The input in float32 from `_load_input`'s tiles, and what the backward needs to
  take its gradient back to the form's arrays: x (nothing); silu(gate) * up rounded to
  x_dtype where gate | up = p * r rounded to x_dtype (each piece's (gate, up,
  silu(gate), sigmoid(gate))); or RMSNorm(g) * gw * silu(h) rounded to x_dtype (the
  row's g rstd and each piece's (ghat, gw, h, silu(h), sigmoid(h)))."""
  if form == "x":
    return [x.astype(F32) for x in loaded[0]], None
  xs, parts = [], []
  if form == "glu":
    r, halves = loaded
    for pa, pb in halves:
      a, b = ((h.astype(F32) * r[:, None]).astype(x_dtype).astype(F32) for h in (pa, pb))
      silu, sig = _silu_parts(a)
      xs.append((silu * b).astype(x_dtype).astype(F32))
      parts.append((a, b, silu, sig))
    return xs, parts
  gs, hs, gws = loaded
  gs = [g.astype(F32) for g in gs]
  g_rstd = jax.lax.rsqrt(_row_sum([g * g for g in gs]) / k + in_eps)
  for g, h, gw in zip(gs, hs, gws):
    ghat, h = g * g_rstd, h.astype(F32)
    silu, sig = _silu_parts(h)
    xs.append((ghat * gw * silu).astype(x_dtype).astype(F32))
    parts.append((ghat, gw, h, silu, sig))
  return xs, (g_rstd, parts)


def _row_sum(tiles):
  return sum(jnp.sum(t, axis=-1, keepdims=True) for t in tiles)


def _row_max(tiles):
  return functools.reduce(jnp.maximum, [jnp.max(t, axis=-1, keepdims=True) for t in tiles])


def _width(xs, form: str) -> tuple[int, int]:
  """(K, K padded to a power of two) of the input x [M, K] (g for the gate), or the GLU's
  p [M, 2K]."""
  k = xs[0].shape[1] // (2 if form == "glu" else 1)
  return k, pl.next_power_of_2(k)


def _x_specs(rows: int, kp: int, form: str) -> list:
  """BlockSpecs of the input for `rows`-row blocks: x; the GLU's p (a block spans both
  halves) and r (passed as [M] by `_x_args`); or the gate's g, h and (whole) gw."""
  block = pl.BlockSpec((rows, kp), lambda i: (i, 0))
  if form == "x":
    return [block]
  if form == "glu":
    return [pl.BlockSpec((rows, 2 * kp), lambda i: (i, 0)), pl.BlockSpec((rows,), lambda i: (i,))]
  return [block, block, pl.BlockSpec((1, kp), lambda i: (0, 0))]


def _x_args(xs, form: str) -> tuple:
  return (xs[0], xs[1][:, 0]) if form == "glu" else tuple(xs)


def _quantize(ys, amax=None):
  """Per-row int8 codes of the tiles ys (one row's pieces) and the row scale (from the
  row's max |y|, `amax` if given)."""
  if amax is None:
    amax = _row_max([jnp.abs(y) for y in ys])
  s = 127.0 / jnp.maximum(amax, 1e-5)
  codes = []
  for y in ys:
    z = y * s
    r = jnp.floor(jnp.abs(z) + 0.5)
    codes.append(jnp.clip(jnp.where(z < 0, -r, r), -128.0, 127.0))
  return codes, s


def _n_inputs(form: str) -> int:
  """How many arrays a form's input is."""
  f = form_of(form)
  return f.rows + f.replicated


def _fwd_kernel(*refs, n: int, k: int, eps: float, form: str, x_dtype, in_eps: float):
  nx = _n_inputs(form)
  x_refs, (w_ref,), outs = refs[:nx], refs[nx:nx + 1], refs[nx + 1:]
  q_refs, s_refs = outs[:n], outs[n:]
  rows = q_refs[0].shape[0]
  pieces = _pieces(k, CODES_PIECES)
  xs, _ = _form_input(_load_input(x_refs, 0, rows, k, pieces, form), form, x_dtype, k, in_eps)
  rstd = jax.lax.rsqrt(_row_sum([x * x for x in xs]) / k + eps)
  xhats = [x * rstd for x in xs]
  for j in range(n):
    qs, s = _quantize([xh * _vector(w_ref, j, off, w, k) for xh, (off, w) in zip(xhats, pieces)])
    for q, (off, w) in zip(qs, pieces):
      _store(q_refs[j], 0, rows, off, w, k, q)
    s_refs[j][...] = s[:, 0]


def codes_tile(kp: int, n: int, form: str = "x") -> tuple[int, int]:
  """(rows per program, warps) of the prologue kernel for a padded row width kp, n
  projections and an input form: the sweeps' best (BENCHMARKS.md, "H200 BitLinear
  kernels"), one row and 4 warps except at kp = 2048, where 2 rows (f/i/g) or 4 rows (one
  projection) per program are faster; the gate's two input rows (g, h) per row take half
  as many rows (the same input bytes per program)."""
  if kp != 2048:
    return 1, 4
  rows = 2 if n > 1 else 4
  return (rows // 2 if form == "gate" else rows), 4


@functools.partial(jax.jit, static_argnames=("eps", "out_dtype", "form", "x_dtype", "rows",
                                             "num_warps", "interpret", "in_eps"))
def activation_codes(xs, norm_w_NxK: jax.Array, eps: float, out_dtype=jnp.bfloat16,
                     form: str = "x", x_dtype=jnp.bfloat16, rows: int = 0, num_warps: int = 0,
                     interpret: bool = False, in_eps: float = 1e-6):
  """Codes of each projection's normalized input row.

  Args:
    xs: the input in its form: (x [M, K],); "glu": (p [M, 2K], r [M, 1]), the input is
      `silu(gate) * up` with gate | up = p * r, each rounded to x_dtype; "gate": (g [M, K],
      h [M, K], gw [1, K]), the input is `RMSNorm(g) * gw * silu(h)` rounded to x_dtype,
      the RMSNorm's epsilon `in_eps`.
    norm_w_NxK: the n input-RMSNorm weights.
    rows, num_warps: rows per program (a [rows, K] tile; a power of two, capped by the
      largest one dividing M) and warps per program; 0 = `codes_tile`.

  Returns:
    (codes: n arrays [M, K] in out_dtype, scales: n arrays [M, 1] float32) with
    codes_j = clip(round_half_away(xhat * w_j * s_j)), s_j = 127 / max|xhat * w_j|.
  """
  n = norm_w_NxK.shape[0]
  m = xs[0].shape[0]
  assert len(xs) == _n_inputs(form), (form, len(xs))
  k, kp = _width(xs, form)
  tile_rows, tile_warps = codes_tile(kp, n, form)
  rows = min(rows or tile_rows, m & -m)
  outs = pl.pallas_call(
      functools.partial(_fwd_kernel, n=n, k=k, eps=eps, form=form, x_dtype=x_dtype,
                        in_eps=in_eps),
      grid=(m // rows,),
      in_specs=_x_specs(rows, kp, form) + [pl.BlockSpec((n, kp), lambda i: (0, 0))],
      out_specs=([pl.BlockSpec((rows, kp), lambda i: (i, 0))] * n
                 + [pl.BlockSpec((rows,), lambda i: (i,))] * n),
      out_shape=([jax.ShapeDtypeStruct((m, k), out_dtype)] * n
                 + [jax.ShapeDtypeStruct((m,), F32)] * n),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps or tile_warps, num_stages=1),
      interpret=interpret, name="bitlinear_act_codes",
  )(*_x_args(xs, form), norm_w_NxK)
  return list(outs[:n]), [s[:, None] for s in outs[n:]]


def _store_input_grad(dx_refs, r0, rows: int, k: int, pieces, form: str, x_dtype, dxs,
                      formed) -> list:
  """Stores the gradient of the form's arrays, from the input's gradient dxs (float32 tiles
  per piece) and `_form_input`'s parts (`formed`); returns the rows' terms of the form's
  own weight gradient (the gate's: d(gw) = dgn * ghat per piece), or none. The formed
  input was rounded to x_dtype, so its gradient is too (as the XLA path's is)."""
  if form == "x":
    for dx, (off, w) in zip(dxs, pieces):
      _store(dx_refs[0], r0, rows, off, w, k, dx)
    return []
  dzs = [dx.astype(x_dtype).astype(F32) for dx in dxs]
  if form == "glu":
    for dz, (a, b, silu, sig), (off, w) in zip(dzs, formed, pieces):
      _store(dx_refs[0], r0, rows, off, w, k, dz * b * sig * (1.0 + a * (1.0 - sig)))
      _store(dx_refs[0], r0, rows, off, w, k, dz * silu, k)
    return []
  g_rstd, parts = formed
  dgns = [dz * silu for dz, (_, _, _, silu, _) in zip(dzs, parts)]
  dghats = [dgn * gw for dgn, (_, gw, _, _, _) in zip(dgns, parts)]
  mean = _row_sum([dgh * ghat for dgh, (ghat, *_) in zip(dghats, parts)]) / k
  for dz, dgh, (ghat, gw, h, _, sig), (off, w) in zip(dzs, dghats, parts, pieces):
    _store(dx_refs[0], r0, rows, off, w, k, g_rstd * (dgh - ghat * mean))
    _store(dx_refs[1], r0, rows, off, w, k, dz * (ghat * gw) * (sig * (1.0 + h * (1.0 - sig))))
  return [[dgn * ghat for dgn, (ghat, *_) in zip(dgns, parts)]]


def _bwd_kernel(*refs, n: int, k: int, eps: float, form: str, x_dtype, bm: int, rows: int,
                in_eps: float):
  nx, nd = _n_inputs(form), form_of(form).grads
  x_refs, dy_refs, (w_ref, wg_ref) = refs[:nx], refs[nx:nx + n], refs[nx + n:nx + n + 2]
  rest = refs[nx + n + 2:]
  dx_refs, yq_refs, part_refs = rest[:nd], rest[nd:nd + n], rest[nd + n:]
  pieces = _pieces(k, BWD_PIECES)
  ws = [[_vector(w_ref, j, off, w, k) for off, w in pieces] for j in range(n)]
  wgs = [[_vector(wg_ref, j, off, w, k) for off, w in pieces] for j in range(n)]
  steps = bm // rows

  def load(i):  # step i's input and cotangent tiles, as loaded
    r0 = i * rows
    return (_load_input(x_refs, r0, rows, k, pieces, form),
            [[_load(ref, r0, rows, off, w, k) for off, w in pieces] for ref in dy_refs])

  def body(i, carry):  # `rows` rows at a time: [rows, width] tiles, per-row reductions
    parts, loaded = carry
    nxt = load(jnp.minimum(i + 1, steps - 1))  # in flight while this step computes
    r0 = i * rows
    xs, formed = _form_input(loaded[0], form, x_dtype, k, in_eps)
    dys = [[t.astype(F32) for t in dy] for dy in loaded[1]]
    dxhats = [sum(dy[p] * wg[p] for dy, wg in zip(dys, wgs)) for p in range(len(pieces))]
    # The row reductions depend only on the loads, not on each other: with xhat = x * rstd,
    # sum(dxhat * xhat) = rstd * sum(dxhat * x) and max|xhat * w| = rstd * max|x * w|.
    rstd = jax.lax.rsqrt(_row_sum([x * x for x in xs]) / k + eps)
    mean = rstd * _row_sum([d * x for d, x in zip(dxhats, xs)]) / k
    amaxes = [rstd * _row_max([jnp.abs(x * wj) for x, wj in zip(xs, ws[j])]) for j in range(n)]
    xhats = [x * rstd for x in xs]
    for j in range(n):
      qs, s = _quantize([xh * wj for xh, wj in zip(xhats, ws[j])], amaxes[j])
      for q, (off, w) in zip(qs, pieces):
        _store(yq_refs[j], r0, rows, off, w, k, q / s)
    dxs = [rstd * (dxh - xh * mean) for dxh, xh in zip(dxhats, xhats)]
    terms = [[dy[p] * xhats[p] for p in range(len(pieces))] for dy in dys]
    terms += _store_input_grad(dx_refs, r0, rows, k, pieces, form, x_dtype, dxs, formed)
    parts = tuple(tuple(acc + jnp.sum(t, axis=0) for acc, t in zip(part, ts))
                  for part, ts in zip(parts, terms))
    return parts, nxt

  zeros = tuple(tuple(jnp.zeros((w,), F32) for _, w in pieces) for _ in part_refs)
  parts, _ = jax.lax.fori_loop(0, steps, body, (zeros, load(0)))
  for ref, part in zip(part_refs, parts):
    for acc, (off, w) in zip(part, pieces):
      pltriton.store(ref.at[off + jnp.arange(w)], acc, mask=_mask(off, w, k))


@functools.partial(jax.jit, static_argnames=("eps", "form", "x_dtype", "rows", "num_warps",
                                             "interpret", "in_eps"))
def backward(xs, dys, norm_w_NxK: jax.Array, wg_NxK: jax.Array, eps: float, form: str = "x",
             x_dtype=jnp.bfloat16, rows: int = 1, num_warps: int = 0, interpret: bool = False,
             in_eps: float = 1e-6):
  """The group's backward prologue.

  Args:
    xs: the forward inputs in their form (`activation_codes`).
    dys: n cotangents [M, K] of the normalized, quantized inputs (the transposed matmuls'
      outputs, before the weight scale).
    norm_w_NxK: the norm weights w_j; wg_NxK: w_j times each weight scale g_j.
    rows: rows per loop step (a [rows, K] tile); num_warps: per program (0 = `warps_for`).
      One row and `warps_for` were the fastest in the sweep (BENCHMARKS.md, "H200 BitLinear
      kernels").

  Returns:
    (the input's gradients: [x's, in its dtype], with "glu" [that of gate | up, [M, 2K] in
    p's dtype], with "gate" [g's, h's]; yq: n arrays [M, K] in dys' dtype, the
    fake-quantized activations; partial sums over each block of `block_rows(M)` rows, as
    [M / block_rows(M), K] float32 arrays: of dy_j * xhat for each projection, then with
    "gate" of the g-norm weight's gradient).
  """
  n = norm_w_NxK.shape[0]
  m = xs[0].shape[0]
  bm = block_rows(m)
  rows = min(rows, bm)
  assert len(xs) == _n_inputs(form), (form, len(xs))
  k, kp = _width(xs, form)
  f = form_of(form)
  nd, extra = f.grads, f.extra_parts
  x_specs = _x_specs(bm, kp, form)
  block = pl.BlockSpec((bm, kp), lambda i: (i, 0))
  part = pl.BlockSpec((pl.squeezed, kp), lambda i: (i, 0))
  full = pl.BlockSpec((n, kp), lambda i: (0, 0))
  outs = pl.pallas_call(
      functools.partial(_bwd_kernel, n=n, k=k, eps=eps, form=form, x_dtype=x_dtype, bm=bm,
                        rows=rows, in_eps=in_eps),
      grid=(m // bm,), in_specs=x_specs + [block] * n + [full, full],
      out_specs=x_specs[:nd] + [block] * n + [part] * (n + extra),
      out_shape=([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs[:nd]]
                 + [jax.ShapeDtypeStruct((m, k), dys[0].dtype)] * n
                 + [jax.ShapeDtypeStruct((m // bm, k), F32)] * (n + extra)),
      compiler_params=pltriton.CompilerParams(num_warps=num_warps or warps_for(k, n),
                                              num_stages=1),
      interpret=interpret, name="bitlinear_bwd",
  )(*_x_args(xs, form), *dys, norm_w_NxK, wg_NxK)
  return list(outs[:nd]), list(outs[nd:nd + n]), list(outs[nd + n:])
