"""Channel mixers: the ternary GLU (SPEC §1.3) and the bf16 SwiGLU of Transformer++."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mmfree_jax.config import ModelConfig
from mmfree_jax.layers.bitlinear import BitLinear


def _down_init(cfg: ModelConfig):
  return nn.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.n_layers))


class GLU(nn.Module):
  """`down(silu(gate) * up)` with ONE fused ternary gate/up BitLinear d -> 2I (one
  matmul and one weight scale, as in the released checkpoints; its two output halves
  are separate arrays so the backward pass never concatenates their gradients)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, m_BxTxD: jax.Array) -> jax.Array:
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    gate, up = BitLinear(2 * cfg.ffn, ("embed", "mlp"), cfg.bitlinear_eps, dt,
                         kernel_init=nn.initializers.normal(cfg.init_std), impl=cfg.bitlinear_impl,
                         splits=2, name="gate_proj")(m_BxTxD)
    gate, up = (nn.with_logical_constraint(a, ("batch", "length", "mlp")) for a in (gate, up))
    # down(silu(gate) * up): the product is formed inside the down projection's kernels.
    return BitLinear(cfg.d_model, ("mlp", "embed"), cfg.bitlinear_eps, dt,
                     kernel_init=_down_init(cfg), impl=cfg.bitlinear_impl, glu=True,
                     name="down_proj")((gate, up))


class SwiGLU(nn.Module):
  """Llama MLP: `down(silu(gate(x)) * up(x))`, plain bf16 matmuls."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, m_BxTxD: jax.Array) -> jax.Array:
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    dense = lambda n, axes, init, name: nn.DenseGeneral(
        n, use_bias=False, dtype=dt, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(init, axes), name=name)
    init = nn.initializers.normal(cfg.init_std)
    m = m_BxTxD.astype(dt)
    gate = checkpoint_name(dense(cfg.ffn, ("embed", "mlp"), init, "gate_proj")(m), "proj")
    up = checkpoint_name(dense(cfg.ffn, ("embed", "mlp"), init, "up_proj")(m), "proj")
    z = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
    return checkpoint_name(dense(cfg.d_model, ("mlp", "embed"), _down_init(cfg), "down_proj")(z), "proj")
