"""Ternary BitLinear (SPEC §1.1): input RMSNorm, 8-bit activations, ternary weights, STE.
`bitlinear` is a memory-lean `custom_vjp` (saves only its input; the quantized activations
are recomputed in the backward pass); `bitlinear_shared`, `glu_mlp` and `gated_bitlinear`
run groups of projections as one function; `bitlinear_naive` is the autodiff reference."""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mmfree_jax import sharding
from mmfree_jax.layers import bitlinear_pallas
from mmfree_jax.layers.gates import (gated_input, gated_input_grads, glu_gate_up, glu_input,
                                     glu_product)
from mmfree_jax.layers.quant import (activation_codes, activation_quant, rms_normalize,
                                     unpack_codes, weight_codes, weight_quant)

# The matmul runs on the exact integer codes (int8 activations, ternary weights), then
# applies both scales: int8 x int8 -> int32 on CUDA GPUs and TPUs (faster than bf16 at the
# model's shapes: BENCHMARKS.md, "H200 BitLinear kernels"), elsewhere in the compute dtype
# with float32 accumulation (exact: the sums stay below 2^24). Either way the integer
# product is rounded once to the compute dtype before scaling (bf16: relative error <= 2^-9).
#
# impl "pallas" runs the elementwise work around the matmuls as fused Pallas kernels on
# CUDA GPUs (`bitlinear_pallas`): the input norm + int8 codes, and in the backward pass the
# norm backward, the fake-quantized activations for the weight gradient and the norm-weight
# gradient's partial sums. A group's input comes in one of the kernels' forms
# (`bitlinear_pallas.FORMS`): an array ("x"); the GLU's gate/up product and row scale
# ("glu": gate, up and `silu(gate) * up` are never materialized); or the MLGRU's g and h
# ("gate": o_proj's kernels form the gated output and its gradient in registers).

F32 = jnp.float32
KERNEL_MIN_ROWS = 256


def _mm(a: jax.Array, b: jax.Array, dtype, out=F32) -> jax.Array:
  """`a[..., K] @ b[K, N]` with operands in `dtype`, float32 accumulation, `out` result."""
  return jax.lax.dot_general(
      a.astype(dtype), b.astype(dtype), (((a.ndim - 1,), (0,)), ((), ())),
      preferred_element_type=out)


def _input(xs, form: str, dtype, in_eps: float):
  """The input of a group from its form's arrays (`bitlinear_pallas.FORMS`)."""
  if form == "glu":
    return glu_product(glu_gate_up(*xs, dtype), dtype)
  if form == "gate":
    return gated_input(*xs, in_eps, dtype)
  return xs[0]


class Rows(NamedTuple):
  """A group's per-row arrays ([..., K] each; the leading dims are the tokens): the input in
  its form (x; the GLU's p, r; the gate's g, h) and, for the backward, the n cotangents."""
  xs: tuple
  dys: tuple = ()


class Shared(NamedTuple):
  """A group's arrays shared by every row: the n input-norm weights [n, K], in the backward
  their products with each weight scale, and the form's own (the gate's g-norm weight)."""
  norm_w: jax.Array
  wg: jax.Array | None = None
  aux: tuple = ()


def _on_rows(fn):
  """Runs `fn(rows, shared)` (written for [M, K] rows) on [..., K] rows: flattens the
  leading dims of `rows` and restores them on fn's first list of results (the second
  holds per-block results, left as they are)."""
  def run(rows: Rows, shared: Shared):
    lead = jax.tree.leaves(rows)[0].shape[:-1]
    out, blocks = fn(jax.tree.map(lambda a: a.reshape(-1, a.shape[-1]), rows), shared)
    return [o.reshape(*lead, o.shape[-1]) for o in out], blocks
  return run


def xla_codes(rows: Rows, shared: Shared, *, eps, x_dtype, form, in_eps=0.0):
  """(n int8 activation codes, n per-token scales) of a group, in XLA (on [M, K] rows)."""
  xhat, _ = rms_normalize(_input((*rows.xs, *shared.aux), form, x_dtype, in_eps), eps)
  qs, ss = zip(*(activation_codes(xhat * w) for w in shared.norm_w.astype(F32)))
  return [*(q.astype(jnp.int8) for q in qs), *ss], []


def _pallas_codes(rows: Rows, shared: Shared, *, eps, x_dtype, form, in_eps=0.0):
  qs, ss = bitlinear_pallas.activation_codes((*rows.xs, *shared.aux), shared.norm_w, eps,
                                             jnp.int8, form, x_dtype, in_eps=in_eps)
  return [*qs, *ss], []


def _dispatch(kernel, xla, rows: Rows, shared: Shared, impl: str):
  """XLA for impl "xla" and for fewer than `KERNEL_MIN_ROWS` tokens (decode steps: XLA
  fuses those few rows into neighbouring ops); otherwise the kernel on CUDA GPUs (per
  device under a data/fsdp mesh) and XLA elsewhere (`sharding.cuda_kernel`)."""
  kernel, xla = _on_rows(kernel), _on_rows(xla)
  if impl != "pallas" or math.prod(rows.xs[0].shape[:-1]) < KERNEL_MIN_ROWS:
    return xla(rows, shared)
  return sharding.cuda_kernel(kernel, xla, rows, shared, replicated_args=(1,))


def _codes(xs, norm_w_NxK, eps, dtype, impl, form, aux=(), in_eps=0.0):
  """(int8 activation codes, per-token scales s [..., 1]) for each norm weight of a group
  whose input comes as `form` from the row arrays xs and shared arrays aux; `dtype`
  rounds a formed input."""
  kw = dict(eps=eps, x_dtype=dtype, form=form, in_eps=in_eps)
  out, _ = _dispatch(functools.partial(_pallas_codes, **kw), functools.partial(xla_codes, **kw),
                     Rows(tuple(xs)), Shared(norm_w_NxK, aux=tuple(aux)), impl)
  n = norm_w_NxK.shape[0]
  return out[:n], out[n:]


def xla_backward(rows: Rows, shared: Shared, *, eps, form, in_eps=0.0):
  """A group's backward in XLA (on [M, K] rows): ([the input's gradients (with "glu" that
  of gate | up), n fake-quantized activations], [per-block partial sums of the norm-weight
  gradients (and with "gate" the g-norm weight's)])."""
  xs, dys = rows
  norm_w_NxK, wg_NxK, aux = shared
  dtype = dys[0].dtype
  if form == "glu":  # the gradient is taken with respect to gate | up
    x, glu_vjp = jax.vjp(lambda gu: glu_product(gu, dtype), glu_gate_up(*xs, dtype))
  else:
    x = _input((*xs, *aux), form, dtype, in_eps)
  xhat, rstd = rms_normalize(x, eps)
  dys32 = [dy.astype(F32) for dy in dys]
  dxhat = sum(dy * wg for dy, wg in zip(dys32, wg_NxK))
  dx = rstd * (dxhat - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True))
  yqs = []
  for w in norm_w_NxK:
    q, s = activation_codes(xhat * w)
    yqs.append((q / s).astype(dtype))
  bm = bitlinear_pallas.block_rows(x.shape[0])
  blocks = lambda a: a.reshape(-1, bm, x.shape[-1]).sum(1)
  parts = [blocks(dy * xhat) for dy in dys32]
  if form == "glu":
    dxs = [glu_vjp(dx.astype(dtype))[0]]
  elif form == "gate":  # the formed input was rounded to dtype, so is its gradient
    dg, dh, dgw = gated_input_grads(dx.astype(dtype).astype(F32), *xs, aux[0], in_eps)
    dxs = [dg.astype(xs[0].dtype), dh.astype(xs[1].dtype)]
    parts.append(blocks(dgw))
  else:
    dxs = [dx.astype(x.dtype)]
  return [*dxs, *yqs], parts


def _pallas_backward(rows: Rows, shared: Shared, *, eps, form, in_eps=0.0):
  dxs, yqs, parts = bitlinear_pallas.backward((*rows.xs, *shared.aux), tuple(rows.dys),
                                              shared.norm_w, shared.wg, eps, form,
                                              rows.dys[0].dtype, in_eps=in_eps)
  return [*dxs, *yqs], parts


class Ternary(NamedTuple):
  """A kernel already ternarized: codes t in {-1, 0, 1} [K, N] and its scale g (the 2-bit
  packed checkpoints', `interop.packed`); a BitLinear takes it in place of a latent kernel."""
  codes: jax.Array
  scale: jax.Array


def _ternary(w) -> tuple[jax.Array, jax.Array]:
  return tuple(w) if isinstance(w, Ternary) else weight_codes(w)


def _weights(ws):
  tg = [_ternary(w) for w in ws]
  return [t for t, _ in tg], [g for _, g in tg]


def code_matmul(q: jax.Array, t: jax.Array, dtype) -> jax.Array:
  """int8 codes q [..., K] @ ternary codes t [K, N]: the exact integer product rounded once
  to `dtype` (exact in float32; in bf16 the same relative error as rounding the scaled
  result). On CUDA GPUs and TPUs an int8 x int8 -> int32 matmul whose int32 -> dtype
  rounding XLA fuses into it (on CUDA with the weights as [N, K], the layout int8
  tensor-core GEMMs read); elsewhere `dtype` operands with float32 accumulation, which give
  the same integers."""
  return jax.lax.platform_dependent(
      q, t, cuda=functools.partial(_int8_matmul, dtype=dtype, weights_nk=True),
      tpu=functools.partial(_int8_matmul, dtype=dtype),
      default=lambda q, t: _mm(q, t, dtype, out=dtype))


def _int8_matmul(q: jax.Array, t: jax.Array, dtype, weights_nk: bool = False) -> jax.Array:
  """int8 q [..., K] x t [K, N] as int8 -> int32, rounded to `dtype`; `weights_nk` feeds the
  weights transposed to [N, K]."""
  w, k_dim = (t.astype(jnp.int8).T, 1) if weights_nk else (t.astype(jnp.int8), 0)
  return jax.lax.dot_general(q, w, (((q.ndim - 1,), (k_dim,)), ((), ())),
                             preferred_element_type=jnp.int32).astype(dtype)


def _forward(xs, norm_ws, ws, eps, dtype, out_dtype, impl, form, aux=(), in_eps=0.0):
  qs, ss = _codes(xs, jnp.stack(norm_ws), eps, dtype, impl, form, aux, in_eps)
  ts, gs = _weights(ws)
  return tuple((code_matmul(q, t, dtype).astype(F32) * (g / s)).astype(out_dtype or dtype)
               for q, s, t, g in zip(qs, ss, ts, gs))


def _backward(xs, norm_ws, ws, g_outs, eps, dtype, impl, form, aux=(), in_eps=0.0):
  """(the gradients of the row arrays xs (for "glu": of gate | up), norm-weight gradients,
  kernel gradients, the gradients of aux) of a group: `_forward`'s inputs and the
  cotangents of its outputs."""
  ts, gs = _weights(ws)
  # STE: d(out)/d(y) = W_q^T, d(out)/d(W) = y_q^T.
  dys = [jax.lax.dot_general(go.astype(dtype), t.astype(dtype), (((go.ndim - 1,), (1,)), ((), ())),
                             preferred_element_type=dtype) for go, t in zip(g_outs, ts)]
  norm_w_NxK = jnp.stack(norm_ws).astype(F32)
  wg_NxK = norm_w_NxK * jnp.stack(gs)[:, None]
  n = len(ws)
  kw = dict(eps=eps, form=form, in_eps=in_eps)
  out, parts = _dispatch(functools.partial(_pallas_backward, **kw),
                         functools.partial(xla_backward, **kw),
                         Rows(tuple(xs), tuple(dys)), Shared(norm_w_NxK, wg_NxK, tuple(aux)),
                         impl)
  dxs, yqs = out[:len(out) - n], out[len(out) - n:]
  dnorms = tuple((g * p.sum(0)).astype(nw.dtype) for g, p, nw in zip(gs, parts, norm_ws))
  daux = tuple(p.sum(0).reshape(a.shape).astype(a.dtype) for p, a in zip(parts[n:], aux))
  flat = lambda a: a.reshape(-1, a.shape[-1])
  dws = tuple(jax.lax.dot_general(flat(yq), flat(go).astype(dtype), (((0,), (0,)), ((), ())),
                                  preferred_element_type=F32).astype(w.dtype)
              for yq, go, w in zip(yqs, g_outs, ws))
  return dxs, dnorms, dws, daux


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _group(xs, norm_ws, ws, eps, dtype, out_dtype, impl):
  return _forward(xs, norm_ws, ws, eps, dtype, out_dtype, impl, "x")


def _group_fwd(xs, norm_ws, ws, eps, dtype, out_dtype, impl):
  return _forward(xs, norm_ws, ws, eps, dtype, out_dtype, impl, "x"), (xs, norm_ws, ws)


def _group_bwd(eps, dtype, out_dtype, impl, res, g_outs):
  del out_dtype
  xs, norm_ws, ws = res
  (dx,), dnorms, dws, _ = _backward(xs, norm_ws, ws, g_outs, eps, dtype, impl, "x")
  return (dx.astype(xs[0].dtype),), dnorms, dws


_group.defvjp(_group_fwd, _group_bwd)


def _glu_forward(x, norm_gu, w_gu, norm_d, w_d, eps, dtype, out_dtype, impl):
  (q,), (s,) = _codes((x,), norm_gu[None], eps, dtype, impl, "x")
  t, g = _ternary(w_gu)
  p = checkpoint_name(code_matmul(q, t, dtype), "proj")  # what lean remat keeps
  r = checkpoint_name(g / s, "proj")
  out, = _forward((p, r), (norm_d,), (w_d,), eps, dtype, out_dtype, impl, "glu")
  return out, (p, r)


def _glu_fwd(x, norm_gu, w_gu, norm_d, w_d, eps, dtype, out_dtype, impl):
  out, (p, r) = _glu_forward(x, norm_gu, w_gu, norm_d, w_d, eps, dtype, out_dtype, impl)
  return out, (x, p, r, norm_gu, w_gu, norm_d, w_d)


def _glu_bwd(eps, dtype, out_dtype, impl, res, g_out):
  del out_dtype
  x, p, r, norm_gu, w_gu, norm_d, w_d = res
  (dgu,), (dnorm_d,), (dw_d,), _ = _backward((p, r), (norm_d,), (w_d,), (g_out,), eps, dtype,
                                             impl, "glu")
  (dx,), (dnorm_gu,), (dw_gu,), _ = _backward((x,), (norm_gu,), (w_gu,), (dgu,), eps, dtype,
                                              impl, "x")
  return dx.astype(x.dtype), dnorm_gu, dw_gu, dnorm_d, dw_d


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _glu(x, norm_gu, w_gu, norm_d, w_d, eps, dtype, out_dtype, impl):
  return _glu_forward(x, norm_gu, w_gu, norm_d, w_d, eps, dtype, out_dtype, impl)[0]


_glu.defvjp(_glu_fwd, _glu_bwd)


def _gated_forward(g, h, gnorm_w, norm_w, w, gnorm_eps, eps, dtype, out_dtype, impl):
  return _forward((g, h), (norm_w,), (w,), eps, dtype, out_dtype, impl, "gate",
                  (gnorm_w[None],), gnorm_eps)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _gated(g, h, gnorm_w, norm_w, w, gnorm_eps, eps, dtype, out_dtype, impl):
  return _gated_forward(g, h, gnorm_w, norm_w, w, gnorm_eps, eps, dtype, out_dtype, impl)


def _gated_fwd(g, h, gnorm_w, norm_w, w, gnorm_eps, eps, dtype, out_dtype, impl):
  out = _gated_forward(g, h, gnorm_w, norm_w, w, gnorm_eps, eps, dtype, out_dtype, impl)
  return out, (g, h, gnorm_w, norm_w, w)


def _gated_bwd(gnorm_eps, eps, dtype, out_dtype, impl, res, g_out):
  del out_dtype
  g, h, gnorm_w, norm_w, w = res
  (dg, dh), (dnorm,), (dw,), (dgw,) = _backward((g, h), (norm_w,), (w,), (g_out,), eps, dtype,
                                                impl, "gate", (gnorm_w[None],), gnorm_eps)
  return dg.astype(g.dtype), dh.astype(h.dtype), dgw[0], dnorm, dw


_gated.defvjp(_gated_fwd, _gated_bwd)


def bitlinear(x: jax.Array, norm_w: jax.Array, w: jax.Array, eps: float = 1e-6,
              dtype=jnp.bfloat16, out_dtype=None, impl: str = "xla") -> jax.Array:
  """BitLinear forward `x[..., K] -> [..., N]` with a recomputing backward.

  Args:
    x: input activations [..., K] (any float dtype).
    norm_w: the input RMSNorm weight [K].
    w: latent float weights [K, N].
    eps: RMSNorm epsilon.
    dtype: matmul operand dtype (bfloat16 or float32).
    out_dtype: output dtype (default: `dtype`).
    impl: "xla" or "pallas" (fused kernels around the matmuls on CUDA GPUs; `_dispatch`).

  Returns:
    [..., N] in out_dtype.
  """
  return _group((x,), (norm_w,), (w,), eps, dtype, out_dtype, impl)[0]


def bitlinear_shared(x: jax.Array, norm_ws: Sequence[jax.Array], ws: Sequence[jax.Array],
                     eps: float = 1e-6, dtype=jnp.bfloat16, out_dtype=None,
                     impl: str = "xla") -> tuple[jax.Array, ...]:
  """Several BitLinears of the same input (each its own norm weight and kernel): the
  same results as separate `bitlinear` calls, with the input read once by each kernel
  and one input gradient."""
  return _group((x,), tuple(norm_ws), tuple(ws), eps, dtype, out_dtype, impl)


def glu_mlp(x: jax.Array, norm_gu: jax.Array, w_gu: jax.Array, norm_d: jax.Array,
            w_d: jax.Array, eps: float = 1e-6, dtype=jnp.bfloat16, out_dtype=None,
            impl: str = "xla") -> jax.Array:
  """The ternary GLU `down(silu(gate) * up)` with (gate, up) = halves of ONE BitLinear
  x [..., d] -> [..., 2I] (one matmul, one weight scale, as in the released checkpoints):
  the same results as `bitlinear(glu_input(*split(bitlinear(x, norm_gu, w_gu))), norm_d,
  w_d)` (`glu_mlp_reference`).

  One `custom_vjp`: it keeps x and the gate/up matmul's unscaled product and row scale
  (named "proj" for remat), the down projection's kernels scale, split and multiply the
  halves in registers, and the backward writes the gate | up gradient as one array, so
  the gate/up projection's backward is one matmul per gradient.
  """
  return _glu(x, norm_gu, w_gu, norm_d, w_d, eps, dtype, out_dtype, impl)


def gated_bitlinear(g: jax.Array, h: jax.Array, gnorm_w: jax.Array, norm_w: jax.Array,
                    w: jax.Array, gnorm_eps: float = 1e-6, eps: float = 1e-6,
                    dtype=jnp.bfloat16, out_dtype=None, impl: str = "xla") -> jax.Array:
  """The MLGRU's output gate and o_proj as one function: the same results as
  `bitlinear(gated_input(g, h, gnorm_w, gnorm_eps, dtype), norm_w, w, eps, dtype,
  out_dtype, impl)`, up to float32 summation order in the backward.

  One `custom_vjp` that keeps g and h (both already kept under "lean" remat): o_proj's
  kernels form `RMSNorm(g) * gnorm_w * silu(h)` in registers, and its backward kernel
  writes dg and dh (and the g-norm weight's partial sums) directly, so neither the gated
  output nor its gradient is ever written to memory.
  """
  return _gated(g, h, gnorm_w, norm_w, w, gnorm_eps, eps, dtype, out_dtype, impl)


def glu_mlp_reference(x, norm_gu, w_gu, norm_d, w_d, eps: float = 1e-6, dtype=jnp.bfloat16,
                      out_dtype=None, impl: str = "xla", fn: Callable | None = None):
  """`glu_mlp` as two separate BitLinears (`fn`: `bitlinear` by default, or
  `bitlinear_naive`) around `glu_input`."""
  fn = fn or bitlinear
  gate, up = jnp.split(fn(x, norm_gu, w_gu, eps, dtype, None, impl), 2, axis=-1)
  return fn(glu_input(gate, up, dtype), norm_d, w_d, eps, dtype, out_dtype, impl)


def bitlinear_naive(x, norm_w, w, eps: float = 1e-6, dtype=jnp.bfloat16, out_dtype=None,
                    impl: str = "xla"):
  """Reference BitLinear: autodiff through straight-through estimators (keeps y, y_q)."""
  del impl
  xhat, _ = rms_normalize(x, eps)
  y = xhat * norm_w.astype(F32)
  y_q = y + jax.lax.stop_gradient(activation_quant(y) - y)
  w32 = w.astype(F32)
  w_q = w32 + jax.lax.stop_gradient(weight_quant(w32) - w32)
  return _mm(y_q, w_q, dtype).astype(out_dtype or dtype)


def _declare(module: nn.Module, k: int, features: int, axes, kernel_init):
  """The input-norm weight [k] and latent kernel [k, features] of one BitLinear, or where
  the params hold it packed ("codes", "scale"), its `Ternary` kernel."""
  norm_w = module.param("norm", nn.with_logical_partitioning(nn.initializers.ones, axes[:1]),
                        (k,), F32)
  if module.has_variable("params", "codes"):
    codes = unpack_codes(module.get_variable("params", "codes"), k)
    return norm_w, Ternary(codes, module.get_variable("params", "scale"))
  w = module.param("kernel", nn.with_logical_partitioning(kernel_init, axes), (k, features), F32)
  return norm_w, w


class BitLinear(nn.Module):
  """Ternary projection with its own input RMSNorm; kernel stored [in, out] in float32."""

  features: int
  axes: tuple[str, str] = ("embed", "mlp")
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.bfloat16
  out_dtype: jnp.dtype | None = None
  kernel_init: Callable = nn.initializers.normal(0.02)
  impl: str = "xla"

  @nn.compact
  def __call__(self, x):
    norm_w, w = _declare(self, x.shape[-1], self.features, self.axes, self.kernel_init)
    return checkpoint_name(bitlinear(x, norm_w, w, self.eps, self.dtype, self.out_dtype,
                                     self.impl), "proj")


class BitLinearWeights(nn.Module):
  """The parameters of a `BitLinear` (same names and layout) without the projection:
  for a parent that runs several BitLinears as one function (`bitlinear_shared`,
  `glu_mlp`)."""

  features: int
  axes: tuple[str, str] = ("embed", "mlp")
  kernel_init: Callable = nn.initializers.normal(0.02)

  @nn.compact
  def __call__(self, k: int) -> tuple[jax.Array, jax.Array]:
    return _declare(self, k, self.features, self.axes, self.kernel_init)


def xavier_uniform(gain: float) -> Callable:
  """Xavier/Glorot uniform with a gain (variance_scaling(gain^2, fan_avg, uniform))."""
  return nn.initializers.variance_scaling(gain**2, "fan_avg", "uniform")
