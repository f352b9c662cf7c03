"""The elementwise linear recurrence `h_t = f_t * h_{t-1} + x_t` (SPEC §1.2).

Three forward implementations share one `custom_vjp`: the backward pass is the same
recurrence run in reverse (`g_t = dh_t + f_{t+1} g_{t+1}`, `df_t = g_t h_{t-1}`,
`dx_t = g_t`), so only `f` and `h` are saved and every variant gets an equally lean,
equally fast backward. All accumulation is float32.

- `sequential`: `lax.scan` over time (the reference; slow on accelerators).
- `associative`: `lax.associative_scan` over the whole sequence.
- `chunked`: the plain recurrence unrolled inside chunks of `chunk` steps (all chunks
  in parallel, one fusion), a short associative scan over the chunk carries, and one
  elementwise fix-up: a few passes over memory instead of 2*log2(T).
- `pallas`: one-pass Pallas kernels for the forward and the reverse pass
  (`mmfree_jax.layers.scan_pallas`) on CUDA GPUs, per device under a data/fsdp mesh
  (`sharding.cuda_kernel`); `associative` on other platforms, for T = 1 (decode
  steps), when D has no power-of-two block of >= 16 channels, or under a tensor-parallel
  mesh.

`mlgru_recurrence` is the MLGRU's use of it, from its forget and input projections: with
"pallas", wherever the whole-sequence kernels run, one more `custom_vjp` whose kernels form
the gates in registers and return the projections' gradients, so the float32 forget gate,
the recurrence input and their gradients never cross HBM.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mmfree_jax import sharding
from mmfree_jax.layers import scan_pallas

F32 = jnp.float32
IMPLS = ("sequential", "associative", "chunked", "pallas")


def _combine(a, b):
  """Compose two affine maps h -> f*h + x (a first, then b)."""
  fa, xa = a
  fb, xb = b
  return fa * fb, fb * xa + xb


def _sequential(f_BxTxD, x_BxTxD, reverse: bool, chunk: int):
  del chunk
  def step(h_BxD, fx):
    f_t, x_t = fx
    h_BxD = f_t * h_BxD + x_t
    return h_BxD, h_BxD
  h0 = jnp.zeros_like(x_BxTxD[:, 0])
  _, h_TxBxD = jax.lax.scan(step, h0, (jnp.swapaxes(f_BxTxD, 0, 1), jnp.swapaxes(x_BxTxD, 0, 1)),
                            reverse=reverse)
  return jnp.swapaxes(h_TxBxD, 0, 1)


def _associative(f_BxTxD, x_BxTxD, reverse: bool, chunk: int):
  del chunk
  return jax.lax.associative_scan(_combine, (f_BxTxD, x_BxTxD), axis=1, reverse=reverse)[1]


def _chunked(f_BxTxD, x_BxTxD, reverse: bool, chunk: int):
  b, t, d = x_BxTxD.shape
  c = min(chunk, t)
  pad = (-t) % c
  if pad:  # identity maps at the end never change the outputs, in either direction
    f_BxTxD = jnp.pad(f_BxTxD, ((0, 0), (0, pad), (0, 0)), constant_values=1.0)
    x_BxTxD = jnp.pad(x_BxTxD, ((0, 0), (0, pad), (0, 0)))
  n = (t + pad) // c
  f4 = f_BxTxD.reshape(b, n, c, d)
  x4 = x_BxTxD.reshape(b, n, c, d)
  # Inside each chunk: the plain recurrence, unrolled (one elementwise fusion over all
  # chunks at once); `a` is the running product of gates (the chunk's affine map).
  hs, as_ = [None] * c, [None] * c
  h = a = None
  for j in (range(c - 1, -1, -1) if reverse else range(c)):
    fj, xj = f4[:, :, j], x4[:, :, j]
    h = xj if h is None else fj * h + xj
    a = fj if a is None else a * fj
    hs[j], as_[j] = h, a
  hl = jnp.stack(hs, axis=2)
  a_cum = jnp.stack(as_, axis=2)
  last = 0 if reverse else c - 1
  # Across chunks: a short associative scan of the chunk maps, then one fix-up pass.
  _, carry_BxNxD = jax.lax.associative_scan(
      _combine, (a_cum[:, :, last], hl[:, :, last]), axis=1, reverse=reverse)
  zero = jnp.zeros_like(carry_BxNxD[:, :1])
  if reverse:
    cin = jnp.concatenate([carry_BxNxD[:, 1:], zero], axis=1)
  else:
    cin = jnp.concatenate([zero, carry_BxNxD[:, :-1]], axis=1)
  return (hl + a_cum * cin[:, :, None]).reshape(b, n * c, d)[:, :t]


_IMPL_FNS = {"sequential": _sequential, "associative": _associative, "chunked": _chunked}


def _run(impl, f32, x32, h0, reverse, chunk):
  if h0 is not None:
    x32 = x32.at[:, 0].add(f32[:, 0] * h0)
  return _IMPL_FNS[impl](f32, x32, reverse, chunk)


def _xla_forward(impl, f, x, h0, chunk):
  h = _run(impl, jnp.asarray(f, F32), jnp.asarray(x, F32), h0, False, chunk)
  return h.astype(x.dtype), h[:, -1]


def _xla_backward(impl, chunk, f, h, dh, h0, dlast):
  dh = jnp.asarray(dh, F32).at[:, -1].add(dlast)
  f32 = f.astype(F32)
  f_next = jnp.concatenate([f32[:, 1:], jnp.zeros_like(f32[:, :1])], axis=1)
  g = _IMPL_FNS[impl](f_next, dh, True, chunk)
  h_prev = jnp.concatenate([h0[:, None], h[:, :-1].astype(F32)], axis=1)
  return (g * h_prev).astype(f.dtype), g.astype(h.dtype), f32[:, 0] * g[:, 0]


def _use_kernel(impl, shape) -> bool:
  """Whether the Pallas kernels run (else the XLA associative scan: also for single-token
  decode steps, where the recurrence is one fused multiply-add). Their tiling is picked
  from each device's own rows (`scan_pallas.kernel_for`), inside `sharding.cuda_kernel`."""
  return impl == "pallas" and shape[1] > 1 and scan_pallas.kernel_for(*shape) is not None


def _forward(impl, f, x, h0, chunk):
  xla = functools.partial(_xla_forward, "associative" if impl == "pallas" else impl, chunk=chunk)
  if not _use_kernel(impl, x.shape):
    return xla(f, x, h0)
  kernel = lambda f, x, h0: scan_pallas.forward(f, x, h0, **scan_pallas.kernel_for(*x.shape))
  return sharding.cuda_kernel(kernel, xla, f, x, h0)


def _backward(impl, chunk, f, h, h0, dh, dlast):
  xla = functools.partial(_xla_backward, "associative" if impl == "pallas" else impl, chunk)
  if not _use_kernel(impl, h.shape):
    return xla(f, h, dh, h0, dlast)
  kernel = lambda f, h, dh, h0, dlast: scan_pallas.backward(
      f, h, dh, h0, dlast, **scan_pallas.kernel_for(*h.shape))
  return sharding.cuda_kernel(kernel, xla, f, h, jnp.asarray(dh, h.dtype), h0, dlast)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _scan(f, x, h0, impl: str, chunk: int):
  return _forward(impl, f, x, h0, chunk)


def _scan_fwd(f, x, h0, impl, chunk):
  out, last = _forward(impl, f, x, h0, chunk)
  # Named where it is also the residual: a remat policy that saves "recurrence_h" then
  # never re-runs the forward recurrence for the backward pass.
  out = checkpoint_name(out, "recurrence_h")
  return (out, last), (f, out, h0)


def _scan_bwd(impl, chunk, res, cot):
  f, h, h0 = res
  dh, dlast = cot
  return _backward(impl, chunk, f, h, h0, dh, dlast)


_scan.defvjp(_scan_fwd, _scan_bwd)


def linear_recurrence(f_BxTxD: jax.Array, x_BxTxD: jax.Array, h0_BxD: jax.Array | None = None,
                      resets_BxT: jax.Array | None = None, impl: str = "chunked",
                      chunk: int = 16) -> tuple[jax.Array, jax.Array]:
  """Runs `h_t = f_t * h_{t-1} + x_t`, accumulating in float32.

  Args:
    f_BxTxD: forget gates (any float dtype; keep float32 for gates close to 1).
    x_BxTxD: inputs; `h` is returned (and saved for the backward pass) in this dtype.
    h0_BxD: initial state (zeros if None), float32.
    resets_BxT: True at the first token of a new document: there `f_t := 0`.
    impl: "sequential" | "associative" | "chunked" | "pallas".
    chunk: chunk length for "chunked".

  Returns:
    (h_BxTxD in x's dtype, h_last_BxD in float32 — exact state for decoding).
  """
  if impl not in IMPLS:
    raise ValueError(f"unknown recurrence impl {impl!r}; use one of {IMPLS}")
  if resets_BxT is not None:
    f_BxTxD = jnp.where(resets_BxT[..., None], jnp.zeros((), f_BxTxD.dtype), f_BxTxD)
  if h0_BxD is None:
    h0_BxD = jnp.zeros((x_BxTxD.shape[0], x_BxTxD.shape[2]), F32)
  return _scan(f_BxTxD, x_BxTxD, h0_BxD.astype(F32), impl, int(chunk))


def mlgru_gates(fp: jax.Array, ip: jax.Array, lb: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """The MLGRU's recurrence inputs from its projections: the forget gate
  `f = lb + (1 - lb) * sigmoid(fp)` (float32) and `x = silu(ip) * (1 - f)` in `dtype`."""
  f = lb + (1.0 - lb) * jax.nn.sigmoid(fp.astype(F32))
  return f, (jax.nn.silu(ip.astype(F32)) * (1.0 - f)).astype(dtype)


def _masked(v, *resets):
  """v, zero where a document starts (`resets`: () or (resets_BxT,))."""
  return jnp.where(resets[0][..., None], jnp.zeros((), v.dtype), v) if resets else v


def _use_gate_kernel(impl, shape) -> bool:
  """Whether the gate-fused kernels run: where the whole-sequence recurrence kernels would
  (the time-chunked kernels for few lanes take f and x as they are)."""
  return _use_kernel(impl, shape) and scan_pallas.gate_kernel_for(*shape) is not None


def _gate_two_steps_forward(recurrence, fp, ip, lb, h0, *resets):
  """`mlgru_gates`, then `recurrence(f, x, h0)` -> (h, last)."""
  f, x = mlgru_gates(fp, ip, lb, fp.dtype)
  return recurrence(_masked(f, *resets), x, h0)


def _gate_two_steps_backward(recurrence_bwd, fp, ip, h, dh, lb, h0, dlast, *resets):
  """The gate kernels' backward through `recurrence_bwd(f, h, dh, h0, dlast)` -> (df, dx,
  dh0) and the gates' VJP: (d fp, d ip, d lb per batch row [B, D], dh0)."""
  b, _, d = fp.shape
  lb_b = jnp.broadcast_to(lb, (b, 1, d))  # per batch row, as the kernel's partial sums
  (f, _), gates_vjp = jax.vjp(lambda fp, ip, lb: mlgru_gates(fp, ip, lb, fp.dtype), fp, ip, lb_b)
  df, dx, dh0 = recurrence_bwd(_masked(f, *resets), h, dh, h0, dlast)
  dfp, dip, dlb = gates_vjp((_masked(df, *resets), dx))
  return dfp, dip, dlb[:, 0], dh0


def _gate_kernel_forward(fp, ip, lb, h0, *resets):
  """On one device's rows: the gate kernels, or where those rows are few enough for the
  time-chunked kernels (which take f and x), the two steps through those."""
  kw = scan_pallas.gate_kernel_for(*fp.shape)
  if kw is not None:
    return scan_pallas.gate_forward(fp, ip, lb, h0, *resets, **kw)
  plain = functools.partial(scan_pallas.forward, **scan_pallas.kernel_for(*fp.shape))
  return _gate_two_steps_forward(plain, fp, ip, lb, h0, *resets)


def _gate_kernel_backward(fp, ip, h, dh, lb, h0, dlast, *resets):
  kw = scan_pallas.gate_kernel_for(*fp.shape)
  if kw is not None:
    return scan_pallas.gate_backward(fp, ip, h, dh, lb, h0, dlast, *resets, **kw)
  plain = functools.partial(scan_pallas.backward, **scan_pallas.kernel_for(*fp.shape))
  return _gate_two_steps_backward(plain, fp, ip, h, dh, lb, h0, dlast, *resets)


def _gate_forward(chunk, fp, ip, lb, h0, resets):
  r = () if resets is None else (resets,)
  xla = functools.partial(_gate_two_steps_forward,
                          functools.partial(_xla_forward, "associative", chunk=chunk))
  return sharding.cuda_kernel(_gate_kernel_forward, xla, fp, ip, lb, h0, *r,
                              replicated_args=(2,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _gate_scan(fp, ip, lb, h0, resets, chunk: int):
  return _gate_forward(chunk, fp, ip, lb, h0, resets)


def _gate_scan_fwd(fp, ip, lb, h0, resets, chunk):
  out, last = _gate_forward(chunk, fp, ip, lb, h0, resets)
  out = checkpoint_name(out, "recurrence_h")  # as in _scan_fwd
  return (out, last), (fp, ip, lb, out, h0, resets)


def _gate_scan_bwd(chunk, res, cot):
  fp, ip, lb, h, h0, resets = res
  dh, dlast = cot
  r = () if resets is None else (resets,)
  xla = functools.partial(_gate_two_steps_backward,
                          functools.partial(_xla_backward, "associative", chunk))
  dfp, dip, dlb, dh0 = sharding.cuda_kernel(
      _gate_kernel_backward, xla,
      fp, ip, h, jnp.asarray(dh, h.dtype), lb, h0, dlast, *r, replicated_args=(4,))
  return dfp, dip, dlb.sum(0), dh0, None


_gate_scan.defvjp(_gate_scan_fwd, _gate_scan_bwd)


def mlgru_recurrence(fp_BxTxD: jax.Array, ip_BxTxD: jax.Array, lb_D: jax.Array,
                     h0_BxD: jax.Array | None = None, resets_BxT: jax.Array | None = None,
                     impl: str = "chunked", chunk: int = 16) -> tuple[jax.Array, jax.Array]:
  """The MLGRU's recurrence from its forget and input projections: `linear_recurrence` of
  `mlgru_gates(fp, ip, lb)` (h in fp's dtype, the last state in float32).

  With impl "pallas", where the whole-sequence kernels run, one custom_vjp whose kernels
  form the gates in registers and return the projections' gradients (`scan_pallas.
  gate_forward/gate_backward`): f (float32), x and df never cross HBM. Elsewhere (the
  time-chunked kernels' few lanes, decode steps, the other impls) the two steps as written
  (`mlgru_gates`, then `linear_recurrence`).
  """
  if impl not in IMPLS:
    raise ValueError(f"unknown recurrence impl {impl!r}; use one of {IMPLS}")
  lb_D = jnp.asarray(lb_D, F32)
  if not _use_gate_kernel(impl, fp_BxTxD.shape):
    f, x = mlgru_gates(fp_BxTxD, ip_BxTxD, lb_D, fp_BxTxD.dtype)
    return linear_recurrence(f, x, h0_BxD, resets_BxT, impl, chunk)
  if h0_BxD is None:
    h0_BxD = jnp.zeros((fp_BxTxD.shape[0], fp_BxTxD.shape[2]), F32)
  return _gate_scan(fp_BxTxD, ip_BxTxD, lb_D, h0_BxD.astype(F32), resets_BxT, int(chunk))
