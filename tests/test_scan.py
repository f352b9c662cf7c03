"""Every recurrence variant against a float64 NumPy loop, values and gradients."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfree_jax import sharding
from mmfree_jax.config import SCAN_IMPLS as IMPLS
from mmfree_jax.layers import mlgru_pallas, scan_pallas
from mmfree_jax.layers.gates import mlgru_gates
from mmfree_jax.layers.mlgru import mlgru_recurrence
from mmfree_jax.layers.scan import linear_recurrence


def np_recurrence(f, x, h0, resets):
  f = np.where(resets[..., None], 0.0, f) if resets is not None else f
  h = np.zeros_like(x)
  prev = np.zeros_like(x[:, 0]) if h0 is None else h0
  for t in range(x.shape[1]):
    prev = f[:, t] * prev + x[:, t]
    h[:, t] = prev
  return h


def np_recurrence_grads(f, x, h0, resets, dh):
  """Analytic float64 backward: g_t = dh_t + f'_{t+1} g_{t+1}."""
  fe = np.where(resets[..., None], 0.0, f) if resets is not None else f
  h = np_recurrence(f, x, h0, resets)
  g = np.zeros_like(x)
  nxt = np.zeros_like(x[:, 0])
  for t in reversed(range(x.shape[1])):
    fn = fe[:, t + 1] if t + 1 < x.shape[1] else 0.0
    nxt = dh[:, t] + fn * nxt
    g[:, t] = nxt
  hprev = np.concatenate([(np.zeros_like(x[:, :1]) if h0 is None else h0[:, None]), h[:, :-1]], 1)
  df = g * hprev
  if resets is not None:
    df = np.where(resets[..., None], 0.0, df)
  dh0 = None if h0 is None else fe[:, 0] * g[:, 0]
  return df, g, dh0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("with_resets", [False, True])
def test_recurrence_matches_numpy(impl, with_h0, with_resets):
  b, t, d = 2, 37, 5  # T not a multiple of the chunk
  rng = np.random.default_rng(0)
  f = rng.uniform(0.5, 1.0, (b, t, d)).astype(np.float32)
  x = rng.normal(size=(b, t, d)).astype(np.float32)
  h0 = rng.normal(size=(b, d)).astype(np.float32) if with_h0 else None
  resets = (rng.uniform(size=(b, t)) < 0.15) if with_resets else None
  if resets is not None:
    resets[:, 0] = False
  dh = rng.normal(size=(b, t, d)).astype(np.float32)

  def run(f, x, h0):
    return linear_recurrence(f, x, h0, None if resets is None else jnp.asarray(resets), impl, 8)

  (h, last), vjp = jax.vjp(run, f, x, h0)
  ref = np_recurrence(*(a.astype(np.float64) if a is not None else None for a in (f, x, h0)), resets)
  np.testing.assert_allclose(h, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(last, ref[:, -1], rtol=1e-5, atol=1e-5)
  grads = vjp((jnp.asarray(dh), jnp.zeros((b, d))))
  ref_g = np_recurrence_grads(f.astype(np.float64), x.astype(np.float64),
                              None if h0 is None else h0.astype(np.float64), resets,
                              dh.astype(np.float64))
  for got, want in zip(grads, ref_g):
    if want is not None:
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_unknown_impl_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown recurrence impl"):
    linear_recurrence(jnp.ones((1, 2, 1)), jnp.ones((1, 2, 1)), impl="fast")


@pytest.mark.parametrize("block_d,tile_t,chunk_t,t,groups", [
    (32, 8, 0, 37, 1), (64, 64, 0, 37, 1), (32, 64, 8, 40, 1), (16, 64, 20, 40, 1),
    (32, 4, 8, 40, 1), (16, 5, 20, 40, 1), (32, 4, 8, 40, 2), (16, 64, 20, 40, 4)])
def test_pallas_kernels_match_numpy(block_d, tile_t, chunk_t, t, groups):
  """The Pallas kernels (interpret mode on CPU): h, last state, df, dx, dh0 incl. dlast;
  whole-sequence programs, and time chunks (summaries, then each chunk from its
  predecessors' composed summaries), each chunk read in one tile or several, all batch
  rows at once or in groups of rows writing one output in turn."""
  b, d = 4, 64
  rng = np.random.default_rng(1)
  f = rng.uniform(0.5, 1.0, (b, t, d)).astype(np.float32)
  x = rng.normal(size=(b, t, d)).astype(np.float32)
  h0 = rng.normal(size=(b, d)).astype(np.float32)
  dh = rng.normal(size=(b, t, d)).astype(np.float32)
  dlast = rng.normal(size=(b, d)).astype(np.float32)
  kw = {"block_d": block_d, "tile_t": tile_t, "chunk_t": chunk_t, "groups": groups,
        "interpret": True}
  h, last = scan_pallas.forward(f, x, h0, **kw)
  want = np_recurrence(f.astype(np.float64), x.astype(np.float64), h0.astype(np.float64), None)
  np.testing.assert_allclose(h, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(last, want[:, -1], rtol=1e-5, atol=1e-5)
  df, dx, dh0 = scan_pallas.backward(f, h, dh, h0, dlast, **kw)
  dh_total = dh.astype(np.float64)
  dh_total[:, -1] += dlast
  wdf, wdx, wdh0 = np_recurrence_grads(f.astype(np.float64), x.astype(np.float64),
                                       h0.astype(np.float64), None, dh_total)
  for got, exp in ((df, wdf), (dx, wdx), (dh0, wdh0)):
    np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-4)


def test_chunk_tiles_and_groups_must_divide():
  f = jnp.ones((2, 16, 16))
  with pytest.raises(ValueError, match="tile_t=3 must divide chunk_t=8"):
    scan_pallas.forward(f, f, jnp.zeros((2, 16)), block_d=16, chunk_t=8, tile_t=3,
                        interpret=True)
  with pytest.raises(ValueError, match=r"groups=3 must divide the batch \(2 rows\)"):
    scan_pallas.backward(f, f, f, jnp.zeros((2, 16)), jnp.zeros((2, 16)), block_d=16,
                         chunk_t=8, groups=3, interpret=True)


def test_pallas_block_choice():
  assert scan_pallas.block_d_for(8, 1024) == 32 and scan_pallas.block_d_for(16, 2048) == 64
  assert scan_pallas.block_d_for(64, 96) == 32 and scan_pallas.block_d_for(1, 48) == 16
  assert scan_pallas.block_d_for(2, 5) is None  # falls back to the associative scan
  # Few lanes: time chunks (the longest of 256, 128, 64 giving >= 2), D in whole blocks.
  assert scan_pallas.kernel_for(8, 2048, 1024) == {"block_d": 64, "chunk_t": 256, "tile_t": 16}
  assert scan_pallas.kernel_for(8, 256, 1024) == {"block_d": 64, "chunk_t": 128, "tile_t": 16}
  assert scan_pallas.kernel_for(8, 192, 1024) == {"block_d": 64, "chunk_t": 64, "tile_t": 16}
  assert scan_pallas.kernel_for(16, 2048, 1024) == {"block_d": 32}
  assert scan_pallas.kernel_for(8, 64, 1024) == {"block_d": 32}
  assert scan_pallas.kernel_for(8, 2000, 1024) == {"block_d": 32}
  assert scan_pallas.kernel_for(1, 2048, 48) == {"block_d": 16}
  assert scan_pallas.kernel_for(2, 2048, 5) is None


def test_pallas_impl_falls_back_off_gpu():
  if jax.default_backend() == "gpu":
    pytest.skip("the fallback is what runs off GPU")
  rng = np.random.default_rng(2)
  f = jnp.asarray(rng.uniform(0.5, 1.0, (2, 19, 64)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(2, 19, 64)), jnp.float32)
  run = lambda impl: jax.value_and_grad(
      lambda f, x: jnp.sum(linear_recurrence(f, x, impl=impl)[0] ** 2), (0, 1))(f, x)
  for a, b in zip(jax.tree.leaves(run("pallas")), jax.tree.leaves(run("associative"))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="Pallas GPU kernels need a GPU")
@pytest.mark.parametrize("chunk_t,tile_t,groups", [(64, 16, 1), (256, 16, 1), (128, 32, 1),
                                                    (128, 16, 2), (256, 16, 4)])
def test_chunked_kernels_on_gpu_match_numpy(chunk_t, tile_t, groups):
  """The time-chunked kernels compiled for the GPU: h, last state and all gradients."""
  b, t, d = 4, 1024, 512
  rng = np.random.default_rng(4)
  f = rng.uniform(0.5, 1.0, (b, t, d)).astype(np.float32)
  x, dh = (rng.normal(size=(b, t, d)).astype(np.float32) for _ in range(2))
  h0, dlast = (rng.normal(size=(b, d)).astype(np.float32) for _ in range(2))
  kw = {"block_d": 32, "chunk_t": chunk_t, "tile_t": tile_t, "groups": groups}
  h, last = scan_pallas.forward(f, x, h0, **kw)
  want = np_recurrence(f.astype(np.float64), x.astype(np.float64), h0.astype(np.float64), None)
  np.testing.assert_allclose(h, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(last, want[:, -1], rtol=1e-4, atol=1e-4)
  dh_total = dh.astype(np.float64)
  dh_total[:, -1] += dlast
  exp = np_recurrence_grads(f.astype(np.float64), x.astype(np.float64), h0.astype(np.float64),
                            None, dh_total)
  for got, e in zip(scan_pallas.backward(f, h, dh, h0, dlast, **kw), exp):
    np.testing.assert_allclose(got, e, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="Pallas GPU kernels need a GPU")
@pytest.mark.parametrize("t", [301, 320])  # whole-sequence kernels; time-chunked kernels
def test_pallas_on_gpu_matches_numpy(t):
  b, d = 3, 128
  rng = np.random.default_rng(3)
  f = rng.uniform(0.5, 1.0, (b, t, d)).astype(np.float32)
  x = rng.normal(size=(b, t, d)).astype(np.float32)
  h0 = rng.normal(size=(b, d)).astype(np.float32)
  resets = rng.uniform(size=(b, t)) < 0.05
  resets[:, 0] = False
  dh = rng.normal(size=(b, t, d)).astype(np.float32)
  fn = jax.jit(lambda f, x, h0: linear_recurrence(f, x, h0, jnp.asarray(resets), "pallas")[0])
  assert "mlgru_scan_fwd" in fn.lower(f, x, h0).as_text()
  h, vjp = jax.vjp(fn, f, x, h0)
  np.testing.assert_allclose(h, np_recurrence(f, x, h0, resets), rtol=1e-5, atol=1e-5)
  for got, exp in zip(vjp(jnp.asarray(dh)), np_recurrence_grads(f, x, h0, resets, dh)):
    np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-4)


def test_pallas_kernel_is_used_for_sequences_not_decode_steps():
  chunked = {"mlgru_scan_fwd_summary", "mlgru_scan_fwd_chunks"}
  for t, expect in ((16, {"mlgru_scan_fwd"}), (128, chunked), (1, set())):
    f = x = jnp.ones((2, t, 64))
    jaxpr = str(jax.make_jaxpr(lambda f, x: linear_recurrence(f, x, impl="pallas"))(f, x))
    assert set(re.findall(r"mlgru_scan_fwd\w*", jaxpr)) == expect


def test_pallas_tiling_follows_each_devices_rows():
  """Under a data mesh the kernels see each device's rows: 16 rows over 8 devices are 2 per
  device, few enough lanes for the time-chunked kernels (16 x 1024 globally would not be)."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  f = x = jnp.ones((16, 128, 1024))
  run = lambda f, x: linear_recurrence(f, x, impl="pallas")
  with jax.set_mesh(sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})):
    jaxpr = str(jax.make_jaxpr(run)(f, x))
  assert set(re.findall(r"mlgru_scan_fwd\w*", jaxpr)) == {
      "mlgru_scan_fwd_summary", "mlgru_scan_fwd_chunks"}
  assert scan_pallas.kernel_for(16, 128, 1024) == {"block_d": 32}


def _gate_inputs(b, t, d, with_resets, seed=0):
  """bf16 forget/input projections, lower bounds, h0 and (optionally) document starts."""
  rng = np.random.default_rng(seed)
  fp, ip = (jnp.asarray(rng.normal(0.0, 2.0, (b, t, d)), jnp.bfloat16) for _ in range(2))
  lb = jnp.asarray(rng.uniform(0.0, 0.9, d), jnp.float32)
  h0 = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
  resets = None
  if with_resets:
    r = rng.uniform(size=(b, t)) < 0.15
    r[:, 0] = False
    resets = jnp.asarray(r)
  return fp, ip, lb, h0, resets


def _two_steps(fp, ip, lb, h0, resets, impl="associative"):
  f, x = mlgru_gates(fp, ip, lb, fp.dtype)
  return linear_recurrence(f, x, h0, resets, impl)


def _rel(got, want) -> float:
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-30))


@pytest.mark.parametrize("t,with_resets", [(24, False), (21, True), (1, False)])
def test_gate_kernels_match_the_two_steps(t, with_resets):
  """The gate-fused kernels (interpret mode) give `mlgru_gates` + `linear_recurrence` and
  their VJP: h, last state, d fp, d ip, d lb (per-row partial sums) and dh0."""
  fp, ip, lb, h0, resets = _gate_inputs(2, t, 32, with_resets)
  r = () if resets is None else (resets,)
  kw = {"block_d": 16, "tile_t": 8, "interpret": True}
  h, last = mlgru_pallas.gate_forward(fp, ip, lb, h0, *r, **kw)
  (want_h, want_last), vjp = jax.vjp(lambda *a: _two_steps(*a, resets), fp, ip, lb, h0)
  assert h.dtype == jnp.bfloat16 and _rel(h, want_h) < 1e-2 and _rel(last, want_last) < 1e-5
  rng = np.random.default_rng(1)
  dh = jnp.asarray(rng.normal(size=h.shape), jnp.bfloat16)
  dlast = jnp.asarray(rng.normal(size=last.shape), jnp.float32)
  dfp, dip, dlb, dh0 = mlgru_pallas.gate_backward(fp, ip, h, dh, lb, h0, dlast, *r, **kw)
  for got, want in zip((dfp, dip, dlb.sum(0), dh0), vjp((dh, dlast))):
    assert got.dtype == want.dtype and _rel(got, want) < 1e-2


@pytest.mark.parametrize("with_resets", [False, True])
def test_mlgru_recurrence_equals_the_two_steps(with_resets):
  """`mlgru_recurrence` (its custom_vjp, here with the XLA side of the kernel dispatch)
  equals the two steps in value and gradient."""
  fp, ip, lb, h0, resets = _gate_inputs(2, 40, 32, with_resets)

  def loss(fn):
    return lambda *a: jnp.sum(fn(*a, resets)[0].astype(jnp.float32) ** 2)
  got = jax.value_and_grad(loss(lambda *a: mlgru_recurrence(*a, impl="pallas")),
                           argnums=(0, 1, 2, 3))(fp, ip, lb, h0)
  want = jax.value_and_grad(loss(lambda *a: _two_steps(*a, impl="pallas")),
                            argnums=(0, 1, 2, 3))(fp, ip, lb, h0)
  assert float(got[0]) == float(want[0])
  for g, w in zip(got[1], want[1]):
    assert g.dtype == w.dtype and _rel(g, w) < 1e-5


def test_gate_kernels_run_where_the_whole_sequence_kernels_would():
  """Not for few lanes (the time-chunked kernels take f and x), decode steps or other impls;
  with or without document resets."""
  resets = jnp.zeros((2, 16), bool)
  for (b, t, d), impl, r, expect in (
      ((2, 16, 64), "pallas", None, True), ((2, 128, 64), "pallas", None, False),
      ((2, 1, 64), "pallas", None, False), ((2, 16, 64), "chunked", None, False),
      ((2, 16, 64), "pallas", resets, True), ((2, 16, 64), "chunked", resets, False)):
    fp = jnp.ones((b, t, d), jnp.bfloat16)
    run = lambda fp: mlgru_recurrence(fp, fp, jnp.zeros(d), None, r, impl=impl)
    jaxpr = str(jax.make_jaxpr(run)(fp))
    assert ("mlgru_gate_scan_fwd" in jaxpr) == expect, (b, t, d, impl, r is None)


def test_gate_kernel_tiling():
  """One channel per thread, 16 steps per tile (the H200 sweep); none where the time-chunked
  kernels run or no kernel does."""
  assert mlgru_pallas.gate_kernel_for(16, 2048, 2048) == {
      "block_d": 64, "num_warps": 2, "tile_t": 16}
  assert mlgru_pallas.gate_kernel_for(8, 2048, 2048) == {
      "block_d": 32, "num_warps": 1, "tile_t": 16}
  assert mlgru_pallas.gate_kernel_for(8, 2048, 1024) is None  # time chunks
  assert mlgru_pallas.gate_kernel_for(2, 16, 24) is None  # no kernel


def test_gate_kernels_follow_each_devices_rows():
  """16 x 1024 globally takes the gate kernels, but under a data mesh of 8 each device's 2
  rows are few enough for the time-chunked kernels: those run there, on f and x (two steps)."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  fp = jnp.ones((16, 128, 1024), jnp.bfloat16)
  loss = lambda fp: jnp.sum(mlgru_recurrence(fp, fp, jnp.zeros(1024), impl="pallas")[0])
  assert "mlgru_gate_scan_fwd" in str(jax.make_jaxpr(jax.grad(loss))(fp))
  with jax.set_mesh(sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})):
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(fp))
  assert set(re.findall(r"mlgru_\w*scan_\w+", jaxpr)) == {
      f"mlgru_scan_{d}_{k}" for d in ("fwd", "bwd") for k in ("summary", "chunks")}


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="Pallas GPU kernels need a GPU")
@pytest.mark.parametrize("b,t,with_resets", [(4, 301, False), (8, 2048, False), (4, 301, True)],
                         ids=["301", "2048", "resets"])
def test_gate_kernels_on_gpu_match_the_two_steps(b, t, with_resets):
  """8 rows at 2048 steps: 4 would be few enough lanes for the time-chunked kernels."""
  fp, ip, lb, h0, resets = _gate_inputs(b, t, 2048, with_resets, seed=5)
  fn = jax.jit(lambda *a: mlgru_recurrence(*a, resets, impl="pallas"))
  assert "mlgru_gate_scan_fwd" in fn.lower(fp, ip, lb, h0).as_text()
  (h, last), vjp = jax.vjp(fn, fp, ip, lb, h0)
  (want_h, want_last), want_vjp = jax.vjp(lambda *a: _two_steps(*a, resets), fp, ip, lb, h0)
  assert _rel(h, want_h) < 1e-2 and _rel(last, want_last) < 1e-4
  dh = jnp.asarray(np.random.default_rng(6).normal(size=h.shape), jnp.bfloat16)
  dlast = jnp.zeros_like(last)
  for got, want in zip(vjp((dh, dlast)), want_vjp((dh, dlast))):
    assert _rel(got, want) < 2e-2
