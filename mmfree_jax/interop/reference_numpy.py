"""Float64 NumPy forward of an HF `hgrn_bit` checkpoint, written from SPEC §1 alone."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

# It reads the raw HF tensors ([out, in] weights, per-layer names) and shares no code
# with the JAX model, so agreement between the two checks the conversion and the model.
# Sequential recurrence, one token at a time; for small models only.
#
#     logits_BxTxV = forward(tensors, hf_config, tokens_BxT)

# The released models' FusedBitLinear normalizes at `layer_norm_linear_quant_fn`'s default
# eps (mmfreelm/ops/fusedbitnet.py); pinned by tests/fixtures/official (test_official.py).
BITLINEAR_EPS = 1e-6


def _f64(t: Mapping[str, np.ndarray], name: str) -> np.ndarray:
  return np.asarray(t[name]).astype(np.float64)


def rms_norm(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def silu(x):
  return x * sigmoid(x)


def bit_linear(x, norm_w, w_out_in, stats: dict | None = None):
  """BitLinear: input RMSNorm (eps 1e-6), per-token absmax int8, per-tensor absmean ternary.

  If `stats` is given, records the smallest distance of any scaled activation to a
  rounding boundary (k + 0.5), i.e. how close float32 rounding came to flipping a code.
  """
  y = rms_norm(x, norm_w, BITLINEAR_EPS)
  s = 127.0 / np.maximum(np.max(np.abs(y), axis=-1, keepdims=True), 1e-5)
  ys = y * s
  q = np.clip(np.sign(ys) * np.floor(np.abs(ys) + 0.5), -128, 127)  # ties away from zero
  if stats is not None:
    margin = np.abs(np.abs(ys) - np.floor(np.abs(ys)) - 0.5).min()
    stats["act_margin"] = min(stats.get("act_margin", np.inf), float(margin))
  g = max(np.mean(np.abs(w_out_in)), 1e-5)
  t = np.clip(np.round(w_out_in / g), -1, 1)  # np.round: ties to even
  return (q / s) @ (t * g).T


def lower_bounds(gamma_LxD):
  p = np.exp(gamma_LxD - gamma_LxD.max(axis=0, keepdims=True))
  p = p / p.sum(axis=0, keepdims=True)
  return np.cumsum(p, axis=0) - p[0]


def forward(tensors: Mapping[str, np.ndarray], hf_config: Mapping[str, Any],
            tokens_BxT: np.ndarray, stats: dict | None = None) -> np.ndarray:
  """Logits [B, T, V] (float64) of the released MatMul-free LM on `tokens_BxT`."""
  t = tensors
  n_layers = int(hf_config["num_hidden_layers"])
  eps = float(hf_config.get("rms_norm_eps", 1e-6))
  x = _f64(t, "model.embeddings.weight")[np.asarray(tokens_BxT)]  # B,T,D
  b, n_tok, d = x.shape
  use_lb = hf_config.get("use_lower_bound", True)
  lb = lower_bounds(_f64(t, "model.lower_bounds")) if use_lb else np.zeros((n_layers, d))

  for layer in range(n_layers):
    p = lambda name: _f64(t, f"model.layers.{layer}.{name}")
    proj = lambda name, v: bit_linear(v, p(f"attn.{name}_proj.norm.weight"),
                                      p(f"attn.{name}_proj.weight"), stats)
    a = rms_norm(x, p("attn_norm.weight"), eps)
    f = sigmoid(proj("f", a))
    if layer > 0:
      f = lb[layer] + (1 - lb[layer]) * f
    i = silu(proj("i", a)) * (1 - f)
    h = np.zeros((b, d))
    hs = []
    for step in range(n_tok):
      h = f[:, step] * h + i[:, step]
      hs.append(h)
    h_BxTxD = np.stack(hs, axis=1)
    g = rms_norm(proj("g", a), p("attn.g_norm.weight"), eps)
    x = x + proj("o", g * silu(h_BxTxD))

    m = rms_norm(x, p("mlp_norm.weight"), eps)
    gu = bit_linear(m, p("mlp.gate_proj.norm.weight"), p("mlp.gate_proj.weight"), stats)
    gate, up = np.split(gu, 2, axis=-1)
    x = x + bit_linear(silu(gate) * up, p("mlp.down_proj.norm.weight"),
                       p("mlp.down_proj.weight"), stats)

  x = rms_norm(x, _f64(t, "model.norm.weight"), eps)
  return bit_linear(x, _f64(t, "lm_head.norm.weight"), _f64(t, "lm_head.weight"), stats)
