"""FLOP accounting and the wall-time planning model, in one place."""

from __future__ import annotations

from mmfree_jax.config import ModelConfig
from mmfree_jax.models import param_counts

# Convention (the paper's, SPEC §4): training compute `C = 6 * N * D` with `D` tokens
# and `N` = every parameter except the input embedding table (a lookup, not a matmul);
# ternary matmuls are counted like bf16 matmuls. The transformer adds attention's
# sequence term (PaLM appendix B): `6 * L * T * d` per token for QK^T and AV together
# (forward 2*2*L*T*d, backward twice that; no causal discount). MLGRU's recurrence and
# all elementwise work are not counted.

# Dense bf16 peak per chip (FLOP/s) for MFU; the first matching substring of
# `jax.devices()[0].device_kind` wins.
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
    ("TPU v6", 918e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12),
    ("TPU v5", 459e12), ("TPU v4", 275e12),
)
# What bf16 matmuls actually reach on an H200 with JAX 0.11 (SPEC §5).
H200_MEASURED_PEAK = 810e12


def flops_params(cfg: ModelConfig) -> int:
  """N of `6ND`: all parameters but the input embedding table."""
  return param_counts(cfg)["total"] - cfg.vocab_size * cfg.d_model


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Model FLOPs per trained token (forward + backward)."""
  f = 6.0 * flops_params(cfg)
  if cfg.arch == "transformer":
    f += 6.0 * cfg.n_layers * seq_len * cfg.d_model
  return f


def train_flops(cfg: ModelConfig, seq_len: int, tokens: float) -> float:
  return train_flops_per_token(cfg, seq_len) * tokens


def device_peak_flops(device_kind: str) -> float | None:
  for key, peak in PEAK_FLOPS:
    if key.lower() in device_kind.lower():
      return peak
  return None


# Planning model for wall time (an estimate, not a measurement): model FLOP utilization of
# the train step measured on one H200 at 370M (d=1024, seq 2048), derated linearly for
# narrower models (`mfu * min(1, d / 1024)`): per token, matmul work grows like d^2 while
# the elementwise work (norms, quantizers, the recurrence) grows like d, so a narrow model
# spends a larger share of its time off the matmul units. Plus a fixed cost per run
# (process start, compile, held-out eval, checkpoints).
PLAN_MFU_370M = {"mmfree": 0.30, "transformer": 0.45}
PLAN_RUN_OVERHEAD_S = 45.0


def planned_mfu(cfg: ModelConfig) -> float:
  """Assumed MFU of a train run of `cfg` (see PLAN_MFU_370M)."""
  return PLAN_MFU_370M[cfg.arch] * min(1.0, cfg.d_model / 1024)


def estimate_train_seconds(cfg: ModelConfig, seq_len: int, tokens: float,
                           peak_flops: float = 989e12, n_devices: int = 1,
                           overhead_s: float = PLAN_RUN_OVERHEAD_S) -> float:
  """Planned wall time of training `cfg` on `tokens` tokens (see `planned_mfu`)."""
  rate = planned_mfu(cfg) * peak_flops * n_devices
  return train_flops(cfg, seq_len, tokens) / rate + overhead_s
