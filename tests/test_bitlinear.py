"""Quantizers and BitLinear: exact values, STE gradients, lean == naive."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfree_jax import sharding
from mmfree_jax.config import preset
from mmfree_jax.layers import bitlinear as bl
from mmfree_jax.layers import gates, quant
from mmfree_jax.layers import bitlinear_pallas
from mmfree_jax.models import LM, init_params


def test_activation_quant_ties_away_from_zero_and_zero_rows():
  y = jnp.array([[127.0, 63.5, -63.5, 0.5, -0.5, 1.5, 2.5, -2.5],
                 [0.0] * 8])
  q, s = quant.activation_codes(y)
  np.testing.assert_array_equal(q[0], [127, 64, -64, 1, -1, 2, 3, -3])
  np.testing.assert_allclose(s[:, 0], [1.0, 127.0 / 1e-5], rtol=1e-7)
  np.testing.assert_array_equal(quant.activation_quant(y)[1], np.zeros(8))
  # per-token scale: each row scaled by its own absmax
  y2 = jnp.array([[2.0, -1.0, 0.01], [0.5, 0.25, -0.125]])
  expect = np.array([[127, -64, 1], [127, 64, -32]]) / (127.0 / np.array([[2.0], [0.5]]))
  np.testing.assert_allclose(quant.activation_quant(y2), expect, rtol=1e-6)


def test_weight_quant_ties_to_even_per_tensor_scale():
  w = jnp.array([[1.5, -0.5, 0.5], [2.5, -1.0, 0.0]])  # mean|w| = 1; +-0.5 ties -> 0
  t, g = quant.weight_codes(w)
  assert float(g) == 1.0
  np.testing.assert_array_equal(t, [[1, 0, 0], [1, -1, 0]])
  np.testing.assert_array_equal(quant.weight_quant(w), t)
  w2 = jnp.array([[0.3, -0.1], [0.05, 0.15]])  # g = 0.15; w/g = 2, -2/3, 1/3, 1
  np.testing.assert_allclose(quant.weight_quant(w2), np.array([[1, -1], [0, 1]]) * 0.15, rtol=1e-6)
  t0, g0 = quant.weight_codes(jnp.zeros((3, 3)))
  assert float(g0) == pytest.approx(1e-5) and not np.any(t0)


def test_round_half_away():
  x = jnp.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, -0.51])
  np.testing.assert_array_equal(quant.round_half_away(x), [-3, -2, -1, 1, 2, 3, 0, -1])


def _inputs(k=48, n=40, shape=(3, 5)):
  kx, kn, kw, kc = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(kx, shape + (k,)) * 3
  norm_w = 1 + 0.1 * jax.random.normal(kn, (k,))
  w = jax.random.normal(kw, (k, n)) * 0.02
  c = jax.random.normal(kc, shape + (n,))
  return x, norm_w, w, c


def test_ste_gradients_are_identity_through_quantizers():
  x, norm_w, w, c = _inputs()
  loss = lambda x, nw, w: jnp.sum(c * bl.bitlinear_naive(x, nw, w, 1e-8, jnp.float32))
  gx, gn, gw = jax.grad(loss, argnums=(0, 1, 2))(x, norm_w, w)
  # Reference in float64 NumPy: the forward uses quantized values, the backward
  # treats both quantizers as identity.
  x64, nw64, w64, c64 = (np.asarray(a, np.float64) for a in (x, norm_w, w, c))
  rstd = 1 / np.sqrt(np.mean(x64**2, -1, keepdims=True) + 1e-8)
  xhat = x64 * rstd
  y = xhat * nw64
  s = 127 / np.maximum(np.abs(y).max(-1, keepdims=True), 1e-5)
  yq = np.clip(np.sign(y * s) * np.floor(np.abs(y * s) + 0.5), -128, 127) / s
  g = max(np.abs(w64).mean(), 1e-5)
  wq = np.clip(np.round(w64 / g), -1, 1) * g
  np.testing.assert_allclose(gw, np.einsum("abk,abn->kn", yq, c64), rtol=2e-5, atol=1e-6)
  dy = c64 @ wq.T
  np.testing.assert_allclose(gn, np.sum(dy * xhat, axis=(0, 1)), rtol=2e-5, atol=1e-6)
  dxhat = dy * nw64
  dx = rstd * (dxhat - xhat * np.mean(dxhat * xhat, -1, keepdims=True))
  np.testing.assert_allclose(gx, dx, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lean_equals_naive(dtype):
  x, norm_w, w, c = _inputs()
  outs = {}
  for name, fn in (("lean", bl.bitlinear), ("naive", bl.bitlinear_naive)):
    f = lambda x, nw, w: fn(x, nw, w, 1e-8, dtype, jnp.float32)
    out, vjp = jax.vjp(f, x, norm_w, w)
    outs[name] = (out,) + vjp(c.astype(jnp.float32))
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  for a, b in zip(outs["lean"], outs["naive"]):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


def test_lean_saves_only_the_input():
  """The lean vjp keeps x and the params, not the normalized or quantized activations."""
  x, norm_w, w, _ = _inputs(k=64, n=32, shape=(4, 8))
  def saved_bytes(fn):
    res = jax.vjp(lambda x: fn(x, norm_w, w, 1e-8, jnp.float32), x)[1]
    return sum(a.nbytes for a in jax.tree.leaves(res) if hasattr(a, "nbytes"))
  lean, naive = saved_bytes(bl.bitlinear), saved_bytes(bl.bitlinear_naive)
  assert lean <= x.nbytes + norm_w.nbytes + w.nbytes
  assert naive > lean


def _group_inputs(k, rows, n, form, dtype=jnp.bfloat16):
  """The kernels' inputs in `form` (as `bitlinear_pallas` takes them), n norm weights and
  n cotangents."""
  keys = jax.random.split(jax.random.key(1), 4)
  if form == "glu":  # the gate/up matmul's output: p [rows, 2k] (integers) and row scales r
    p = jnp.round(jax.random.normal(keys[0], (rows, 2 * k)) * 300).astype(dtype)
    xs = (p, jax.random.uniform(keys[1], (rows, 1), minval=0.002, maxval=0.01))
  elif form == "gate":  # the MLGRU's g and h, and the g-norm weight [1, k]
    g, h = (jax.random.normal(kk, (rows, k)) * 2 for kk in jax.random.split(keys[0]))
    xs = (g.astype(dtype), h.astype(dtype), 1 + 0.1 * jax.random.normal(keys[1], (1, k)))
  else:
    xs = ((jax.random.normal(keys[0], (rows, k)) * 2).astype(dtype),)
  norm_w = 1 + 0.1 * jax.random.normal(keys[2], (n, k))
  dys = tuple(jax.random.normal(jax.random.fold_in(keys[3], j), (rows, k)).astype(dtype)
              for j in range(n))
  return xs, norm_w, dys


def test_unknown_input_form_is_a_clear_error():
  with pytest.raises(ValueError, match=r"input form 'nope' is unknown; use one of \('x', 'glu', 'gate'\)"):
    bitlinear_pallas.split_input((jnp.ones((4, 8)),), "nope")


def test_column_pieces_cover_the_row():
  """A row's pieces are contiguous power-of-two tiles from column 0 covering K (past K
  only in the last one, by < 16 columns unless `most` merged the tail into one tile)."""
  assert bitlinear_pallas._pieces(5632, 8) == ((0, 4096), (4096, 1024), (5120, 512))
  assert bitlinear_pallas._pieces(5632, 2) == ((0, 4096), (4096, 2048))
  assert bitlinear_pallas._pieces(5632, 1) == ((0, 8192),)
  for k in (16, 80, 100, 1000, 1024, 2816, 5632):
    for most in (1, 2, 3, 8):
      pieces = bitlinear_pallas._pieces(k, most)
      offsets = [0] + [off + w for off, w in pieces]
      assert [off for off, _ in pieces] == offsets[:-1] and len(pieces) <= most
      assert all(w & (w - 1) == 0 and w >= 16 for _, w in pieces)
      assert k <= offsets[-1] and (offsets[-1] - k < 16 or pieces[-1][1] < 2 * (k - pieces[-1][0]))


def test_backward_warps_follow_the_h200_sweeps():
  """`warps_for` picks the fastest warps of the H200 backward sweeps (BENCHMARKS.md): one
  projection or the GLU at <= 24 columns per thread, f/i/g (n = 3) at <= 8."""
  best = {(1024, 1): 4, (2048, 1): 4, (2816, 1): 4, (5632, 1): 8, (1024, 3): 4, (2048, 3): 8}
  assert {kn: bitlinear_pallas.warps_for(*kn) for kn in best} == best


@pytest.mark.parametrize("k,n,form,dtype", [
    (64, 1, "x", jnp.int8), (96, 3, "x", jnp.int8), (96, 1, "x", jnp.bfloat16),
    (80, 1, "glu", jnp.bfloat16), (100, 1, "glu", jnp.int8), (80, 1, "gate", jnp.int8),
    (100, 1, "gate", jnp.bfloat16)])
def test_pallas_prologue_matches_xla(k, n, form, dtype):
  """The fused norm + int8 kernel (interpret mode on CPU) gives the XLA codes and scales,
  for groups of projections, the GLU pair input and the MLGRU's gated output."""
  xs, norm_w, _ = _group_inputs(k, 8, n, form)
  rows_in, aux = bitlinear_pallas.split_input(xs, form)
  ref, _ = bl.xla_codes(bl.Rows(tuple(rows_in)), bl.Shared(norm_w, aux=tuple(aux)), eps=1e-8,
                        x_dtype=jnp.bfloat16, form=form, in_eps=1e-6)
  codes = lambda rows: jax.tree.leaves(bitlinear_pallas.activation_codes(
      xs, norm_w, 1e-8, dtype, form, rows=rows, interpret=True, in_eps=1e-6))
  for a, b in zip(codes(2) + codes(8), codes(1) * 2):  # the tile does not change the result
    np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=1e-6)
  qs, ss = bitlinear_pallas.activation_codes(xs, norm_w, 1e-8, dtype, form, interpret=True,
                                             in_eps=1e-6)
  assert len(qs) == len(ss) == n
  for q, q_ref in zip(qs, ref[:n]):
    assert q.dtype == dtype and q_ref.dtype == jnp.int8 and q.shape == (8, k)
    if form != "x":  # exp in the kernel vs XLA's logistic can move the bf16 product by an ulp
      diff = np.abs(np.float32(q) - np.float32(q_ref))
      assert diff.max() <= 1 and np.mean(diff > 0) < 0.03
    else:
      np.testing.assert_array_equal(np.float32(q), np.float32(q_ref))
  for s, s_ref in zip(ss, ref[n:]):  # formed inputs off CPU: the max can move by a bf16 ulp
    exact = form == "x" or jax.default_backend() == "cpu"
    np.testing.assert_allclose(s, s_ref, rtol=1e-6 if exact else 1e-2)


@pytest.mark.parametrize("k,rows,n,form", [(64, 64, 1, "x"), (96, 48, 3, "x"), (80, 64, 1, "glu"),
                                          (112, 32, 2, "x"), (80, 64, 1, "gate"),
                                          (100, 32, 1, "gate")])
def test_pallas_backward_matches_xla(k, rows, n, form):
  """The backward kernel (interpret mode) gives the XLA expression's input gradients (of
  x, of gate | up, or of g and h), fake-quantized activations and per-block partial sums
  of the norm-weight gradients (and the g-norm weight's), whatever the tile."""
  xs, norm_w, dys = _group_inputs(k, rows, n, form)
  wg = norm_w * jnp.linspace(0.5, 1.5, n)[:, None]
  rows_in, aux = bitlinear_pallas.split_input(xs, form)
  ref_rows, ref_parts = bl.xla_backward(bl.Rows(tuple(rows_in), tuple(dys)),
                                        bl.Shared(norm_w, wg, tuple(aux)), eps=1e-8, form=form,
                                        in_eps=1e-6)
  # On CPU the kernel's silu and the formed input's rounding match XLA's; elsewhere (GPU)
  # the input can move by a bf16 ulp, which the norm-weight sums carry at that size.
  exact = form == "x" or jax.default_backend() == "cpu"
  tol, part_tol = (1e-2, 1e-5) if exact else (3e-2, 3e-2)
  nd = 2 if form == "gate" else 1
  for tile in (1, 4):
    dxs, yqs, parts = bitlinear_pallas.backward(xs, dys, norm_w, wg, 1e-8, form, rows=tile,
                                                interpret=True, in_eps=1e-6)
    assert [dx.shape for dx in dxs] == [x.shape for x in xs[:nd]] and len(yqs) == n
    assert len(parts) == n + (form == "gate")
    assert parts[0].shape == (rows // bitlinear_pallas.block_rows(rows), k)
    for a, b in zip([*dxs, *yqs], ref_rows):
      assert a.dtype == b.dtype == jnp.bfloat16
      np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tol,
                                 atol=tol * np.abs(np.float32(b)).max())
    for a, b in zip(parts, ref_parts):
      np.testing.assert_allclose(a, b, rtol=part_tol, atol=part_tol * np.abs(b).max())


def _grads(f, args, cot):
  out, vjp = jax.vjp(f, *args)
  return out, vjp(cot)


def test_shared_input_group_equals_separate_bitlinears():
  """bitlinear_shared == one bitlinear per projection: outputs and all gradients."""
  x, _, _, c = _inputs()
  keys = jax.random.split(jax.random.key(2), 6)
  nws = tuple(1 + 0.1 * jax.random.normal(kk, (48,)) for kk in keys[:3])
  ws = tuple(0.02 * jax.random.normal(kk, (48, 40)) for kk in keys[3:])
  cots = tuple(c * (j + 1) for j in range(3))
  group = lambda x, nws, ws: bl.bitlinear_shared(x, nws, ws, 1e-8, jnp.float32, jnp.float32)
  apart = lambda x, nws, ws: tuple(bl.bitlinear(x, nw, w, 1e-8, jnp.float32, jnp.float32)
                                   for nw, w in zip(nws, ws))
  out_g, grads_g = _grads(group, (x, nws, ws), cots)
  out_a, grads_a = _grads(apart, (x, nws, ws), cots)
  for a, b in zip(jax.tree.leaves((out_g, grads_g)), jax.tree.leaves((out_a, grads_a))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def _glu_params(d=48, i=40):
  keys = jax.random.split(jax.random.key(5), 4)
  return (1 + 0.1 * jax.random.normal(keys[0], (d,)), 0.05 * jax.random.normal(keys[1], (d, 2 * i)),
          1 + 0.1 * jax.random.normal(keys[2], (i,)), 0.05 * jax.random.normal(keys[3], (i, d)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_glu_mlp_equals_two_bitlinears(dtype):
  """glu_mlp (one custom_vjp: halves, product and their gradients formed in the down
  projection's kernels) == bitlinear(glu_input(halves of bitlinear(x))): outputs and the
  gradients of x and all four parameters, bit for bit; and close to plain autodiff
  through the straight-through estimators."""
  x, _, _, c = _inputs(n=48)
  params = _glu_params()
  fused = lambda x, *p: bl.glu_mlp(x, *p, 1e-8, dtype, jnp.float32)
  apart = lambda x, *p: bl.glu_mlp_reference(x, *p, 1e-8, dtype, jnp.float32)
  naive = lambda x, *p: bl.glu_mlp_reference(x, *p, 1e-8, dtype, jnp.float32,
                                             fn=bl.bitlinear_naive)
  out_f, grads_f = _grads(fused, (x, *params), c)
  out_a, grads_a = _grads(apart, (x, *params), c)
  out_n, grads_n = _grads(naive, (x, *params), c)
  assert len(grads_f) == 5
  tol = 1e-4 if dtype == jnp.float32 else 3e-2
  for a, b, ref in zip((out_f, *grads_f), (out_a, *grads_a), (out_n, *grads_n)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, ref, rtol=tol, atol=tol * np.abs(ref).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gated_bitlinear_equals_bitlinear_of_the_gated_input(dtype):
  """gated_bitlinear (the MLGRU's output gate formed in o_proj's kernels, its backward
  written out) == bitlinear(gated_input(g, h)) with autodiff through the gate: the output
  bit for bit, the gradients of g, h and the three weights up to float32 summation order;
  and gated_input is RMSNorm(g) * w * silu(h) rounded to the compute dtype."""
  g, norm_w, w, c = _inputs()
  h = jnp.flip(g, -1) * 0.7 + 0.3
  gnorm_w = 1 + 0.1 * jax.random.normal(jax.random.key(7), (48,))
  fused = lambda g, h, gw, nw, w: bl.gated_bitlinear(g, h, gw, nw, w, 1e-6, 1e-8, dtype,
                                                     jnp.float32)
  apart = lambda g, h, gw, nw, w: bl.bitlinear(gates.gated_input(g, h, gw, 1e-6, dtype), nw, w, 1e-8,
                                               dtype, jnp.float32)
  out_f, grads_f = _grads(fused, (g, h, gnorm_w, norm_w, w), c)
  out_a, grads_a = _grads(apart, (g, h, gnorm_w, norm_w, w), c)
  np.testing.assert_array_equal(out_f, out_a)
  assert len(grads_f) == 5
  for a, b in zip(grads_f, grads_a):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
  ghat = g * jax.lax.rsqrt(jnp.mean(g * g, -1, keepdims=True) + 1e-6)
  want = (ghat * gnorm_w * h * jax.nn.sigmoid(h)).astype(dtype)
  np.testing.assert_allclose(np.float32(gates.gated_input(g, h, gnorm_w, 1e-6, dtype)),
                             np.float32(want), rtol=1e-6 if dtype == jnp.float32 else 1e-2)


def test_gated_bitlinear_runs_on_each_devices_rows_under_a_data_mesh():
  """Under an 8-device data mesh the dispatch runs per device (`sharding.cuda_kernel`: the
  g-norm weight replicated, the per-block partial sums concatenated over devices): the
  same output and gradients as on one device (up to a code that float32 summation order
  moves across a rounding boundary: a row of the gradients moves with it)."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  keys = jax.random.split(jax.random.key(8), 3)
  g, h = (jax.random.normal(kk, (16, 32, 48)) for kk in keys[:2])  # 512 rows: the kernel path
  _, norm_w, w, _ = _inputs()
  gnorm_w = 1 + 0.1 * jax.random.normal(keys[2], (48,))
  loss = lambda *a: jnp.sum(bl.gated_bitlinear(*a, 1e-6, 1e-8, jnp.float32, jnp.float32,
                                               "pallas") ** 2)
  run = jax.jit(jax.value_and_grad(loss, argnums=range(5)))
  want = run(g, h, gnorm_w, norm_w, w)
  mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  with jax.set_mesh(mesh):
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    assert "shard_map" in str(jax.make_jaxpr(run)(g, h, gnorm_w, norm_w, w))
    got = run(jax.device_put(g, rows), jax.device_put(h, rows), gnorm_w, norm_w, w)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    if a.ndim == 3:  # dg, dh: all but the moved row's elements as on one device
      assert np.mean(np.isclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())) > 0.99
    np.testing.assert_allclose(a, b, rtol=3e-2, atol=3e-2 * np.abs(b).max())


def test_glu_mlp_lean_remat_keeps_the_product_and_recomputes_no_matmul(capsys):
  """Under the "lean" policy (save only "proj") glu_mlp's backward keeps x, the params and
  the gate/up matmul's product p [..., 2I] and row scale r [..., 1]: as many matmuls as
  without remat; with nothing saved the forward matmuls run again."""
  x, _, _, c = _inputs(n=48)
  params = _glu_params()
  f = lambda x, *p: jnp.vdot(bl.glu_mlp(x, *p, 1e-8, jnp.float32, jnp.float32), c)
  lean = jax.checkpoint(f, policy=jax.checkpoint_policies.save_only_these_names("proj"))
  jax.ad_checkpoint.print_saved_residuals(lean, x, *params)
  saved = [line for line in capsys.readouterr().out.splitlines() if "constant" not in line]
  assert sorted(line.split()[0] for line in saved) == sorted(
      ["f32[3,5,48]", "f32[48]", "f32[48,80]", "f32[40]", "f32[40,48]", "f32[3,5,80]",
       "f32[3,5,1]"])
  assert sorted(line.split()[0] for line in saved if "named 'proj'" in line) == [
      "f32[3,5,1]", "f32[3,5,80]"]
  def dots(fn):
    return str(jax.make_jaxpr(jax.grad(fn, argnums=range(5)))(x, *params)).count("dot_general")
  nothing = jax.checkpoint(f, policy=jax.checkpoint_policies.nothing_saveable)
  assert dots(lean) == dots(f) < dots(nothing)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="Pallas GPU kernel needs a GPU")
@pytest.mark.parametrize("group", ["one", "shared", "glu", "gate"])
def test_pallas_bitlinear_on_gpu_matches_xla(group):
  """On the GPU: same outputs and gradients as the XLA path (codes may differ by one step
  where float32 summation order moves an activation across a rounding boundary: a few
  elements of a weight gradient move by that code's share)."""
  x, norm_w, w, c = _inputs(k=2816, n=256, shape=(4, 64))
  fns = {
      "one": lambda x, nw, w, impl: bl.bitlinear(x, nw, w, 1e-8, jnp.float32, jnp.float32, impl),
      "shared": lambda x, nw, w, impl: bl.bitlinear_shared(
          x, (nw, 1.1 * nw), (w, -w), 1e-8, jnp.float32, jnp.float32, impl),
      "glu": lambda x, nw, w, impl: bl.glu_mlp(  # intermediate 112: pieces of 64, 32, 16
          x, nw, w[:, :224], 1.1 * nw[:112], w[:112], 1e-8, jnp.float32, jnp.float32, impl),
      "gate": lambda x, nw, w, impl: bl.gated_bitlinear(  # g = x, h = x reversed
          x, jnp.flip(x, -1), 1.1 * nw, nw, w, 1e-6, 1e-8, jnp.float32, jnp.float32, impl)}
  cot = (c, 2 * c) if group == "shared" else c
  runs = {}
  for impl in ("xla", "pallas"):
    f = jax.jit(lambda x, nw, w: fns[group](x, nw, w, impl))
    if impl == "pallas":
      assert "bitlinear_act_codes" in f.lower(x, norm_w, w).as_text()
      grad = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.stack(jax.tree.leaves(f(*a))))))
      assert "bitlinear_bwd" in grad.lower(x, norm_w, w).as_text()
    runs[impl] = _grads(f, (x, norm_w, w), cot)
  for a, b in zip(jax.tree.leaves(runs["pallas"]), jax.tree.leaves(runs["xla"])):
    # With the GLU, the kernel's silu can also move the bf16 product by an ulp; where that
    # moves a row's absmax, the row's scale and codes move by ~1% (a few rows). The gate's
    # silu and g norm likewise.
    close, tol = (0.99, 3e-2) if group in ("glu", "gate") else (0.999, 1e-2)
    assert np.mean(np.isclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(b).max())) > close
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_int8_code_matmul_equals_the_compute_dtype_matmul(dtype):
  """The CUDA and TPU branches (int8 x int8 -> int32, rounded to dtype; CUDA with the
  weights as [N, K]) give bit for bit what the other platforms' dtype matmul with float32
  accumulation gives, at K = 5632 (the 1.3B down projection) with extreme codes; and only
  the CUDA and TPU programs multiply int8."""
  keys = jax.random.split(jax.random.key(3), 2)
  q = jax.random.randint(keys[0], (2, 8, 5632), -128, 128).astype(jnp.int8)
  q = q.at[0, 0].set(127)  # a row of +127 against a column of +1: the largest sum
  t = jax.random.randint(keys[1], (5632, 24), -1, 2).astype(jnp.float32).at[:, 0].set(1.0)
  ref = np.float32(bl._mm(q, t, dtype, out=dtype))
  for weights_nk in (True, False):
    int8 = bl._int8_matmul(q, t, dtype, weights_nk)
    assert int8.dtype == dtype and float(int8[0, 0, 0]) == float(jnp.asarray(127 * 5632, dtype))
    np.testing.assert_array_equal(np.float32(int8), ref)
  np.testing.assert_array_equal(np.float32(bl.code_matmul(q, t, dtype)), ref)
  traced = jax.jit(bl.code_matmul, static_argnums=2).trace(q, t, dtype)
  dots = {p: [line for line in traced.lower(lowering_platforms=(p,)).as_text().splitlines()
              if "dot_general" in line] for p in ("cuda", "tpu", "cpu")}
  assert len(dots["cuda"]) == len(dots["tpu"]) == len(dots["cpu"]) == 1
  assert "tensor<24x5632xi8>) -> tensor<2x8x24xi32>" in dots["cuda"][0]
  assert "tensor<5632x24xi8>) -> tensor<2x8x24xi32>" in dots["tpu"][0]
  assert "xi8" not in dots["cpu"][0]


def test_int8_forward_matmuls_give_the_model_the_same_numbers(monkeypatch):
  """A bf16 MatMul-free model with every BitLinear forward matmul on int8 codes (the TPU
  program's, run here on CPU) gives the loss and gradients of the bf16 matmuls bit for bit."""
  cfg = preset("micro", dtype="bfloat16", bitlinear_impl="xla", scan_impl="sequential",
               vocab_size=256, n_layers=1)
  params = jax.jit(lambda k: nn.unbox(init_params(cfg, k)))(jax.random.key(0))
  toks = jax.random.randint(jax.random.key(1), (2, 64), 0, cfg.vocab_size)
  loss = lambda p: jnp.mean(LM(cfg).apply({"params": p}, toks)[0].astype(jnp.float32) ** 2)
  runs = {}
  for name, matmul in (("bf16", bl.code_matmul), ("int8", bl._int8_matmul)):
    monkeypatch.setattr(bl, "code_matmul", matmul)
    lowered = jax.jit(jax.value_and_grad(loss)).lower(params)
    runs[name] = lowered.compile()(params)
    int8_dots = [line for line in lowered.as_text().splitlines()
                 if "dot_general" in line and "xi8>) -> tensor<" in line]
    assert bool(int8_dots) == (name == "int8")
  for a, b in zip(jax.tree.leaves(runs["int8"]), jax.tree.leaves(runs["bf16"])):
    np.testing.assert_array_equal(np.float32(a), np.float32(b))


def test_pallas_kernel_is_used_for_training_shapes_not_decode_steps():
  """impl="pallas" puts the kernels in the program (their CUDA branch) for >= KERNEL_MIN_ROWS
  tokens; a decode step's few rows keep the XLA expression."""
  _, norm_w, w, _ = _inputs(k=64, n=32)
  for rows, expect in ((bl.KERNEL_MIN_ROWS, True), (4, False)):
    x = jnp.ones((rows, 1, 64))
    f = lambda x: jnp.sum(bl.bitlinear(x, norm_w, w, 1e-8, jnp.float32, None, "pallas"))
    jaxpr = str(jax.make_jaxpr(jax.grad(f))(x))
    assert ("bitlinear_act_codes" in jaxpr) == expect
    assert ("bitlinear_bwd" in jaxpr) == expect
