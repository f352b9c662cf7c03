"""Causal multi-head attention with RoPE and a KV cache (the Transformer++ mixer, SPEC §1.6).

Training attention runs `model.attention_impl` (`resolve_impl` turns "auto" into the one for
the platform the step is compiled for): XLA's, cuDNN flash attention on CUDA GPUs, or the
Pallas TPU splash kernel, each causal inside the packed documents.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec as P

from mmfree_jax import sharding
from mmfree_jax.config import ConfigError, ModelConfig

F32 = jnp.float32
SPLASH_BLOCKS = (512, 256, 128)  # splash tiles: the largest that divides the sequence
_KERNEL_PLATFORMS = {"cudnn": ("gpu", "CUDA GPUs"), "splash": ("tpu", "TPUs")}


def target_platform() -> str:
  """The platform the traced program is for: that of the devices of the mesh in context
  (`jax.set_mesh`: the trainer's devices, or the AOT check's target), else the default
  backend's."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  return device.platform if device is not None else jax.default_backend()


def resolve_impl(impl: str, platform: str, seq_len: int, dtype: str) -> str:
  """The training attention that `model.attention_impl=impl` runs on `platform` ("gpu",
  "tpu", "cpu") for sequences of `seq_len` tokens in `dtype`: "auto" is cuDNN on GPUs (in
  bfloat16 / float16, the dtypes it computes in), splash on TPUs and XLA elsewhere; a
  kernel asked for where it cannot run is a ConfigError. Splash tiles the sequence in
  blocks of 128: other lengths (e.g. init's 1-token trace) run XLA's."""
  half = jnp.dtype(dtype).itemsize == 2
  if impl == "auto":
    impl = {"gpu": "cudnn" if half else "xla", "tpu": "splash"}.get(platform, "xla")
  elif impl in _KERNEL_PLATFORMS and _KERNEL_PLATFORMS[impl][0] != platform:
    raise ConfigError(f"model.attention_impl={impl!r} runs only on {_KERNEL_PLATFORMS[impl][1]}, "
                      f"not on {platform}; use 'auto' (cuDNN on GPUs, splash on TPUs, XLA "
                      "elsewhere) or 'xla'")
  elif impl == "cudnn" and not half:
    raise ConfigError(f"model.attention_impl='cudnn' computes in bfloat16 or float16, not in "
                      f"model.dtype={dtype}; use 'auto' or 'xla'")
  return "xla" if impl == "splash" and seq_len % SPLASH_BLOCKS[-1] else impl


def splash_attention(q_BxTxNxH: jax.Array, k_BxTxNxH: jax.Array, v_BxTxNxH: jax.Array,
                     segment_ids_BxT: jax.Array | None, interpret: bool = False) -> jax.Array:
  """Causal attention by the Pallas TPU splash kernel (`interpret`: its CPU emulation), each
  token attending within its segment; under a mesh, per device on its batch rows and heads.
  The kernel saves its output and log-sum-exp as "attn_out" (what "lean" remat keeps)."""
  b, t, n, h = q_BxTxNxH.shape
  blk = next(x for x in SPLASH_BLOCKS if t % x == 0)
  kernel = splash_lib.make_splash_mha(
      mask_lib.MultiHeadMask([mask_lib.CausalMask((t, t))] * n), head_shards=1, q_seq_shards=1,
      block_sizes=splash_lib.BlockSizes(blk, blk, blk, blk, blk, blk, blk, blk),
      residual_checkpoint_name="attn_out", interpret=interpret)
  segs = () if segment_ids_BxT is None else (segment_ids_BxT,)

  def run(q, k, v, *seg):
    q = q * jnp.asarray(1 / math.sqrt(h), q.dtype)  # the kernel does not scale the logits
    row = lambda q, k, v, *s: kernel(q, k, v, splash_lib.SegmentIds(*s, *s) if s else None)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)
    o = jax.vmap(row)(heads_first(q), heads_first(k), heads_first(v), *seg)
    return heads_first(o)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return run(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, *segs)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))

  def split(logical: str, size: int):  # the mesh axes of a dimension; replicated if uneven
    axes = nn.logical_to_mesh_axes((logical,), sharding.RULES)[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return axes if axes and size % math.prod(sizes[a] for a in axes) == 0 else None

  spec = P(split("batch", b), None, split("heads", n), None)
  return jax.shard_map(run, mesh=mesh, in_specs=(spec,) * 3 + (P(spec[0], None),) * len(segs),
                       out_specs=spec, check_vma=False)(q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, *segs)


def _training_attention(q, k, v, segment_ids_BxT, impl: str):
  """Causal attention inside packed documents by the resolved implementation, its output
  named "attn_out" (splash: the kernel's output and log-sum-exp) for "lean" remat."""
  if impl == "splash":
    return splash_attention(q, k, v, segment_ids_BxT)
  # cuDNN applies the documents' mask as a bias on top of its causal mask.
  same = None if segment_ids_BxT is None else (
      segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :])
  o = jax.nn.dot_product_attention(q, k, v, mask=same, is_causal=True, implementation=impl)
  return checkpoint_name(o, "attn_out")


def rope(x_BxTxNxH: jax.Array, pos_BxT: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding (half-split convention of Llama / HF)."""
  h = x_BxTxNxH.shape[-1]
  inv = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=F32) / h))
  ang = pos_BxT.astype(F32)[..., None] * inv  # B,T,H/2
  cos, sin = jnp.cos(ang)[:, :, None], jnp.sin(ang)[:, :, None]
  x = x_BxTxNxH.astype(F32)
  x1, x2 = x[..., : h // 2], x[..., h // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxH.dtype)


class Attention(nn.Module):
  """Returns (output, new_kv). `kv` = None for training; a dict(k, v) [B,S,N,H] when decoding."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD: jax.Array, pos_BxT: jax.Array, segment_ids_BxT: jax.Array | None,
               kv: dict | None, index: jax.Array | None):
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    n, h = cfg.n_heads, cfg.head_dim
    init = nn.initializers.normal(cfg.init_std)
    x = x_BxTxD.astype(dt)

    def qkv(name):
      w = self.param(name, nn.with_logical_partitioning(init, ("embed", "heads", "kv")),
                     (cfg.d_model, n, h), F32)
      return checkpoint_name(jnp.einsum("btd,dnh->btnh", x, w.astype(dt)), "proj")

    q = rope(qkv("q_proj"), pos_BxT, cfg.rope_theta)
    k = rope(qkv("k_proj"), pos_BxT, cfg.rope_theta)
    v = qkv("v_proj")
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    new_kv = None
    if kv is None:
      impl = resolve_impl(cfg.attention_impl, target_platform(), x.shape[1], cfg.dtype)
      o = _training_attention(q, k, v, segment_ids_BxT, impl)
    else:
      t, s = x.shape[1], kv["k"].shape[1]
      ck = jax.lax.dynamic_update_slice(kv["k"], k.astype(kv["k"].dtype), (0, index, 0, 0))
      cv = jax.lax.dynamic_update_slice(kv["v"], v.astype(kv["v"].dtype), (0, index, 0, 0))
      qpos = index + jnp.arange(t)
      mask = jnp.arange(s)[None, :] <= qpos[:, None]  # T,S
      o = jax.nn.dot_product_attention(q, ck.astype(dt), cv.astype(dt), mask=mask[None, None])
      new_kv = {"k": ck, "v": cv}
    wo = self.param("o_proj", nn.with_logical_partitioning(
        nn.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.n_layers)), ("heads", "kv", "embed")),
        (n, h, cfg.d_model), F32)
    return checkpoint_name(jnp.einsum("btnh,nhd->btd", o, wo.astype(dt)), "proj"), new_kv
