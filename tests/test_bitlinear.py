"""Quantizers and BitLinear: exact values, STE gradients, lean == naive."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfree_jax.layers import bitlinear as bl
from mmfree_jax.layers import bitlinear_pallas


def test_activation_quant_ties_away_from_zero_and_zero_rows():
  y = jnp.array([[127.0, 63.5, -63.5, 0.5, -0.5, 1.5, 2.5, -2.5],
                 [0.0] * 8])
  q, s = bl.activation_codes(y)
  np.testing.assert_array_equal(q[0], [127, 64, -64, 1, -1, 2, 3, -3])
  np.testing.assert_allclose(s[:, 0], [1.0, 127.0 / 1e-5], rtol=1e-7)
  np.testing.assert_array_equal(bl.activation_quant(y)[1], np.zeros(8))
  # per-token scale: each row scaled by its own absmax
  y2 = jnp.array([[2.0, -1.0, 0.01], [0.5, 0.25, -0.125]])
  expect = np.array([[127, -64, 1], [127, 64, -32]]) / (127.0 / np.array([[2.0], [0.5]]))
  np.testing.assert_allclose(bl.activation_quant(y2), expect, rtol=1e-6)


def test_weight_quant_ties_to_even_per_tensor_scale():
  w = jnp.array([[1.5, -0.5, 0.5], [2.5, -1.0, 0.0]])  # mean|w| = 1; +-0.5 ties -> 0
  t, g = bl.weight_codes(w)
  assert float(g) == 1.0
  np.testing.assert_array_equal(t, [[1, 0, 0], [1, -1, 0]])
  np.testing.assert_array_equal(bl.weight_quant(w), t)
  w2 = jnp.array([[0.3, -0.1], [0.05, 0.15]])  # g = 0.15; w/g = 2, -2/3, 1/3, 1
  np.testing.assert_allclose(bl.weight_quant(w2), np.array([[1, -1], [0, 1]]) * 0.15, rtol=1e-6)
  t0, g0 = bl.weight_codes(jnp.zeros((3, 3)))
  assert float(g0) == pytest.approx(1e-5) and not np.any(t0)


def test_round_half_away():
  x = jnp.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, -0.51])
  np.testing.assert_array_equal(bl.round_half_away(x), [-3, -2, -1, 1, 2, 3, 0, -1])


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


@pytest.mark.parametrize("fn", [bl.bitlinear, bl.bitlinear_naive])
def test_split_outputs_equal_slices_with_the_same_gradients(fn):
  """splits=2: the two halves of the one-matmul output; gradients as for the whole."""
  x, norm_w, w, c = _inputs()
  whole = lambda x, nw, w: fn(x, nw, w, 1e-8, jnp.float32, jnp.float32)
  halves = lambda x, nw, w: fn(x, nw, w, 1e-8, jnp.float32, jnp.float32, "xla", 2)
  out, vjp_whole = jax.vjp(whole, x, norm_w, w)
  (a, b), vjp_halves = jax.vjp(halves, x, norm_w, w)
  np.testing.assert_array_equal(jnp.concatenate([a, b], -1), out)
  for g1, g2 in zip(vjp_whole(c), vjp_halves(tuple(jnp.split(c, 2, axis=-1)))):
    np.testing.assert_allclose(g1, g2, rtol=1e-6, atol=1e-7 * np.abs(g1).max())


@pytest.mark.parametrize("k,dtype", [(64, jnp.int8), (96, jnp.int8), (96, jnp.bfloat16)])
def test_pallas_prologue_matches_xla(k, dtype):
  """The fused norm + int8 kernel (interpret mode on CPU) gives the XLA codes and scales."""
  x, norm_w, _, _ = _inputs(k=k, shape=(7,))
  x = x.astype(jnp.bfloat16)
  q, s, rstd = bitlinear_pallas.activation_codes(x, norm_w, 1e-8, dtype, interpret=True)
  q_ref, s_ref, rstd_ref = bl._xla_codes(x, norm_w, 1e-8, dtype)
  assert q.dtype == dtype and q.shape == x.shape
  np.testing.assert_array_equal(q, q_ref)
  np.testing.assert_allclose(s, s_ref, rtol=1e-6)
  np.testing.assert_allclose(rstd, rstd_ref, rtol=1e-6)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="Pallas GPU kernel needs a GPU")
def test_pallas_bitlinear_on_gpu_matches_xla():
  """On the GPU: same outputs and gradients as the XLA path (codes may differ by one step
  where float32 summation order moves an activation across a rounding boundary)."""
  x, norm_w, w, c = _inputs(k=2816, n=256, shape=(4, 64))
  runs = {}
  for impl in ("xla", "pallas"):
    f = jax.jit(lambda x, nw, w: bl.bitlinear(x, nw, w, 1e-8, jnp.float32, jnp.float32, impl))
    if impl == "pallas":
      assert "bitlinear_act_codes" in f.lower(x, norm_w, w).as_text()
    out, vjp = jax.vjp(f, x, norm_w, w)
    runs[impl] = (out,) + vjp(c)
  for a, b in zip(runs["pallas"], runs["xla"]):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(b).max())


def test_pallas_kernel_is_used_for_training_shapes_not_decode_steps():
  """impl="pallas" puts the kernel in the program (its CUDA branch) for >= KERNEL_MIN_ROWS
  tokens; a decode step's few rows keep the XLA expression."""
  _, norm_w, w, _ = _inputs(k=64, n=32)
  for rows, expect in ((bl.KERNEL_MIN_ROWS, True), (4, False)):
    x = jnp.ones((rows, 1, 64))
    jaxpr = jax.make_jaxpr(lambda x: bl.bitlinear(x, norm_w, w, 1e-8, jnp.float32, None, "pallas"))(x)
    assert ("bitlinear_act_codes" in str(jaxpr)) == expect
