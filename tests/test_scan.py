"""Every recurrence variant against a float64 NumPy loop, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfree_jax.layers.scan import IMPLS, linear_recurrence


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
