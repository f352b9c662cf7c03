"""Our default model against numbers the official PyTorch/Triton code produced itself.

`tests/fixtures/official/` was written on a GPU by
`python -m mmfree_jax.interop.official fixtures` (manifest.json: revision, versions, card):
random `hgrn_bit` models with perturbed norm weights and lower bounds, their fp32 logits
(full sequence and token by token through the official cache), fp32 loss and gradients,
and bf16-autocast logits and loss. Each model goes through `python -m mmfree_jax.convert`
and runs with the default config (float32 compute for the fp32 numbers).

Tolerances come from the official code's own noise on the same fixture: its full-sequence
and token-by-token logits differ by float rounding (and the 8-bit codes that rounding can
flip). Were ours and both official paths each within e of exact arithmetic, ours would be
within 2e of either official path while the official paths are >= 0 apart; so ours may
differ from the official logits by at most SPREAD_FACTOR x the official spread.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmfree_jax import convert
from mmfree_jax.config import ModelConfig
from mmfree_jax.interop import checkpoint, hf
from mmfree_jax.models import LM, init_cache

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "official")
if not os.path.exists(os.path.join(FIXTURES, "manifest.json")):
  pytest.skip("tests/fixtures/official/ not generated yet: run `python -m "
              "mmfree_jax.interop.official fixtures --official=<checkout> "
              "--out=tests/fixtures/official` on a CUDA GPU", allow_module_level=True)
with open(os.path.join(FIXTURES, "manifest.json")) as _f:
  MANIFEST = json.load(_f)
SPREAD_FACTOR = 2.0
# Gradients: our fp32 backward and the official one differ where a float rounding flips an
# 8-bit activation code or a ternary weight (the STE passes the flipped value's gradient on).
GRAD_COSINE = 0.999
GRAD_REL_NORM = 0.01  # | |g_ours| / |g_official| - 1 |


@pytest.fixture(scope="module", params=sorted(MANIFEST["shapes"]))
def case(request, tmp_path_factory):
  """(name, our converted model dir, the official numbers) per fixture shape."""
  src = os.path.join(FIXTURES, request.param)
  dst = str(tmp_path_factory.mktemp(request.param) / "ours")
  assert convert.main([src, dst]) == 0
  with np.load(os.path.join(src, "official.npz")) as z:
    ref = dict(z)
  return request.param, dst, ref


def _logits(cfg, params, tokens):
  return np.asarray(jax.jit(lambda p, t: LM(cfg).apply({"params": p}, t)[0])(params, tokens))


def _decode(cfg, params, tokens):
  """Token by token through our decode cache."""
  step = jax.jit(lambda p, t, c: LM(cfg).apply({"params": p}, t, None, c))
  cache, out = init_cache(cfg, tokens.shape[0]), []
  for t in range(tokens.shape[1]):
    logits, cache = step(params, tokens[:, t:t + 1], cache)
    out.append(np.asarray(logits[:, 0]))
  return np.stack(out, 1)


def _spread(ref):
  return np.abs(ref["logits_full"] - ref["logits_decode"])


def test_converted_model_uses_the_default_config(case):
  _, path, _ = case
  cfg, _ = checkpoint.load_model(path)
  assert cfg.bitlinear_eps == ModelConfig().bitlinear_eps == 1e-6
  assert cfg.gate == "code" and cfg.lower_bound


def test_logits_match_within_the_official_decode_spread(case):
  name, path, ref = case
  cfg, params = checkpoint.load_model(path, dtype="float32")
  tokens = ref["tokens"]
  spread = _spread(ref)
  for ours, theirs in ((_logits(cfg, params, tokens), ref["logits_full"]),
                       (_decode(cfg, params, tokens), ref["logits_decode"])):
    diff = np.abs(ours - theirs)
    assert diff.max() <= SPREAD_FACTOR * spread.max(), (name, diff.max(), spread.max())
    assert diff.mean() <= SPREAD_FACTOR * spread.mean(), (name, diff.mean(), spread.mean())


def test_the_old_eps_is_outside_that_tolerance(case):
  """What the test above guards against: BitLinear norms at eps 1e-8 (our former default)."""
  _, path, ref = case
  cfg, params = checkpoint.load_model(path, dtype="float32", bitlinear_eps=1e-8)
  diff = np.abs(_logits(cfg, params, ref["tokens"]) - ref["logits_full"])
  assert diff.mean() > SPREAD_FACTOR * _spread(ref).mean()


def _loss_and_grads(cfg, params, tokens):
  """The official loss: labels shifted inside the model, the last position ignored."""
  def loss(p):
    logits = LM(cfg).apply({"params": p}, tokens)[0][:, :-1]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]))
  return jax.jit(jax.value_and_grad(loss))(params)


def test_loss_and_every_gradient_match(case):
  name, path, ref = case
  cfg, params = checkpoint.load_model(path, dtype="float32")
  loss, grads = _loss_and_grads(cfg, params, ref["tokens"])
  # A mean over tokens in float32 adds its own rounding (~1 ulp of the loss per term summed).
  tol = SPREAD_FACTOR * _spread(ref).max() + 1e-6 * abs(float(ref["loss"]))
  assert abs(float(loss) - float(ref["loss"])) <= tol, (name, float(loss), float(ref["loss"]))
  ours = hf.params_to_hf(cfg, jax.device_get(grads))
  theirs = {k[len("grad/"):]: v for k, v in ref.items() if k.startswith("grad/")}
  assert sorted(ours) == sorted(theirs)
  for k, g in ours.items():
    t = theirs[k]
    cos = float(np.vdot(g, t) / (np.linalg.norm(g) * np.linalg.norm(t)))
    rel = abs(np.linalg.norm(g) / np.linalg.norm(t) - 1)
    assert cos >= GRAD_COSINE and rel <= GRAD_REL_NORM, (name, k, cos, rel)


def test_bf16_matches_the_official_bf16_autocast(case):
  """Ours in bf16 (the default) against the official model under bf16 autocast, measured
  against how far the official bf16 run is from its own fp32 run."""
  name, path, ref = case
  cfg, params = checkpoint.load_model(path)
  assert cfg.dtype == "bfloat16"
  ours = _logits(cfg, params, ref["tokens"])
  own = np.abs(ref["bf16_logits"] - ref["logits_full"]).mean()
  assert np.abs(ours - ref["bf16_logits"]).mean() <= SPREAD_FACTOR * own, name
