"""Channel mixers: the ternary GLU (SPEC §1.3) and the bf16 SwiGLU of Transformer++."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mmfree_jax.config import ModelConfig
from mmfree_jax.layers.bitlinear import BitLinearWeights, glu_mlp


def _down_init(cfg: ModelConfig):
  return nn.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.n_layers))


class GLU(nn.Module):
  """`down(silu(gate) * up)` with ONE fused ternary gate/up BitLinear d -> 2I (one
  matmul and one weight scale, as in the released checkpoints), run as one function
  (`glu_mlp`): the down projection's kernels form gate, up and their product from the
  gate/up matmul's output in registers, and the backward has one gate | up gradient."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, m_BxTxD: jax.Array) -> jax.Array:
    cfg = self.cfg
    gate_up = BitLinearWeights(2 * cfg.ffn, ("embed", "mlp"), nn.initializers.normal(cfg.init_std),
                               name="gate_proj")(m_BxTxD.shape[-1])
    down = BitLinearWeights(cfg.d_model, ("mlp", "embed"), _down_init(cfg),
                            name="down_proj")(cfg.ffn)
    out = glu_mlp(m_BxTxD, *gate_up, *down, cfg.bitlinear_eps, jnp.dtype(cfg.dtype), None,
                  cfg.bitlinear_impl)
    return checkpoint_name(out, "proj")


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
