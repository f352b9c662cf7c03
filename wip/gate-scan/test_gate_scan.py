import sys, os
sys.path.insert(0, os.path.dirname(__file__))
import jax, jax.numpy as jnp, numpy as np
import gate_scan as gs

def inputs(b=2, t=24, d=64, seed=0):
  k = jax.random.split(jax.random.key(seed), 6)
  fp = (jax.random.normal(k[0], (b, t, d)) * 2).astype(jnp.bfloat16)
  ip = (jax.random.normal(k[1], (b, t, d)) * 2).astype(jnp.bfloat16)
  lb = jax.random.uniform(k[2], (d,), maxval=0.9)
  h0 = jax.random.normal(k[3], (b, d))
  dh = jax.random.normal(k[4], (b, t, d)).astype(jnp.bfloat16)
  dl = jax.random.normal(k[5], (b, d))
  return fp, ip, lb, h0, dh, dl

def rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))

import pytest

@pytest.mark.parametrize('t,resets', [(24, False), (21, False), (1, False), (24, True), (21, True)])
def test_forward_and_vjp_match_the_composition(t, resets):
  fp, ip, lb, h0, dh, dl = inputs(t=t)
  r = None
  if resets:
    r = jax.random.bernoulli(jax.random.key(9), 0.2, (fp.shape[0], t)).at[:, 0].set(False)
  fn = gs.make(interpret=True, tile_t=8)
  (h, hl), vjp = jax.vjp(lambda *a: fn(*a, r), fp, ip, lb, h0)
  (rh, rhl), rvjp = jax.vjp(lambda *a: gs.reference(*a, r), fp, ip, lb, h0)
  assert rel(h, rh) < 1e-2 and rel(hl, rhl) < 1e-4, (rel(h, rh), rel(hl, rhl))
  got, want = vjp((dh, dl)), rvjp((dh, dl))
  errs = [rel(g, w) for g, w in zip(got, want)]
  print(errs)
  assert max(errs) < 2e-2, errs


def test_gate_kernels_verify_as_triton():
  """As tests/test_triton_ir.py: the kernels lower to Triton modules that pass its verifier."""
  from jax._src.pallas.triton import lowering as tl, pallas_call_registration as reg
  seen = []
  lower = tl.lower_jaxpr_to_triton_module
  def check(*a, **k):
    res = lower(*a, **k)
    with res.module.context:
      res.module.operation.verify()
    seen.append(res.module.operation.attributes["sym_name"].value)
    return res
  reg.lowering.lower_jaxpr_to_triton_module = check
  try:
    fp = jax.ShapeDtypeStruct((2, 128, 128), jnp.bfloat16)
    lb = jax.ShapeDtypeStruct((128,), jnp.float32)
    h0 = jax.ShapeDtypeStruct((2, 128), jnp.float32)
    fn = gs.make()
    for r in (None, jnp.zeros((2, 128), bool)):
      def loss(fp, ip, lb, h0):
        return jnp.sum(fn(fp, ip, lb, h0, r)[0].astype(jnp.float32))
      jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(fp, fp, lb, h0).lower(lowering_platforms=("cuda",))
  finally:
    reg.lowering.lower_jaxpr_to_triton_module = lower
  print(seen)
  assert len(seen) == 4
