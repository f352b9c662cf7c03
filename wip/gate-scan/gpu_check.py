"""GPU: the gate-scan prototype against MLGRU's composition (gates in XLA + the committed
recurrence kernels) at the 1.3B b16 shape: errors, and fwd / fwd+bwd ms."""
import sys, os
sys.path.insert(0, os.path.dirname(__file__))
import jax, jax.numpy as jnp, numpy as np
import gate_scan as gs
from mmfree_jax.bench import cases
from mmfree_jax.layers.scan import linear_recurrence
F32 = jnp.float32

def composition(fp, ip, lb, h0):
  f = lb + (1.0 - lb) * jax.nn.sigmoid(fp.astype(F32))
  x = (jax.nn.silu(ip.astype(F32)) * (1.0 - f)).astype(fp.dtype)
  return linear_recurrence(f, x, h0, None, "pallas")

def rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))

for b, t, d in ((16, 2048, 2048), (16, 2048, 1024)):
  k = jax.random.split(jax.random.key(0), 6)
  fp = (jax.random.normal(k[0], (b, t, d)) * 2).astype(jnp.bfloat16)
  ip = (jax.random.normal(k[1], (b, t, d)) * 2).astype(jnp.bfloat16)
  lb = jax.random.uniform(k[2], (d,), maxval=0.9)
  h0 = jnp.zeros((b, d), F32)
  dh = jax.random.normal(k[4], (b, t, d)).astype(jnp.bfloat16)
  dl = jnp.zeros((b, d), F32)
  rows = {}
  for name, fn in (("composition", composition), ("gate_scan", gs.make())):
    fwd = jax.jit(lambda *a: fn(*a)[0])
    fb = jax.jit(lambda fp, ip, lb, h0, dh, dl: jax.vjp(fn, fp, ip, lb, h0)[1]((dh, dl)))
    rows[name] = (fwd(fp, ip, lb, h0), fb(fp, ip, lb, h0, dh, dl),
                  cases.median_time(lambda: fwd(fp, ip, lb, h0), 20) * 1e3,
                  cases.median_time(lambda: fb(fp, ip, lb, h0, dh, dl), 20) * 1e3)
  (h0r, g0, f0, fb0), (h1, g1, f1, fb1) = rows["composition"], rows["gate_scan"]
  errs = [rel(h1, h0r)] + [rel(x, y) for x, y in zip(g1, g0)]
  print(f"| {b}x{t}x{d} | composition {f0:.3f} / {fb0:.3f} ms | gate_scan {f1:.3f} / {fb1:.3f} ms | "
        f"max rel err h, dfp, dip, dlb, dh0: {', '.join(f'{e:.2g}' for e in errs)} |", flush=True)
