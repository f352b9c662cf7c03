"""Model configuration and presets (SPEC §2)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

ARCHS = ("mmfree", "transformer")
GATES = ("code", "paper")
SCAN_IMPLS = ("sequential", "associative", "chunked", "pallas")
BITLINEAR_IMPLS = ("xla", "pallas")
REMAT_POLICIES = ("none", "lean", "lean_inputs", "full")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")


def glu_hidden(d: int, ratio: int = 4) -> int:
  """`I = 256 * ceil(int(d * ratio * 2/3) / 256)` (SPEC §1.3)."""
  return 256 * math.ceil(int(d * ratio * 2 / 3) / 256)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that defines a model's math and its compute layout.

  Attributes:
    arch: "mmfree" (ternary BitLinear + MLGRU + GLU) or "transformer" (Transformer++).
    vocab_size: vocabulary size (32000 for the released checkpoints).
    d_model: residual width d.
    n_layers: number of blocks L.
    d_ff: GLU hidden width I; None applies the 256-rounding rule of SPEC §1.3.
    head_dim: attention head size (transformer only).
    gate: MLGRU output gate: "code" = RMSNorm(g) * silu(h) (released checkpoints),
      "paper" = sigmoid(g) * h (paper's equation).
    lower_bound: learnable forget-gate lower bounds (layers >= 1).
    norm_eps: eps of the block / final / g norms.
    bitlinear_eps: eps of each BitLinear's input RMSNorm: 1e-6, what the released models run
      (`FusedBitLinear.forward` calls `layer_norm_linear_quant_fn` without an eps, so its
      default 1e-6 applies; the `RMSNorm(eps=1e-8)` it builds only holds the weight).
    rope_theta: RoPE base (transformer only).
    dtype: compute dtype ("bfloat16" on accelerators, "float32" for exactness tests).
    scan_impl: recurrence implementation, one of SCAN_IMPLS (`layers.scan`; "pallas": the
      Pallas kernels on CUDA GPUs, the associative scan elsewhere).
    scan_chunk: chunk length of the chunked recurrence.
    bitlinear_impl: "pallas" runs the elementwise work around each BitLinear matmul (input
      norm + int8 quantization; its backward) as fused kernels on CUDA GPUs (XLA
      elsewhere); "xla" uses XLA fusions everywhere.
    remat: "none" (keep what autodiff keeps; BitLinear already recomputes its quantized
      input), "lean" (save only matmul outputs and the recurrence output; recompute all
      elementwise work), "lean_inputs" ("lean" plus the input of each projection group
      that "lean" recomputes: the block norms' outputs, and with gate="paper" the MLGRU's
      gated output; more memory, less recomputation), "full" (save only each block's
      input: lowest memory).
    unroll_layers: run the L blocks as straight-line code instead of a loop (`nn.scan`
      fully unrolled; parameters keep their stacked [L, ...] layout): no per-layer copies
      of saved activations into stacked buffers, a faster step at a longer compile. The
      remat policy is applied without CSE barriers, so outside the loop XLA may keep what
      "lean" would recompute (more memory than "lean" in the loop); "full" (the
      memory-saving mode) therefore needs the loop.
    attention_impl: training attention (transformer): "xla", "cudnn" (cuDNN flash attention,
      CUDA GPUs; packed documents' mask as a bias), "splash" (the Pallas TPU splash kernel,
      packed documents as segment ids) or "auto": the one for the platform the step is
      compiled for (`attention.resolve_impl`). Decoding always runs XLA's.
    init_std: std of the Normal init (embedding, GLU, head).
  """

  arch: str = "mmfree"
  vocab_size: int = 32000
  d_model: int = 1024
  n_layers: int = 24
  d_ff: int | None = None
  head_dim: int = 64
  gate: str = "code"
  lower_bound: bool = True
  norm_eps: float = 1e-6
  bitlinear_eps: float = 1e-6
  rope_theta: float = 10000.0
  dtype: str = "bfloat16"
  scan_impl: str = "pallas"
  scan_chunk: int = 8
  bitlinear_impl: str = "pallas"
  remat: str = "none"
  unroll_layers: bool = False
  attention_impl: str = "auto"
  init_std: float = 0.02

  def __post_init__(self):
    _check(self.arch in ARCHS, f"model.arch={self.arch!r} is unknown; use one of {ARCHS}")
    _check(self.gate in GATES, f"model.gate={self.gate!r} is unknown; use one of {GATES}")
    _check(self.scan_impl in SCAN_IMPLS,
           f"model.scan_impl={self.scan_impl!r} is unknown; use one of {SCAN_IMPLS}")
    _check(self.bitlinear_impl in BITLINEAR_IMPLS,
           f"model.bitlinear_impl={self.bitlinear_impl!r} is unknown; use one of {BITLINEAR_IMPLS}")
    _check(self.attention_impl in ATTENTION_IMPLS,
           f"model.attention_impl={self.attention_impl!r} is unknown; use one of {ATTENTION_IMPLS}")
    _check(self.remat in REMAT_POLICIES,
           f"model.remat={self.remat!r} is unknown; use one of {REMAT_POLICIES} or 'auto' "
           "(training: the fastest layout that fits, train/memory.py)")
    _check(not (self.unroll_layers and self.remat == "full"),
           "model.remat='full' needs the layer loop: set model.unroll_layers=False")
    _check(self.dtype in ("bfloat16", "float32", "float16"),
           f"model.dtype={self.dtype!r} is unsupported; use bfloat16 or float32")
    for name in ("vocab_size", "d_model", "n_layers", "scan_chunk"):
      _check(int(getattr(self, name)) > 0, f"model.{name} must be positive")
    if self.arch == "transformer":
      _check(self.d_model % self.head_dim == 0,
             f"model.d_model={self.d_model} is not divisible by model.head_dim="
             f"{self.head_dim}; pick a multiple of the head size")

  @property
  def ffn(self) -> int:
    return self.d_ff if self.d_ff else glu_hidden(self.d_model)

  @property
  def n_heads(self) -> int:
    return self.d_model // self.head_dim

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


class ConfigError(ValueError):
  """A bad configuration value; the message says what is wrong and how to fix it."""


def _check(ok: bool, msg: str):
  if not ok:
    raise ConfigError(msg)


_SIZES = {
    # name: (d, L)
    "370M": (1024, 24),
    "1.3B": (2048, 24),
    "2.7B": (2560, 32),
    # small models for CPU tests, demos and sweeps
    "tiny": (64, 2),
    "micro": (32, 2),
}


def preset(name: str, arch: str = "mmfree", **overrides: Any) -> ModelConfig:
  """A named size for either arch, e.g. `preset("1.3B", "transformer")`."""
  if name not in _SIZES:
    raise ConfigError(f"model preset {name!r} is unknown; use one of {sorted(_SIZES)}")
  d, n_layers = _SIZES[name]
  kw: dict[str, Any] = dict(arch=arch, d_model=d, n_layers=n_layers)
  if name in ("tiny", "micro"):
    kw.update(head_dim=16, scan_chunk=16)
  kw.update(overrides)
  return ModelConfig(**kw)


PRESET_NAMES = tuple(_SIZES)


_FIELD_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def field_types() -> dict[str, type]:
  """Every ModelConfig field and its value type (`int | None` -> int)."""
  return {f.name: _FIELD_TYPES[str(f.type).split("|")[0].strip()]
          for f in dataclasses.fields(ModelConfig)}


def from_dict(d: Mapping[str, Any]) -> ModelConfig:
  """ModelConfig from a mapping (e.g. an ml_collections ConfigDict); `preset` key optional.

  A None value means "unset": the preset's value, else the ModelConfig default.
  """
  d = {k: v for k, v in dict(d).items() if v is not None}
  name = d.pop("preset", None)
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ConfigError(f"unknown model config key(s) {unknown}; valid keys: {sorted(fields)}")
  if name:
    arch = d.pop("arch", "mmfree")
    return preset(name, arch, **d)
  return ModelConfig(**d)
