"""MLGRU token mixer (SPEC §1.2): ternary projections around an elementwise recurrence, and
that recurrence from the projections with the gates fused in (`mlgru_recurrence`); the
gates' math is `gates.py`."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mmfree_jax import sharding
from mmfree_jax.config import ModelConfig
from mmfree_jax.layers import mlgru_pallas, scan, scan_pallas
from mmfree_jax.layers.bitlinear import (BitLinear, BitLinearWeights, bitlinear_shared,
                                         gated_bitlinear, xavier_uniform)
from mmfree_jax.layers.gates import mlgru_gates
from mmfree_jax.layers.norm import RMSNormScale

F32 = jnp.float32


def lower_bounds(gamma_LxD: jax.Array) -> jax.Array:
  """`cumsum(softmax(Gamma, 0), 0) - P[0]`: zero for layer 0, rising with depth."""
  p = jax.nn.softmax(gamma_LxD.astype(F32), axis=0)
  return jnp.cumsum(p, axis=0) - p[0]


def _masked(v, *resets):
  """v, zero where a document starts (`resets`: () or (resets_BxT,))."""
  return jnp.where(resets[0][..., None], jnp.zeros((), v.dtype), v) if resets else v


def _gate_two_steps_forward(recurrence, fp, ip, lb, h0, *resets):
  """`mlgru_gates`, then `recurrence(f, x, h0)` -> (h, last)."""
  f, x = mlgru_gates(fp, ip, lb, fp.dtype)
  return recurrence(_masked(f, *resets), x, h0)


def _gate_two_steps_backward(recurrence_bwd, fp, ip, h, dh, lb, h0, dlast, *resets):
  """The gate kernels' backward through `recurrence_bwd(f, h, dh, h0, dlast)` -> (df, dx,
  dh0) and the gates' VJP: (d fp, d ip, d lb per batch row [B, D], dh0)."""
  b, _, d = fp.shape
  lb_b = jnp.broadcast_to(lb, (b, 1, d))  # per batch row, as the kernel's partial sums
  (f, _), gates_vjp = jax.vjp(lambda fp, ip, lb: mlgru_gates(fp, ip, lb, fp.dtype), fp, ip, lb_b)
  df, dx, dh0 = recurrence_bwd(_masked(f, *resets), h, dh, h0, dlast)
  dfp, dip, dlb = gates_vjp((_masked(df, *resets), dx))
  return dfp, dip, dlb[:, 0], dh0


def _gate_kernel_forward(fp, ip, lb, h0, *resets):
  """On one device's rows: the gate kernels, or where those rows are few enough for the
  time-chunked kernels (which take f and x), the two steps through those."""
  kw = mlgru_pallas.gate_kernel_for(*fp.shape)
  if kw is not None:
    return mlgru_pallas.gate_forward(fp, ip, lb, h0, *resets, **kw)
  plain = functools.partial(scan_pallas.forward, **scan_pallas.kernel_for(*fp.shape))
  return _gate_two_steps_forward(plain, fp, ip, lb, h0, *resets)


def _gate_kernel_backward(fp, ip, h, dh, lb, h0, dlast, *resets):
  kw = mlgru_pallas.gate_kernel_for(*fp.shape)
  if kw is not None:
    return mlgru_pallas.gate_backward(fp, ip, h, dh, lb, h0, dlast, *resets, **kw)
  plain = functools.partial(scan_pallas.backward, **scan_pallas.kernel_for(*fp.shape))
  return _gate_two_steps_backward(plain, fp, ip, h, dh, lb, h0, dlast, *resets)


def _gate_forward(chunk, fp, ip, lb, h0, resets):
  r = () if resets is None else (resets,)
  xla = functools.partial(_gate_two_steps_forward,
                          functools.partial(scan.xla_forward, "associative", chunk=chunk))
  return sharding.cuda_kernel(_gate_kernel_forward, xla, fp, ip, lb, h0, *r,
                              replicated_args=(2,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _gate_scan(fp, ip, lb, h0, resets, chunk: int):
  return _gate_forward(chunk, fp, ip, lb, h0, resets)


def _gate_scan_fwd(fp, ip, lb, h0, resets, chunk):
  out, last = _gate_forward(chunk, fp, ip, lb, h0, resets)
  out = checkpoint_name(out, "recurrence_h")  # as the recurrence names it (`scan`)
  return (out, last), (fp, ip, lb, out, h0, resets)


def _gate_scan_bwd(chunk, res, cot):
  fp, ip, lb, h, h0, resets = res
  dh, dlast = cot
  r = () if resets is None else (resets,)
  xla = functools.partial(_gate_two_steps_backward,
                          functools.partial(scan.xla_backward, "associative", chunk))
  dfp, dip, dlb, dh0 = sharding.cuda_kernel(
      _gate_kernel_backward, xla,
      fp, ip, h, jnp.asarray(dh, h.dtype), lb, h0, dlast, *r, replicated_args=(4,))
  return dfp, dip, dlb.sum(0), dh0, None


_gate_scan.defvjp(_gate_scan_fwd, _gate_scan_bwd)


def mlgru_recurrence(fp_BxTxD: jax.Array, ip_BxTxD: jax.Array, lb_D: jax.Array,
                     h0_BxD: jax.Array | None = None, resets_BxT: jax.Array | None = None,
                     impl: str = "chunked", chunk: int = 16) -> tuple[jax.Array, jax.Array]:
  """The MLGRU's recurrence from its forget and input projections: `linear_recurrence` of
  `mlgru_gates(fp, ip, lb)` (h in fp's dtype, the last state in float32).

  With impl "pallas", where the whole-sequence kernels run, one custom_vjp whose kernels
  form the gates in registers and return the projections' gradients (`mlgru_pallas.
  gate_forward/gate_backward`): f (float32), x and df never cross HBM. Elsewhere (the
  time-chunked kernels' few lanes, decode steps, the other impls) the two steps as written
  (`mlgru_gates`, then `linear_recurrence`).
  """
  scan.check_impl(impl)
  lb_D = jnp.asarray(lb_D, F32)
  # The gate kernels run where the whole-sequence kernels would (the time-chunked kernels
  # for few lanes take f and x as they are).
  if scan.kernel_tiling(impl, fp_BxTxD.shape, mlgru_pallas.gate_kernel_for) is None:
    f, x = mlgru_gates(fp_BxTxD, ip_BxTxD, lb_D, fp_BxTxD.dtype)
    return scan.linear_recurrence(f, x, h0_BxD, resets_BxT, impl, chunk)
  if h0_BxD is None:
    h0_BxD = jnp.zeros((fp_BxTxD.shape[0], fp_BxTxD.shape[2]), F32)
  return _gate_scan(fp_BxTxD, ip_BxTxD, lb_D, h0_BxD.astype(F32), resets_BxT, int(chunk))


class MLGRU(nn.Module):
  """`o(gate(g, h))` with `h_t = f_t h_{t-1} + silu(i_t) (1 - f_t)`; gate = RMSNorm(g) * silu(h)
  ("code") or sigmoid(g) * h ("paper").

  Returns the block output and the float32 state after the last token, so a decode
  step is the same call with T=1 and `h0` = the carried state.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, a_BxTxD: jax.Array, lb_D: jax.Array | None, resets_BxT: jax.Array | None,
               h0_BxD: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    d = cfg.d_model
    init = xavier_uniform(2**-2.5)
    # f, i and g project the same input: one group (one read of `a`, one gradient for it).
    norms, kernels = zip(*(BitLinearWeights(d, ("embed", "state"), init, name=name)(a_BxTxD.shape[-1])
                           for name in ("f_proj", "i_proj", "g_proj")))
    f, i, g = (checkpoint_name(o, "proj") for o in bitlinear_shared(
        a_BxTxD, norms, kernels, cfg.bitlinear_eps, dt, None, cfg.bitlinear_impl))
    lb_D = jnp.zeros((d,), F32) if lb_D is None else lb_D
    if self.is_mutable_collection("intermediates"):  # for inspection (capture_intermediates)
      self.sow("intermediates", "forget_gate", mlgru_gates(f, i, lb_D, dt)[0])
    # f = lb + (1 - lb) sigmoid(f), x = silu(i) (1 - f), h_t = f_t h_{t-1} + x_t; on GPUs
    # the recurrence kernels form f and x themselves (`mlgru_recurrence`).
    h_BxTxD, h_last = mlgru_recurrence(f, i, lb_D, h0_BxD, resets_BxT, cfg.scan_impl,
                                       cfg.scan_chunk)
    if cfg.gate == "code":
      # o_proj(RMSNorm(g) * silu(h)) as one function: o_proj's kernels form the gate, so
      # neither the gated output nor its gradient is written to memory (`gated_bitlinear`).
      gnorm_w = RMSNormScale("state", name="g_norm")(d)
      norm_w, w = BitLinearWeights(d, ("state", "embed"), init, name="o_proj")(d)
      out = gated_bitlinear(g, h_BxTxD, gnorm_w, norm_w, w, cfg.norm_eps, cfg.bitlinear_eps,
                            dt, None, cfg.bitlinear_impl)
      return checkpoint_name(out, "proj"), h_last
    o = (nn.sigmoid(g.astype(F32)) * h_BxTxD).astype(dt)
    o = checkpoint_name(nn.with_logical_constraint(o, ("batch", "length", "state")),
                        "block_in")  # o_proj's input: kept by remat="lean_inputs"
    return BitLinear(d, ("state", "embed"), cfg.bitlinear_eps, dt, kernel_init=init,
                     impl=cfg.bitlinear_impl, name="o_proj")(o), h_last
