"""The MatMul-free LM (SPEC §1) and the Transformer++ baseline (SPEC §1.6)."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mmfree_jax import cli
from mmfree_jax.config import PRESET_NAMES, ModelConfig, preset
from mmfree_jax.layers.attention import Attention
from mmfree_jax.layers.bitlinear import BitLinear
from mmfree_jax.layers.glu import GLU, SwiGLU
from mmfree_jax.layers.mlgru import MLGRU, lower_bounds
from mmfree_jax.layers.norm import RMSNorm

# `LM(cfg)` is one Flax module for both arches; layers are stacked with `nn.scan` (one
# compiled block whatever the depth, or straight-line code with `unroll_layers`). Call it as
#
#     logits_BxTxV, cache = LM(cfg).apply({"params": p}, tokens_BxT, segment_ids_BxT, cache)
#
# `segment_ids` (1, 2, ... per packed document, 0 = padding) reset the recurrence / mask
# attention at document boundaries; `cache` (from `init_cache`) continues a sequence:
# prefill with T > 1, decode with T = 1. `p` holds latent weights, or for arch="mmfree" the
# 2-bit packed ones of `interop.packed` (each BitLinear then runs on its stored codes).
#
# `python -m mmfree_jax.models` prints the preset table.

F32 = jnp.float32
ACT = ("batch", "length", "embed")

# What "lean" remat saves: projection (matmul) outputs, the recurrence output and the
# attention output; every elementwise op (norms, quantizers, gates) is recomputed.
# "lean_inputs" also keeps each projection group's input ("block_in": the attn_norm and
# mlp_norm outputs, the MLGRU's gated output), so the backward pass does not rebuild them.
_SAVED = {"lean": ("proj", "recurrence_h", "attn_out"),
          "lean_inputs": ("proj", "recurrence_h", "attn_out", "block_in")}


class Block(nn.Module):
  """Pre-norm block: token mixer (MLGRU or attention), then channel mixer (GLU or SwiGLU).

  Returns (x, per-layer output): the final recurrent state (mmfree) or the updated KV
  cache (transformer, when decoding).
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, layer_in: dict, ctx: dict):
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    a = checkpoint_name(RMSNorm(cfg.norm_eps, dtype=dt, name="attn_norm")(x_BxTxD), "block_in")
    if cfg.arch == "mmfree":
      y, out = MLGRU(cfg, name="attn")(a, layer_in["lb"], ctx["resets"], layer_in["h0"])
      mlp = GLU(cfg, name="mlp")
    else:
      y, out = Attention(cfg, name="attn")(a, ctx["positions"], ctx["segment_ids"],
                                           layer_in.get("kv"), ctx["index"])
      mlp = SwiGLU(cfg, name="mlp")
    x_BxTxD = nn.with_logical_constraint(x_BxTxD + y.astype(F32), ACT)
    m = checkpoint_name(RMSNorm(cfg.norm_eps, dtype=dt, name="mlp_norm")(x_BxTxD), "block_in")
    x_BxTxD = nn.with_logical_constraint(x_BxTxD + mlp(m).astype(F32), ACT)
    return x_BxTxD, out


def _remat(block_cls, policy: str):
  """Wraps the block in `nn.remat` with the configured policy (see ModelConfig.remat)."""
  if policy == "none":
    return block_cls
  if policy == "full":
    return nn.remat(block_cls, prevent_cse=False)
  return nn.remat(block_cls, policy=jax.checkpoint_policies.save_only_these_names(*_SAVED[policy]),
                  prevent_cse=False)


def segment_resets(segment_ids_BxT: jax.Array) -> jax.Array:
  """True where a token starts a new document (never at t=0: state there is h0)."""
  prev = jnp.pad(segment_ids_BxT[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  return (segment_ids_BxT != prev).at[:, 0].set(False)


def segment_positions(segment_ids_BxT: jax.Array) -> jax.Array:
  """Position of each token inside its document (for RoPE with packed sequences)."""
  t = jnp.arange(segment_ids_BxT.shape[1])[None]
  starts = jnp.where(segment_resets(segment_ids_BxT), t, 0)
  return t - jax.lax.cummax(starts, axis=1)


class LM(nn.Module):
  """Decoder-only LM: embed -> L pre-norm blocks -> RMSNorm -> head."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, segment_ids_BxT: jax.Array | None = None,
               cache: dict | None = None) -> tuple[jax.Array, dict | None]:
    cfg = self.cfg
    b, t = tokens_BxT.shape
    emb = self.param("embed", nn.with_logical_partitioning(
        nn.initializers.normal(cfg.init_std), ("vocab", "embed")), (cfg.vocab_size, cfg.d_model), F32)
    x = nn.with_logical_constraint(jnp.take(emb, tokens_BxT, axis=0).astype(F32), ACT)

    if cfg.arch == "mmfree":
      if cfg.lower_bound:
        gamma = self.param("lower_bounds", nn.with_logical_partitioning(
            nn.initializers.zeros, ("layers", "embed")), (cfg.n_layers, cfg.d_model), F32)
        lb = lower_bounds(gamma)
      else:
        lb = jnp.zeros((cfg.n_layers, cfg.d_model), F32)
      h0 = cache["h"] if cache is not None else jnp.zeros((cfg.n_layers, b, cfg.d_model), F32)
      layer_in = {"lb": lb, "h0": h0}
      resets = None if segment_ids_BxT is None else segment_resets(segment_ids_BxT)
      ctx = {"resets": resets}
    else:
      index = None if cache is None else cache["index"]
      if segment_ids_BxT is not None and cache is None:
        pos = segment_positions(segment_ids_BxT)
      else:
        pos = jnp.broadcast_to(jnp.arange(t)[None] + (0 if index is None else index), (b, t))
      layer_in = {} if cache is None else {"kv": {"k": cache["k"], "v": cache["v"]}}
      ctx = {"positions": pos, "segment_ids": None if cache is not None else segment_ids_BxT,
             "index": index}

    stack = nn.scan(_remat(Block, cfg.remat), variable_axes={"params": 0},
                    split_rngs={"params": True}, in_axes=(0, nn.broadcast), length=cfg.n_layers,
                    unroll=cfg.n_layers if cfg.unroll_layers else 1,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    x, per_layer = stack(cfg, name="layers")(x, layer_in, ctx)

    x = RMSNorm(cfg.norm_eps, name="norm")(x)
    if cfg.arch == "mmfree":
      logits = BitLinear(cfg.vocab_size, ("embed", "vocab"), cfg.bitlinear_eps, jnp.dtype(cfg.dtype),
                         out_dtype=F32, impl=cfg.bitlinear_impl, name="lm_head")(x)
    else:
      logits = nn.DenseGeneral(cfg.vocab_size, use_bias=False, dtype=jnp.dtype(cfg.dtype),
                               param_dtype=F32, name="lm_head", kernel_init=nn.with_logical_partitioning(
                                   nn.initializers.normal(cfg.init_std), ("embed", "vocab")))(
                                       x.astype(cfg.dtype)).astype(F32)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

    new_cache = None
    if cache is not None:
      if cfg.arch == "mmfree":
        new_cache = {"h": per_layer}
      else:
        new_cache = {"k": per_layer["k"], "v": per_layer["v"], "index": cache["index"] + t}
    return logits, new_cache


def init_cache(cfg: ModelConfig, batch: int, max_len: int = 0, dtype=None) -> dict:
  """Empty decode state: [L, B, d] float32 for mmfree (constant in length); a KV cache
  of `max_len` positions for the transformer."""
  if cfg.arch == "mmfree":
    return {"h": jnp.zeros((cfg.n_layers, batch, cfg.d_model), F32)}
  if max_len <= 0:
    raise ValueError("the transformer's KV cache needs max_len > 0 (prompt + new tokens)")
  shape = (cfg.n_layers, batch, max_len, cfg.n_heads, cfg.head_dim)
  dt = dtype or jnp.dtype(cfg.dtype)
  return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt), "index": jnp.zeros((), jnp.int32)}


def init_params(cfg: ModelConfig, rng: jax.Array) -> Any:
  """Boxed (logically partitioned) params; `nn.unbox` them for plain arrays."""
  return LM(cfg).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def abstract_params(cfg: ModelConfig) -> Any:
  """Shapes only (no allocation), still boxed with logical axis names."""
  return jax.eval_shape(lambda r: init_params(cfg, r), jax.random.key(0))


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """The parameters as '/'-joined names (the names of every checkpoint format) -> shapes."""
  leaves = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(cfg)))[0]
  return {"/".join(k.key for k in path): tuple(v.shape) for path, v in leaves}


def param_counts(cfg: ModelConfig) -> dict[str, int]:
  """Exact parameter counts from `jax.eval_shape`.

  "non_embedding" excludes the input embedding table and the output head's [d, V] kernel.
  """
  p = nn.unbox(abstract_params(cfg))
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(p))
  emb = cfg.vocab_size * cfg.d_model
  return {"total": total, "non_embedding": total - 2 * emb}


def _table() -> str:
  rows = [("preset", "arch", "d", "L", "I", "total", "non_embedding")]
  for arch in ("mmfree", "transformer"):
    for name in PRESET_NAMES:
      cfg = preset(name, arch)
      c = param_counts(cfg)
      rows.append((name, arch, str(cfg.d_model), str(cfg.n_layers), str(cfg.ffn),
                   str(c["total"]), str(c["non_embedding"])))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows)


def main(argv=None) -> int:
  cli.ArgumentParser(prog="python -m mmfree_jax.models",
                     description="Prints the preset table.").parse_args(argv)
  print(_table())
  return 0


if __name__ == "__main__":
  cli.run(main)
