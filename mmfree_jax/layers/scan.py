"""The elementwise linear recurrence `h_t = f_t * h_{t-1} + x_t` (SPEC §1.2), float32
accumulation: one entry point, `linear_recurrence`, for every implementation in
`config.SCAN_IMPLS`, and one choice between the Pallas kernels and XLA (`kernel_or_xla`)."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mmfree_jax import sharding
from mmfree_jax.config import SCAN_IMPLS
from mmfree_jax.layers import scan_pallas

# One `custom_vjp` for every implementation: the backward pass is the same recurrence run in
# reverse (`g_t = dh_t + f_{t+1} g_{t+1}`, `df_t = g_t h_{t-1}`, `dx_t = g_t`), so only `f`
# and `h` are saved and every variant gets an equally lean backward.
# - `sequential`: `lax.scan` over time (the reference; slow on accelerators).
# - `associative`: `lax.associative_scan` over the whole sequence.
# - `chunked`: the plain recurrence unrolled inside chunks of `chunk` steps (all chunks in
#   parallel, one fusion), a short associative scan over the chunk carries, and one
#   elementwise fix-up: a few passes over memory instead of 2*log2(T).
# - `pallas`: one-pass Pallas kernels for the forward and the reverse pass
#   (`scan_pallas`) where `kernel_or_xla` picks them, `associative` elsewhere.

F32 = jnp.float32


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


def _xla_impl(impl: str) -> str:
  return "associative" if impl == "pallas" else impl


def xla_forward(impl, f, x, h0, chunk):
  """The recurrence in XLA: (h in x's dtype, the last state in float32)."""
  h = _run(_xla_impl(impl), jnp.asarray(f, F32), jnp.asarray(x, F32), h0, False, chunk)
  return h.astype(x.dtype), h[:, -1]


def xla_backward(impl, chunk, f, h, dh, h0, dlast):
  """The reverse recurrence in XLA: (df, dx, dh0)."""
  dh = jnp.asarray(dh, F32).at[:, -1].add(dlast)
  f32 = f.astype(F32)
  f_next = jnp.concatenate([f32[:, 1:], jnp.zeros_like(f32[:, :1])], axis=1)
  g = _IMPL_FNS[_xla_impl(impl)](f_next, dh, True, chunk)
  h_prev = jnp.concatenate([h0[:, None], h[:, :-1].astype(F32)], axis=1)
  return (g * h_prev).astype(f.dtype), g.astype(h.dtype), f32[:, 0] * g[:, 0]


def kernel_tiling(impl: str, shape, tiling: Callable = scan_pallas.kernel_for) -> dict | None:
  """The one "kernel or XLA" decision of the recurrence: the kernels' tiling (`tiling`, by
  default `scan_pallas.kernel_for`) when impl is "pallas", the sequence has more than one
  step (a decode step is one fused multiply-add in XLA) and the kernels tile this shape;
  None for XLA. Where the kernels are picked they run on CUDA GPUs, per device under a
  data/fsdp mesh, with XLA on other platforms (`sharding.cuda_kernel`)."""
  if impl != "pallas" or shape[1] == 1:
    return None
  return tiling(*shape)


def kernel_or_xla(impl: str, shape, kernel: Callable, xla: Callable, *args,
                  replicated_args: tuple[int, ...] = (), tiling: Callable = scan_pallas.kernel_for):
  """`kernel(*args)` where `kernel_tiling` picks the kernels (on each device's own rows),
  else `xla(*args)`."""
  if kernel_tiling(impl, shape, tiling) is None:
    return xla(*args)
  return sharding.cuda_kernel(kernel, xla, *args, replicated_args=replicated_args)


def _forward(impl, f, x, h0, chunk):
  kernel = lambda f, x, h0: scan_pallas.forward(f, x, h0, **scan_pallas.kernel_for(*x.shape))
  return kernel_or_xla(impl, x.shape, kernel, functools.partial(xla_forward, impl, chunk=chunk),
                       f, x, h0)


def _backward(impl, chunk, f, h, h0, dh, dlast):
  kernel = lambda f, h, dh, h0, dlast: scan_pallas.backward(
      f, h, dh, h0, dlast, **scan_pallas.kernel_for(*h.shape))
  return kernel_or_xla(impl, h.shape, kernel, functools.partial(xla_backward, impl, chunk),
                       f, h, jnp.asarray(dh, h.dtype), h0, dlast)


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
    impl: one of `config.SCAN_IMPLS`.
    chunk: chunk length for "chunked".

  Returns:
    (h_BxTxD in x's dtype, h_last_BxD in float32 — exact state for decoding).
  """
  check_impl(impl)
  if resets_BxT is not None:
    f_BxTxD = jnp.where(resets_BxT[..., None], jnp.zeros((), f_BxTxD.dtype), f_BxTxD)
  if h0_BxD is None:
    h0_BxD = jnp.zeros((x_BxTxD.shape[0], x_BxTxD.shape[2]), F32)
  return _scan(f_BxTxD, x_BxTxD, h0_BxD.astype(F32), impl, int(chunk))




def check_impl(impl: str):
  if impl not in SCAN_IMPLS:
    raise ValueError(f"unknown recurrence impl {impl!r}; use one of {SCAN_IMPLS}")
