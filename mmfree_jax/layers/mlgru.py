"""MLGRU token mixer (SPEC §1.2): ternary projections around an elementwise recurrence."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mmfree_jax.config import ModelConfig
from mmfree_jax.layers.bitlinear import (BitLinear, BitLinearWeights, bitlinear_shared,
                                         gated_bitlinear, gated_input, xavier_uniform)
from mmfree_jax.layers.norm import RMSNormScale
from mmfree_jax.layers.scan import mlgru_gates, mlgru_recurrence

F32 = jnp.float32


def lower_bounds(gamma_LxD: jax.Array) -> jax.Array:
  """`cumsum(softmax(Gamma, 0), 0) - P[0]`: zero for layer 0, rising with depth."""
  p = jax.nn.softmax(gamma_LxD.astype(F32), axis=0)
  return jnp.cumsum(p, axis=0) - p[0]


# The code's gate formed inside o_proj's kernels (`gated_bitlinear`: neither the gated
# output nor its gradient is written to memory) instead of by XLA before o_proj. The same
# results either way (tests/test_models.py); on because the gated output's bytes dominate
# that part of the step (BENCHMARKS.md, "History", 838ec18).
GATE_IN_O_PROJ = True


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
      gnorm_w = RMSNormScale("state", name="g_norm")(d)
      if GATE_IN_O_PROJ:  # o_proj(RMSNorm(g) * silu(h)) as one function
        norm_w, w = BitLinearWeights(d, ("state", "embed"), init, name="o_proj")(d)
        out = gated_bitlinear(g, h_BxTxD, gnorm_w, norm_w, w, cfg.norm_eps, cfg.bitlinear_eps,
                              dt, None, cfg.bitlinear_impl)
        return checkpoint_name(out, "proj"), h_last
      o = gated_input(g, h_BxTxD, gnorm_w, cfg.norm_eps, dt)
    else:
      o = (nn.sigmoid(g.astype(F32)) * h_BxTxD).astype(dt)
    o = checkpoint_name(nn.with_logical_constraint(o, ("batch", "length", "state")),
                        "block_in")  # o_proj's input: kept by remat="lean_inputs"
    return BitLinear(d, ("state", "embed"), cfg.bitlinear_eps, dt, kernel_init=init,
                     impl=cfg.bitlinear_impl, name="o_proj")(o), h_last
