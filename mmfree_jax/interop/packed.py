"""The 2-bit packed ternary format of a MatMul-free model's weights (arch="mmfree")."""

from __future__ import annotations

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
from mmfree_jax.layers.quant import pack_codes, unpack_codes, weight_codes
from mmfree_jax.models import param_shapes

# Every BitLinear kernel [.., K, N] is ternarized ONCE from its latent weight (SPEC §1.1):
# codes `t + 1` in {0, 1, 2}, four per uint8 along K (`byte = c0 | c1<<2 | c2<<4 | c3<<6`
# for rows 4r..4r+3), plus one float32 absmean scale `g` per tensor (per layer for the
# stacked [L, K, N] kernels). Norms and lower bounds stay float32; the embedding too, or
# bfloat16 with `embed_dtype="bfloat16"` (half the file of a small model; logits then move
# by the embedding's rounding). On disk: `<dir>/packed.safetensors`, keys '/'-joined param
# paths, kernels as `<path>/codes` and `<path>/scale` (`checkpoint` adds config.json).

PACKED_FILE = "packed.safetensors"
KERNEL_KEYS = ("codes", "scale")
EMBED_DTYPES = ("float32", "bfloat16")


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


def save_packed(path: str | os.PathLike, packed: Any):
  """Writes `<path>/packed.safetensors`."""
  os.makedirs(path, exist_ok=True)
  flat = {"/".join(p): np.ascontiguousarray(v) for p, v in hf.flatten(packed).items()}
  save_file(flat, os.path.join(path, PACKED_FILE), metadata={"format": "mmfree_jax_packed"})


def packed_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """The packed tree's '/'-joined names -> shapes for a model config."""
  out = {}
  for name, shape in param_shapes(cfg).items():
    if name.endswith("/kernel"):
      base = name[: -len("kernel")]
      out[base + "codes"] = shape[:-2] + (math.ceil(shape[-2] / 4), shape[-1])
      out[base + "scale"] = shape[:-2]
    else:
      out[name] = shape
  return out


def load_packed(path: str | os.PathLike, cfg: ModelConfig) -> Any:
  """The packed params (jax arrays) of `<path>/packed.safetensors`, names and shapes checked."""
  flat = load_file(os.path.join(path, PACKED_FILE))
  want = packed_shapes(cfg)
  for k, v in flat.items():  # safetensors stores 0-d scales as [1]
    if k in want and v.shape == (1,) and want[k] == ():
      flat[k] = v.reshape(())
  hf.check_names_and_shapes({k: v.shape for k, v in flat.items()}, want, f"{path}/{PACKED_FILE}")
  return hf.unflatten({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})
