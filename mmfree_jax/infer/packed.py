"""2-bit packed ternary weights and a forward pass that runs on them (mmfree only).

Every BitLinear kernel [.., K, N] is ternarized ONCE from its latent weight (SPEC §1.1):
codes `t + 1` in {0, 1, 2}, four per uint8 along K (`byte = c0 | c1<<2 | c2<<4 | c3<<6`
for rows 4r..4r+3), plus one float32 absmean scale `g` per tensor (per layer for the
stacked [L, K, N] kernels). Norms and lower bounds stay float32; the embedding too, or
bfloat16 with `embed_dtype="bfloat16"` (half the file of a small model; logits then move by the
embedding's rounding).

`forward` mirrors `models.LM` for arch="mmfree" but multiplies int8 activation codes by
int8 ternary codes with int32 accumulation (`lax.dot_general(..., preferred_element_type=
int32)`), then applies `g / s`. That integer product is exactly what the latent model's
float matmul computes, so logits agree up to float32 rounding of the scales. (Measured:
1e-7 on small models. At 370M shape the quantizers make the net sensitive to rounding:
any reassociation, even switching the latent model's `scan_impl`, flips a few activation
codes and moves logits by ~7% max on H200, the same as packed vs latent there.)

Directory layout: `<dir>/config.json` (ModelConfig fields) + `<dir>/packed.safetensors`
(keys are '/'-joined param paths; kernels become `<path>/codes` and `<path>/scale`).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

from mmfree_jax.config import ModelConfig
from mmfree_jax.interop import CheckpointError, hf
from mmfree_jax.interop.checkpoint import PACKED_FILE, read_config, write_config
from mmfree_jax.layers.bitlinear import (activation_codes, gated_input, glu_input, rms_normalize,
                                         weight_codes)
from mmfree_jax.layers.mlgru import lower_bounds
from mmfree_jax.layers.scan import linear_recurrence, mlgru_gates
from mmfree_jax.models import segment_resets

F32 = jnp.float32
KERNEL_KEYS = ("codes", "scale")
EMBED_DTYPES = ("float32", "bfloat16")


def pack_codes(t_KxN: np.ndarray) -> np.ndarray:
  """Ternary codes {-1,0,1} [..., K, N] -> uint8 [..., ceil(K/4), N] (K padded with 0s)."""
  t = np.asarray(t_KxN)
  if not np.all(np.isin(t, (-1, 0, 1))):
    raise ValueError("pack_codes takes ternary codes in {-1, 0, 1}; ternarize with "
                     "layers.bitlinear.weight_codes first")
  k = t.shape[-2]
  pad = (-k) % 4
  c = (t.astype(np.int16) + 1).astype(np.uint8)
  if pad:
    c = np.concatenate([c, np.ones(c.shape[:-2] + (pad, c.shape[-1]), np.uint8)], axis=-2)
  c = c.reshape(c.shape[:-2] + ((k + pad) // 4, 4, c.shape[-1]))
  return (c[..., 0, :] | c[..., 1, :] << 2 | c[..., 2, :] << 4 | c[..., 3, :] << 6).astype(np.uint8)


def unpack_codes(packed: jax.Array, k: int) -> jax.Array:
  """uint8 [..., K/4, N] -> int8 ternary codes [..., K, N] (works inside jit)."""
  shifts = jnp.arange(4, dtype=jnp.uint8)[:, None] * 2
  c = (packed[..., :, None, :] >> shifts) & 3  # [..., K/4, 4, N]
  c = c.reshape(packed.shape[:-2] + (packed.shape[-2] * 4, packed.shape[-1]))[..., :k, :]
  return c.astype(jnp.int8) - 1


def _is_kernel(path: tuple[str, ...]) -> bool:
  return path[-1] == "kernel"


def pack_params(cfg: ModelConfig, params: Any, embed_dtype: str = "float32") -> dict[str, Any]:
  """Latent float params -> packed tree (NumPy). Kernels become {"codes", "scale"}; the
  embedding is stored as `embed_dtype` (float32 | bfloat16)."""
  if embed_dtype not in EMBED_DTYPES:
    raise ValueError(f"embed_dtype={embed_dtype!r} is unsupported; use one of {EMBED_DTYPES}")
  if cfg.arch != "mmfree":
    raise ValueError(f"packing needs arch='mmfree' (got {cfg.arch!r}): only BitLinear "
                     "kernels are ternary")
  flat = {}
  for path, w in hf.flatten(params).items():
    if not _is_kernel(path):
      dtype = ml_dtypes.bfloat16 if path == ("embed",) and embed_dtype == "bfloat16" else np.float32
      flat[path] = np.asarray(w, np.float32).astype(dtype)
      continue
    _check_latent(path, np.asarray(w))
    codes = jax.vmap(weight_codes)(w) if np.ndim(w) == 3 else weight_codes(w)
    t, g = (np.asarray(v) for v in codes)
    flat[path[:-1] + ("codes",)] = pack_codes(t)
    flat[path[:-1] + ("scale",)] = g.astype(np.float32)
  return hf.unflatten(flat)


def _check_latent(path: tuple[str, ...], w: np.ndarray):
  """Refuses kernels that already hold `t * g` (re-ternarizing shrinks g, SPEC §1.1)."""
  for w_KxN in (w if w.ndim == 3 else w[None]):
    mags = np.abs(w_KxN)
    nonzero = mags[mags > 0]
    if nonzero.size and nonzero.min() == nonzero.max():
      raise CheckpointError(
          f"kernel {'/'.join(path)} already holds ternary values t*g; pack the latent "
          "(pre-quantization) weights instead")


def ternary_of(packed: Any, k: int) -> tuple[jax.Array, jax.Array]:
  """(int8 codes [.., K, N], float32 scale) of one packed kernel {"codes", "scale"}."""
  return unpack_codes(jnp.asarray(packed["codes"]), k), jnp.asarray(packed["scale"])


def is_packed(params: Any) -> bool:
  return "codes" in params.get("lm_head", {})


# ----------------------------------------------------------------------------- forward


def _bitlinear(x, p, k: int, eps: float, out_dtype):
  """BitLinear on packed weights: int8 x int8 -> int32, then `* g / s`."""
  xhat, _ = rms_normalize(x, eps)
  q, s = activation_codes(xhat * p["norm"].astype(F32))
  t = unpack_codes(p["codes"], k)
  acc = jax.lax.dot_general(q.astype(jnp.int8), t, (((q.ndim - 1,), (0,)), ((), ())),
                            preferred_element_type=jnp.int32)
  return (acc.astype(F32) * (p["scale"] / s)).astype(out_dtype)


def _rms(x, w, eps, dtype=None):
  y = rms_normalize(x, eps)[0] * w
  return y if dtype is None else y.astype(dtype)


def forward(cfg: ModelConfig, packed: Any, tokens_BxT: jax.Array,
            segment_ids_BxT: jax.Array | None = None,
            cache: dict | None = None) -> tuple[jax.Array, dict | None]:
  """Same contract as `LM(cfg).apply` for arch="mmfree", on packed params."""
  dt = jnp.dtype(cfg.dtype)
  d, ffn, eps = cfg.d_model, cfg.ffn, cfg.bitlinear_eps
  b = tokens_BxT.shape[0]
  x = jnp.take(packed["embed"], tokens_BxT, axis=0).astype(F32)
  if cfg.lower_bound:
    lb = lower_bounds(packed["lower_bounds"])
  else:
    lb = jnp.zeros((cfg.n_layers, d), F32)
  h0 = cache["h"] if cache is not None else jnp.zeros((cfg.n_layers, b, d), F32)
  resets = None if segment_ids_BxT is None else segment_resets(segment_ids_BxT)

  def block(x, inp):
    lp, lb_D, h0_BxD = inp
    at, mlp = lp["attn"], lp["mlp"]
    a = _rms(x, lp["attn_norm"]["scale"], cfg.norm_eps, dt)
    f, i = mlgru_gates(_bitlinear(a, at["f_proj"], d, eps, dt),
                       _bitlinear(a, at["i_proj"], d, eps, dt), lb_D, F32)
    h, h_last = linear_recurrence(f, i, h0_BxD, resets, cfg.scan_impl, cfg.scan_chunk)
    g = _bitlinear(a, at["g_proj"], d, eps, dt)
    if cfg.gate == "code":
      o = gated_input(g, h, at["g_norm"]["scale"], cfg.norm_eps, dt)
    else:
      o = (jax.nn.sigmoid(g.astype(F32)) * h).astype(dt)
    x = x + _bitlinear(o, at["o_proj"], d, eps, dt).astype(F32)
    m = _rms(x, lp["mlp_norm"]["scale"], cfg.norm_eps, dt)
    gate, up = jnp.split(_bitlinear(m, mlp["gate_proj"], d, eps, dt), 2, axis=-1)
    z = glu_input(gate, up, dt)
    x = x + _bitlinear(z, mlp["down_proj"], ffn, eps, dt).astype(F32)
    return x, h_last

  x, h_last = jax.lax.scan(block, x, (packed["layers"], lb, h0))
  x = _rms(x, packed["norm"]["scale"], cfg.norm_eps)
  logits = _bitlinear(x, packed["lm_head"], d, eps, F32)
  return logits, (None if cache is None else {"h": h_last})


# ----------------------------------------------------------------------------- bytes & files


def weight_bytes(params: Any, packed: Any) -> dict[str, float]:
  """Bytes of the BitLinear kernels as bf16 latents (`params`) and as packed (2-bit codes +
  float32 scales), and of everything else as `packed` stores it: the tensor bytes of
  packed.safetensors (whose file adds a JSON header)."""
  kernel = sum(2 * math.prod(np.shape(w)) for p, w in hf.flatten(params).items() if _is_kernel(p))
  flat = hf.flatten(packed)
  kernels = {p[:-1] for p in flat if p[-1] == "codes"}  # norms have a "scale" too
  packed_kernel = other = 0
  for path, v in flat.items():
    if path[:-1] in kernels and path[-1] in KERNEL_KEYS:
      packed_kernel += np.asarray(v).nbytes
    else:
      other += np.asarray(v).nbytes
  return {"kernel_bytes_bf16": kernel, "kernel_bytes_packed": packed_kernel,
          "kernel_ratio": kernel / packed_kernel, "other_bytes": other,
          "total_bytes_packed": packed_kernel + other}


def save_packed(path: str | os.PathLike, cfg: ModelConfig, packed: Any,
                export: dict[str, Any] | None = None, tokenizer: str | None = None):
  """Writes `<path>/packed.safetensors`, then `checkpoint.write_config` (config.json with
  `export` provenance, tokenizer.model)."""
  os.makedirs(path, exist_ok=True)
  flat = {"/".join(p): np.ascontiguousarray(v) for p, v in hf.flatten(packed).items()}
  save_file(flat, os.path.join(path, PACKED_FILE), metadata={"format": "mmfree_jax_packed"})
  write_config(path, cfg, export, tokenizer)


def expected_packed_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  from mmfree_jax.interop.checkpoint import _expected  # pylint: disable=import-outside-toplevel
  out = {}
  for name, shape in _expected(cfg).items():
    if name.endswith("/kernel"):
      base = name[: -len("kernel")]
      out[base + "codes"] = shape[:-2] + (math.ceil(shape[-2] / 4), shape[-1])
      out[base + "scale"] = shape[:-2]
    else:
      out[name] = shape
  return out


def load_packed(path: str | os.PathLike, **overrides: Any) -> tuple[ModelConfig, Any]:
  """(cfg, packed params as jax arrays) from a packed directory."""
  cfg = read_config(path, **overrides)
  flat = load_file(os.path.join(path, PACKED_FILE))
  want = expected_packed_shapes(cfg)
  for k, v in flat.items():  # safetensors stores 0-d scales as [1]
    if k in want and v.shape == (1,) and want[k] == ():
      flat[k] = v.reshape(())
  hf.check_names_and_shapes({k: v.shape for k, v in flat.items()}, want, f"{path}/{PACKED_FILE}")
  tree = hf.unflatten({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})
  return cfg, tree


@functools.partial(jax.jit, static_argnums=0)
def packed_logits(cfg: ModelConfig, packed: Any, tokens_BxT: jax.Array) -> jax.Array:
  """Jitted full-sequence logits from packed params."""
  return forward(cfg, packed, tokens_BxT)[0]
