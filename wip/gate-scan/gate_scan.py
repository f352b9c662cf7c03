"""PROTOTYPE (next session): the MLGRU gate math fused into the whole-sequence recurrence
kernels. Forward reads the bf16 f and i projections (+ per-channel lower bound lb) and
writes h; backward reads fp, ip, h, dh and writes d fp, d ip (bf16) and per-program d lb
partial sums, so f (float32), x and df never cross HBM. Same math as MLGRU:
  f = lb + (1 - lb) sigmoid(fp);  x = bf16(silu(ip) (1 - f));  h_t = f_t h_{t-1} + x_t.
resets [B, T] (document starts: f := 0 in the recurrence, not in x) optional;
whole-sequence kernels only (B*D > 8192 shapes)."""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

F32 = jnp.float32


def _gates(fp, ip, lb):
  sig = 1.0 / (1.0 + jnp.exp(-fp))
  f = lb + (1.0 - lb) * sig
  si = 1.0 / (1.0 + jnp.exp(-ip))
  return f, sig, ip * si, si


def _reset(f, r_ref, s):
  """f, or 0 where step s starts a document (r_ref None: no resets)."""
  return f if r_ref is None else jnp.where(r_ref[s] != 0, 0.0, f)


def _fwd_kernel(*refs, t, tile, resets):
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

  n_tiles = t // tile
  h = jax.lax.fori_loop(0, n_tiles, lambda i, h: rows(i * tile, tile, h), h0_ref[...].astype(F32))
  h = jax.lax.fori_loop(n_tiles * tile, t, lambda s, h: rows(s, 1, h), h)
  hlast_ref[...] = h


def _bwd_kernel(*refs, t, tile, resets):
  fp_ref, ip_ref, h_ref, dh_ref, lb_ref, h0_ref, dlast_ref = refs[:7]
  r_ref = refs[7] if resets else None
  dfp_ref, dip_ref, dlb_ref, dh0_ref = refs[7 + resets:]
  lb = lb_ref[...].astype(F32)

  def step(s, fp, ip, dh, h_prev, c, dlb):
    f, sig, silu_i, si = _gates(fp, ip, lb)
    g = dh + c
    dx = g.astype(dh_ref.dtype).astype(F32)          # the scan's dx is rounded to h's dtype
    df = _reset(g * h_prev, r_ref, s) - dx * silu_i    # recurrence term + x's (1 - f) term
    dlb = dlb + df * (1.0 - sig)
    dfp_ref[s, :] = (df * (1.0 - lb) * sig * (1.0 - sig)).astype(dfp_ref.dtype)
    dip_ref[s, :] = (dx * (1.0 - f) * si * (1.0 + ip * (1.0 - si))).astype(dip_ref.dtype)
    return _reset(f, r_ref, s) * g, dlb

  def rows(top, n, carry):  # rows top, ..., top - n + 1 (all >= 1)
    c, dlb = carry
    fps = [fp_ref[top - k, :].astype(F32) for k in range(n)]
    ips = [ip_ref[top - k, :].astype(F32) for k in range(n)]
    dhs = [dh_ref[top - k, :].astype(F32) for k in range(n)]
    hps = [h_ref[top - k - 1, :].astype(F32) for k in range(n)]
    for k in range(n):
      c, dlb = step(top - k, fps[k], ips[k], dhs[k], hps[k], c, dlb)
    return c, dlb

  n_tiles = (t - 1) // tile
  carry = (dlast_ref[...].astype(F32), jnp.zeros(lb.shape, F32))
  carry = jax.lax.fori_loop(0, n_tiles, lambda i, cr: rows(t - 1 - i * tile, tile, cr), carry)
  rest = t - 1 - n_tiles * tile
  carry = jax.lax.fori_loop(0, rest, lambda i, cr: rows(rest - i, 1, cr), carry)
  c, dlb = step(0, fp_ref[0, :].astype(F32), ip_ref[0, :].astype(F32), dh_ref[0, :].astype(F32),
                h0_ref[...].astype(F32), *carry)
  dlb_ref[...] = dlb
  dh0_ref[...] = c


def _specs(t, bd):
  seq = pl.BlockSpec((pl.squeezed, t, bd), lambda b, j: (b, 0, j))
  vec = pl.BlockSpec((pl.squeezed, bd), lambda b, j: (b, j))
  chan = pl.BlockSpec((bd,), lambda b, j: (j,))
  row = pl.BlockSpec((pl.squeezed, t), lambda b, j: (b, 0))
  return seq, vec, chan, row


@functools.partial(jax.jit, static_argnames=("block_d", "tile_t", "num_warps", "interpret"))
def forward(fp, ip, lb, h0, resets=None, *, block_d=64, tile_t=64, num_warps=1,
            interpret=False):
  b, t, d = fp.shape
  seq, vec, chan, row = _specs(t, block_d)
  r = () if resets is None else (resets.astype(jnp.int32),)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, t=t, tile=min(tile_t, t), resets=len(r)),
      grid=(b, d // block_d), in_specs=[seq, seq, chan, vec] + [row] * len(r),
      out_specs=[seq, vec],
      out_shape=[jax.ShapeDtypeStruct((b, t, d), fp.dtype), jax.ShapeDtypeStruct((b, d), F32)],
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="mlgru_gate_scan_fwd")(fp, ip, lb, h0, *r)


@functools.partial(jax.jit, static_argnames=("block_d", "tile_t", "num_warps", "interpret"))
def backward(fp, ip, h, dh, lb, h0, dlast, resets=None, *, block_d=64, tile_t=64, num_warps=1,
             interpret=False):
  b, t, d = fp.shape
  seq, vec, chan, row = _specs(t, block_d)
  r = () if resets is None else (resets.astype(jnp.int32),)
  dfp, dip, dlb, dh0 = pl.pallas_call(
      functools.partial(_bwd_kernel, t=t, tile=min(tile_t, max(t - 1, 1)), resets=len(r)),
      grid=(b, d // block_d), in_specs=[seq, seq, seq, seq, chan, vec, vec] + [row] * len(r),
      out_specs=[seq, seq, vec, vec],
      out_shape=[jax.ShapeDtypeStruct((b, t, d), fp.dtype), jax.ShapeDtypeStruct((b, t, d), ip.dtype),
                 jax.ShapeDtypeStruct((b, d), F32), jax.ShapeDtypeStruct((b, d), F32)],
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="mlgru_gate_scan_bwd")(fp, ip, h, dh, lb, h0, dlast, *r)
  return dfp, dip, dlb.sum(0), dh0


def make(interpret=False, **kw):
  """custom_vjp (fp, ip, lb, h0) -> (h, h_last) on the kernels."""
  from jax.ad_checkpoint import checkpoint_name

  @jax.custom_vjp
  def gate_scan(fp, ip, lb, h0, resets=None):
    return forward(fp, ip, lb, h0, resets, interpret=interpret, **kw)

  def fwd(fp, ip, lb, h0, resets=None):
    h, hl = forward(fp, ip, lb, h0, resets, interpret=interpret, **kw)
    h = checkpoint_name(h, "recurrence_h")  # lean remat keeps it, as linear_recurrence's
    return (h, hl), (fp, ip, h, lb, h0, resets)

  def bwd(res, cot):
    fp, ip, h, lb, h0, resets = res
    dh, dlast = cot
    grads = backward(fp, ip, h, dh.astype(h.dtype), lb, h0, dlast, resets,
                     interpret=interpret, **kw)
    return (*grads, None)

  gate_scan.defvjp(fwd, bwd)
  return gate_scan


def reference(fp, ip, lb, h0, resets=None):
  """MLGRU's composition (mmfree_jax.layers.mlgru) on the XLA recurrence."""
  from mmfree_jax.layers.scan import linear_recurrence
  f = lb + (1.0 - lb) * jax.nn.sigmoid(fp.astype(F32))
  x = (jax.nn.silu(ip.astype(F32)) * (1.0 - f)).astype(fp.dtype)
  return linear_recurrence(f, x, h0, resets, "associative")
