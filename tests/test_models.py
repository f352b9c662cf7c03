"""Both arches: decode == full forward, causality, packing, gates, counts, init, remat."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from mmfree_jax import multihost
from mmfree_jax.config import ATTENTION_IMPLS, ConfigError, from_dict, preset
from mmfree_jax.layers import attention
from mmfree_jax.layers.mlgru import lower_bounds
from mmfree_jax.models import LM, init_cache, init_params, param_counts, segment_positions

ARCHS = ("mmfree", "transformer")
T = 12


@pytest.fixture(scope="module", params=ARCHS)
def setup(request):
  cfg = preset("tiny", request.param, dtype="float32")
  params = nn.unbox(init_params(cfg, jax.random.key(0)))
  # Non-trivial lower bounds so the test covers them.
  if cfg.arch == "mmfree":
    params["lower_bounds"] = jax.random.normal(jax.random.key(3), params["lower_bounds"].shape)
  fwd = jax.jit(lambda p, t, s: LM(cfg).apply({"params": p}, t, s)[0])
  toks = jax.random.randint(jax.random.key(1), (2, T), 0, cfg.vocab_size)
  return cfg, params, fwd, toks


def test_decode_reproduces_full_sequence(setup):
  cfg, params, fwd, toks = setup
  full = fwd(params, toks, None)
  step = jax.jit(lambda p, t, c: LM(cfg).apply({"params": p}, t, cache=c))
  cache = init_cache(cfg, 2, T)
  # prefill 5 tokens, then decode one at a time
  logits, cache = step(params, toks[:, :5], cache)
  outs = [logits]
  for t in range(5, T):
    logits, cache = step(params, toks[:, t:t + 1], cache)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-4, atol=1e-5)


def test_causality(setup):
  cfg, params, fwd, toks = setup
  a = fwd(params, toks, None)
  b = fwd(params, toks.at[:, 6].set((toks[:, 6] + 1) % cfg.vocab_size), None)
  np.testing.assert_array_equal(a[:, :6], b[:, :6])
  assert float(jnp.abs(a[:, 6:] - b[:, 6:]).max()) > 1e-4


def test_packed_documents_equal_separate_runs(setup):
  cfg, params, fwd, toks = setup
  seg = jnp.array([[1] * 5 + [2] * 7, [1] * 3 + [2] * 4 + [3] * 5])
  packed = fwd(params, toks, seg)
  for row, bounds in ((0, [(0, 5), (5, 12)]), (1, [(0, 3), (3, 7), (7, 12)])):
    for s, e in bounds:
      alone = LM(cfg).apply({"params": params}, toks[row:row + 1, s:e])[0]
      np.testing.assert_allclose(packed[row, s:e], alone[0], rtol=1e-4, atol=1e-5)


def test_segment_positions():
  seg = jnp.array([[1, 1, 2, 2, 2, 3], [1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]])


def test_paper_gate_changes_outputs():
  cfg = preset("tiny", "mmfree", dtype="float32")
  params = nn.unbox(init_params(cfg, jax.random.key(0)))
  toks = jnp.arange(8)[None]
  code = LM(cfg).apply({"params": params}, toks)[0]
  # the paper gate has no g_norm: drop that parameter
  p2 = jax.tree.map(lambda x: x, params)
  del p2["layers"]["attn"]["g_norm"]
  paper = LM(cfg.replace(gate="paper")).apply({"params": p2}, toks)[0]
  assert float(jnp.abs(code - paper).max()) > 1e-3


@pytest.mark.parametrize("name,total", [("370M", 374_108_160), ("1.3B", 1_364_779_008),
                                        ("2.7B", 2_702_357_504)])
def test_param_counts_match_spec(name, total):
  assert param_counts(preset(name, "mmfree"))["total"] == total


def test_init_follows_spec():
  cfg = preset("370M", "mmfree", n_layers=2, vocab_size=512)
  p = nn.unbox(init_params(cfg, jax.random.key(0)))
  d = cfg.d_model
  bound = 2**-2.5 * math.sqrt(6 / (2 * d))
  for name in ("i_proj", "f_proj", "g_proj", "o_proj"):
    k = p["layers"]["attn"][name]["kernel"]
    assert k.shape == (2, d, d)
    assert float(jnp.abs(k).max()) <= bound
    assert float(jnp.std(k)) == pytest.approx(bound / math.sqrt(3), rel=0.02)
  assert float(jnp.std(p["embed"])) == pytest.approx(0.02, rel=0.02)
  assert float(jnp.std(p["layers"]["mlp"]["gate_proj"]["kernel"])) == pytest.approx(0.02, rel=0.02)
  assert float(jnp.std(p["layers"]["mlp"]["down_proj"]["kernel"])) == pytest.approx(
      0.02 / math.sqrt(2 * cfg.n_layers), rel=0.02)
  assert not np.any(p["lower_bounds"])
  np.testing.assert_array_equal(p["layers"]["attn"]["g_norm"]["scale"], 1.0)


def test_lower_bounds_layer0_zero_and_monotone():
  lb = lower_bounds(jax.random.normal(jax.random.key(0), (6, 4)))
  np.testing.assert_array_equal(lb[0], 0.0)
  assert bool(jnp.all(jnp.diff(lb, axis=0) >= 0)) and bool(jnp.all(lb < 1))


def test_every_param_has_logical_axes():
  for arch in ARCHS:
    boxed = init_params(preset("micro", arch), jax.random.key(0))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    for leaf in leaves:
      assert isinstance(leaf, nn.LogicallyPartitioned)
      assert len(leaf.names) == leaf.value.ndim


@pytest.mark.parametrize("arch", ARCHS)
def test_remat_policies_and_unrolled_layers_agree(arch):
  """Same loss and gradients (same parameter tree) for every remat policy, with the
  layer loop or unrolled."""
  toks = jax.random.randint(jax.random.key(1), (2, 8), 0, 100)
  results = []
  for remat, unroll in (("none", False), ("lean", False), ("lean_inputs", False),
                        ("full", False), ("lean", True)):
    cfg = preset("micro", arch, dtype="float32", remat=remat, unroll_layers=unroll)
    params = nn.unbox(init_params(cfg, jax.random.key(0)))
    loss = lambda p: jnp.mean(LM(cfg).apply({"params": p}, toks)[0] ** 2)
    results.append(jax.value_and_grad(loss)(params))
  for other in results[1:]:
    np.testing.assert_allclose(other[0], results[0][0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
                 other[1], results[0][1])


@pytest.mark.parametrize("arch,gate,kept", [
    ("mmfree", "code", 2), ("mmfree", "paper", 3), ("transformer", "code", 2)])
def test_lean_inputs_remat_keeps_each_projection_groups_input(arch, gate, kept, capsys):
  """remat="lean_inputs" saves, per layer, the projection groups' inputs that "lean"
  recomputes: the attn_norm and mlp_norm outputs and the MLGRU's gated output (with the
  paper's gate: the code's gate is formed inside o_proj from g and h, which "lean" keeps;
  attention's output is kept already), i.e. `kept` more [B, T, d] activations per layer,
  nothing else."""
  toks = jax.random.randint(jax.random.key(1), (2, 8), 0, 100)
  saved = {}
  for remat in ("lean", "lean_inputs"):
    cfg = preset("micro", arch, dtype="float32", remat=remat, gate=gate)
    params = nn.unbox(init_params(cfg, jax.random.key(0)))
    print_saved_residuals(lambda p: jnp.mean(LM(cfg).apply({"params": p}, toks)[0] ** 2), params)
    shapes = [line.split()[0] for line in capsys.readouterr().out.splitlines()
              if "from the argument" not in line]
    saved[remat] = sorted(shapes)
  extra = list(saved["lean_inputs"])
  for shape in saved["lean"]:
    extra.remove(shape)  # everything "lean" keeps is still kept
  assert extra == [f"f32[{cfg.n_layers},2,8,{cfg.d_model}]"] * kept


def test_bad_config_is_a_clear_error():
  with pytest.raises(ConfigError, match="arch"):
    preset("tiny", "rwkv")
  with pytest.raises(ConfigError, match="preset"):
    preset("7B")
  with pytest.raises(ConfigError, match="unroll_layers=False"):
    preset("tiny", remat="full", unroll_layers=True)
  with pytest.raises(ConfigError, match="unknown model config key"):
    from_dict({"d_modle": 3})


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_attention_with_packed_documents_matches_xla():
  """Packed documents under cuDNN attention (their mask applied as a bias on its causal
  mask): XLA attention's logits and gradients within bf16 rounding; the logits far closer
  than they would be with the documents' mask dropped."""
  toks = jax.random.randint(jax.random.key(1), (2, 128), 0, 100)
  seg = jnp.repeat(jnp.array([[1, 2], [1, 1]]), jnp.array([50, 78]), axis=1, total_repeat_length=128)
  logits, grads = {}, {}
  for impl in ("xla", "cudnn"):
    cfg = preset("tiny", "transformer", attention_impl=impl)
    params = nn.unbox(init_params(cfg, jax.random.key(0)))
    fwd = jax.jit(lambda p, s, cfg=cfg: LM(cfg).apply({"params": p}, toks, s)[0])
    logits[impl] = fwd(params, seg)
    grads[impl] = jax.jit(jax.grad(lambda p, fwd=fwd: jnp.mean(fwd(p, seg) ** 2)))(params)
  leak = float(jnp.abs(fwd(params, None) - logits["cudnn"])[0, 50:].max())
  err = float(jnp.abs(logits["cudnn"] - logits["xla"]).max())
  assert err < leak / 4, (err, leak)
  # bf16: single elements differ by up to ~3% of a leaf's largest (H100, 2026-12-05)
  rel = jax.tree.map(lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)),
                     grads["cudnn"], grads["xla"])
  assert max(jax.tree.leaves(rel)) < 5e-2, rel


@pytest.mark.parametrize("impl,platform,seq_len,dtype,expect", [
    ("auto", "gpu", 2048, "bfloat16", "cudnn"), ("auto", "gpu", 2048, "float32", "xla"),
    ("auto", "tpu", 2048, "bfloat16", "splash"), ("auto", "tpu", 2048, "float32", "splash"),
    ("auto", "cpu", 2048, "bfloat16", "xla"), ("auto", "tpu", 100, "bfloat16", "xla"),
    ("auto", "tpu", 1, "bfloat16", "xla"), ("splash", "tpu", 384, "bfloat16", "splash"),
    ("splash", "tpu", 1, "bfloat16", "xla"), ("cudnn", "gpu", 1, "float16", "cudnn"),
    ("xla", "gpu", 2048, "bfloat16", "xla"), ("xla", "tpu", 2048, "bfloat16", "xla"),
])
def test_attention_impl_resolves_per_platform(impl, platform, seq_len, dtype, expect):
  assert impl in ATTENTION_IMPLS
  assert attention.resolve_impl(impl, platform, seq_len, dtype) == expect


@pytest.mark.parametrize("impl,platform,dtype,match", [
    ("cudnn", "tpu", "bfloat16", "runs only on CUDA GPUs, not on tpu"),
    ("cudnn", "cpu", "bfloat16", "runs only on CUDA GPUs, not on cpu"),
    ("splash", "gpu", "bfloat16", "runs only on TPUs, not on gpu"),
    ("splash", "cpu", "float32", "runs only on TPUs, not on cpu"),
    ("cudnn", "gpu", "float32", "computes in bfloat16 or float16, not in model.dtype=float32"),
])
def test_attention_kernel_where_it_cannot_run_is_a_one_line_config_error(impl, platform, dtype,
                                                                        match):
  with pytest.raises(ConfigError, match=match) as e:
    attention.resolve_impl(impl, platform, 2048, dtype)
  assert "\n" not in str(e.value)


def test_unknown_attention_impl_is_a_config_error():
  with pytest.raises(ConfigError, match="attention_impl='flash' is unknown"):
    preset("tiny", "transformer", attention_impl="flash")


@pytest.mark.parametrize("packed", [True, False])
def test_splash_attention_matches_xla_with_packed_documents(packed):
  """The TPU splash kernel (interpreted on CPU, under an 8-device batch x heads mesh):
  XLA's causal attention inside each document, forward and gradients, to float32 rounding."""
  b, t, n, h = 8, 128, 2, 16
  q, k, v = (jax.random.normal(key, (b, t, n, h)) for key in jax.random.split(jax.random.key(0), 3))
  seg = jnp.repeat(jnp.array([1, 2], jnp.int32), jnp.array([50, 78]), total_repeat_length=t)
  seg = jnp.broadcast_to(seg, (b, t)) if packed else None
  cot = jax.random.normal(jax.random.key(1), (b, t, n, h))
  runs = {}
  mesh = multihost.make_mesh({"data": 4, "tensor": 2}, jax.devices())
  for name, fn in (("splash", lambda *a: attention.splash_attention(*a, interpret=True)),
                   ("xla", lambda *a: attention._training_attention(*a, "xla"))):
    with jax.set_mesh(mesh):
      out, vjp = jax.vjp(lambda q, k, v, fn=fn: fn(q, k, v, seg), q, k, v)
      runs[name] = (out, *vjp(cot))
  for a, b in zip(runs["splash"], runs["xla"]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
