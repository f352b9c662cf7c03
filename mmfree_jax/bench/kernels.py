"""Kernel-level cases: one BitLinear projection, its Pallas kernels alone, the forward GEMMs,
the recurrence and the MLGRU gates (each against its reference)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmfree_jax.bench.measure import hbm_bw, median_time, peak_gib, rel_err
from mmfree_jax.layers import bitlinear as bl
from mmfree_jax.layers import bitlinear_pallas
from mmfree_jax.layers.gates import mlgru_gates
from mmfree_jax.layers.mlgru import mlgru_recurrence
from mmfree_jax.layers.scan import linear_recurrence


def bitlinear_case(variant: str, d: int = 2048, tokens: int = 16384, iters: int = 20,
                   impl: str = "xla") -> dict:
  """Forward+backward of one BitLinear d -> d on `tokens` bf16 tokens."""
  fn = {"lean": bl.bitlinear, "naive": bl.bitlinear_naive}[variant]
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (tokens, d), jnp.bfloat16)
  nw = jnp.ones((d,), jnp.float32)
  w = jax.random.normal(k[1], (d, d), jnp.float32) * 0.02
  g = jax.random.normal(k[2], (tokens, d), jnp.bfloat16)
  f = lambda x, nw, w: fn(x, nw, w, 1e-6, jnp.bfloat16, None, impl)
  step = jax.jit(lambda x, nw, w, g: jax.vjp(f, x, nw, w)[1](g))
  saved = jax.jit(lambda x, nw, w: jax.tree.leaves(jax.vjp(f, x, nw, w)[1]))(x, nw, w)
  saved_b = sum(a.nbytes for a in saved if hasattr(a, "nbytes"))
  del saved
  mem = step.lower(x, nw, w, g).compile().memory_analysis()
  t = median_time(lambda: step(x, nw, w, g), iters)
  return {"case": f"bitlinear-{variant}-{impl}", "ms": t * 1e3, "saved_MiB": saved_b / 2**20,
          "temp_MiB": getattr(mem, "temp_size_in_bytes", 0) / 2**20, "peak_GiB": peak_gib()}


def recurrence_case(impl: str, b: int, t: int, d: int, chunk: int = 16, iters: int = 20,
                    kernel: dict | None = None) -> dict:
  """Forward and forward+backward of the recurrence; bf16 in/out, float32 carry.

  HBM floor (fewest bytes, bf16): forward reads f, x and writes h (3 tensors); the
  backward likewise reads f, dh and writes dx (3 more); df = dx * h_prev is counted
  as fused into the consumer. `kernel` (impl "pallas" only) passes block_d / tile_t /
  num_warps / chunk_t / groups to the raw kernels. `max_err` compares h and
  both gradients with the float32 sequential reference (relative to their largest
  magnitude).
  """
  k = jax.random.split(jax.random.key(1), 3)
  f = jax.nn.sigmoid(jax.random.normal(k[0], (b, t, d))).astype(jnp.bfloat16)
  x = jax.random.normal(k[1], (b, t, d), jnp.bfloat16)
  dh = jax.random.normal(k[2], (b, t, d), jnp.bfloat16)
  if kernel:
    from mmfree_jax.layers import scan_pallas  # noqa: PLC0415
    h0 = jnp.zeros((b, d), jnp.float32)
    run = lambda f, x: scan_pallas.forward(f, x, h0, **kernel)[0]

    def vjp(f, x, dh):
      h = scan_pallas.forward(f, x, h0, **kernel)[0]
      return scan_pallas.backward(f, h, dh, h0, jnp.zeros_like(h0), **kernel)[:2]
  else:
    run = lambda f, x: linear_recurrence(f, x, impl=impl, chunk=chunk)[0]
    vjp = lambda f, x, dh: jax.vjp(run, f, x)[1](dh)
  fwd = jax.jit(run)
  fwdbwd = jax.jit(vjp)
  t_f = median_time(lambda: fwd(f, x), iters)
  t_fb = median_time(lambda: fwdbwd(f, x, dh), iters)
  ref = lambda f, x: linear_recurrence(f.astype(jnp.float32), x.astype(jnp.float32),
                                       impl="sequential")[0]
  got = (fwd(f, x),) + tuple(fwdbwd(f, x, dh))
  want = (ref(f, x),) + tuple(jax.vjp(ref, f, x)[1](dh.astype(jnp.float32)))
  err = rel_err(got, want)
  n, bw = b * t * d * 2, hbm_bw()
  floor_f, floor_fb = 3 * n / bw, 6 * n / bw
  name = f"{impl}{chunk}" if impl == "chunked" else impl
  name += "".join(f"-{key}{v}" for key, v in (kernel or {}).items())
  return {"case": f"scan-{name}-{b}x{t}x{d}", "fwd_ms": t_f * 1e3, "fwdbwd_ms": t_fb * 1e3,
          "floor_fwd_ms": floor_f * 1e3, "floor_fwdbwd_ms": floor_fb * 1e3,
          "fwd_hbm_frac": floor_f / t_f, "fwdbwd_hbm_frac": floor_fb / t_fb, "max_err": err}


def gates_case(b: int, t: int, d: int, fused: bool = True, iters: int = 20,
               kernel: dict | None = None) -> dict:
  """The MLGRU's recurrence from its bf16 forget/input projections, forward and
  forward+backward: `mlgru_recurrence(impl="pallas")` (`fused`: the gate kernels where they
  run) or the two steps (`mlgru_gates` in XLA, then the plain recurrence kernels). `kernel`
  (fused only) passes block_d / tile_t / num_warps to `mlgru_pallas.gate_forward/backward`
  (off GPU in interpret mode).

  HBM floor (bf16): forward reads fp, ip and writes h (3 tensors); the backward reads fp, ip,
  h, dh and writes d fp, d ip (6). `max_err` compares h and the gradients of fp, ip and the
  lower bounds with the float32 sequential two steps (relative to their largest magnitude).
  """
  k = jax.random.split(jax.random.key(2), 4)
  fp, ip, dh = (2 * jax.random.normal(kk, (b, t, d), jnp.bfloat16) for kk in k[:3])
  lb = jax.random.uniform(k[3], (d,), maxval=0.9)
  h0, dlast = jnp.zeros((b, d), jnp.float32), jnp.zeros((b, d), jnp.float32)
  if kernel:
    from mmfree_jax.layers import mlgru_pallas  # noqa: PLC0415
    kw = {**kernel, "interpret": jax.default_backend() != "gpu"}

    def run(fp, ip, lb):
      return mlgru_pallas.gate_forward(fp, ip, lb, h0, **kw)[0]

    def vjp(fp, ip, lb, dh):
      h = run(fp, ip, lb)
      return mlgru_pallas.gate_backward(fp, ip, h, dh, lb, h0, dlast, **kw)[:3]
  else:
    def run(fp, ip, lb):
      if fused:
        return mlgru_recurrence(fp, ip, lb, h0, impl="pallas")[0]
      f, x = mlgru_gates(fp, ip, lb, fp.dtype)
      return linear_recurrence(f, x, h0, impl="pallas")[0]
    vjp = lambda fp, ip, lb, dh: jax.vjp(run, fp, ip, lb)[1](dh)
  fwd, fwdbwd = jax.jit(run), jax.jit(vjp)
  t_f = median_time(lambda: fwd(fp, ip, lb), iters)
  t_fb = median_time(lambda: fwdbwd(fp, ip, lb, dh), iters)

  def ref(fp, ip, lb):
    f, x = mlgru_gates(fp.astype(jnp.float32), ip.astype(jnp.float32), lb, jnp.float32)
    return linear_recurrence(f, x, h0, impl="sequential")[0]
  got = fwdbwd(fp, ip, lb, dh)
  got = (fwd(fp, ip, lb), got[0], got[1], got[2].sum(0) if kernel else got[2])
  want = (ref(fp, ip, lb),) + tuple(jax.vjp(ref, fp, ip, lb)[1](dh.astype(jnp.float32)))
  n, bw = b * t * d * 2, hbm_bw()
  floor_f, floor_fb = 3 * n / bw, 9 * n / bw
  name = "fused" if fused else "two-steps"
  name += "".join(f"-{key}{v}" for key, v in (kernel or {}).items())
  return {"case": f"gates-{name}-{b}x{t}x{d}", "fwd_ms": t_f * 1e3, "fwdbwd_ms": t_fb * 1e3,
          "floor_fwd_ms": floor_f * 1e3, "floor_fwdbwd_ms": floor_fb * 1e3,
          "fwd_hbm_frac": floor_f / t_f, "fwdbwd_hbm_frac": floor_fb / t_fb,
          "max_err": rel_err(got, want)}


def _kernel_inputs(key, k: int, form: str, tokens: int) -> tuple[jax.Array, ...]:
  """A BitLinear kernel's input in its form (`bitlinear_pallas.FORMS`): (x [tokens, k],);
  for the GLU's down projection the gate/up matmul's integer product p [tokens, 2k] and
  row scales r [tokens, 1]; for o_proj the MLGRU's g, h [tokens, k] and g-norm weight."""
  if form == "x":
    return (jax.random.normal(key, (tokens, k), jnp.bfloat16),)
  k1, k2, k3 = jax.random.split(key, 3)
  if form == "glu":
    return (jnp.round(jax.random.normal(k1, (tokens, 2 * k)) * 300).astype(jnp.bfloat16),
            jax.random.uniform(k2, (tokens, 1), minval=0.002, maxval=0.01))
  return (jax.random.normal(k1, (tokens, k), jnp.bfloat16),
          jax.random.normal(k2, (tokens, k), jnp.bfloat16),
          1 + 0.1 * jax.random.normal(k3, (1, k)))


def _form_tag(form: str) -> str:
  return "" if form == "x" else f"-{form}"


def bitlinear_bwd_case(k: int, n: int = 1, form: str = "x", rows: int = 1, warps: int = 0,
                       tokens: int = 16384, iters: int = 20) -> dict:
  """The BitLinear backward kernel alone (`bitlinear_pallas.backward`) for one tile choice
  and input form (`bitlinear_pallas.FORMS`).

  HBM floor: read the input and the n cotangents, write the input gradient and the n
  weight-gradient operands, once each (bf16; the GLU's input and gradient are [tokens, 2k],
  the gate's g and h and their gradients).
  Off GPU the kernel runs in interpret mode.
  `max_err`: largest difference from the XLA expression relative to its magnitude.
  """
  keys = jax.random.split(jax.random.key(2), 2 + n)
  xs = _kernel_inputs(keys[0], k, form, tokens)
  dys = tuple(jax.random.normal(kk, (tokens, k), jnp.bfloat16) for kk in keys[1:-1])
  norm_w = 1 + 0.1 * jax.random.normal(keys[-1], (n, k))
  interpret = jax.default_backend() != "gpu"
  run = jax.jit(lambda xs, dys, w: bitlinear_pallas.backward(
      xs, dys, w, 0.5 * w, 1e-6, form, rows=rows, num_warps=warps, interpret=interpret))
  t = median_time(lambda: run(xs, dys, norm_w), iters)
  rows_in, aux = bitlinear_pallas.split_input(xs, form)
  rows_out, parts = bl.xla_backward(bl.Rows(tuple(rows_in), dys),
                                    bl.Shared(norm_w, 0.5 * norm_w, tuple(aux)),
                                    eps=1e-8, form=form, in_eps=1e-6)
  got = run(xs, dys, norm_w)
  err = rel_err([*got[0], *got[1], *got[2]], [*rows_out, *parts])
  # each [tokens, k] bf16 array read or written once
  nbytes = 2 * (bitlinear_pallas.form_of(form).mk_arrays + n) * tokens * k * 2
  return {"case": f"bitlinear_bwd-k{k}-n{n}{_form_tag(form)}-rows{rows}-warps{warps or 'auto'}",
          "ms": t * 1e3, "GB_per_s": nbytes / t / 1e9, "hbm_frac": nbytes / hbm_bw() / t,
          "max_err": err}


def bitlinear_codes_case(k: int, n: int = 1, form: str = "x", rows: int = 0, warps: int = 0,
                         tokens: int = 16384, iters: int = 20) -> dict:
  """The BitLinear prologue kernel alone (`bitlinear_pallas.activation_codes`, int8 codes)
  for one tile choice (0 = the committed `codes_tile`) and input form.

  HBM floor: read the input once (bf16; the GLU's is [tokens, 2k], the gate's g and h),
  write n int8 code arrays and n float32 scales. Off GPU the kernel runs in interpret mode. `max_err`: codes
  differing from the XLA path (an activation within an ulp of a rounding boundary may), as
  a fraction of all codes.
  """
  keys = jax.random.split(jax.random.key(4), 2)
  xs = _kernel_inputs(keys[0], k, form, tokens)
  norm_w = 1 + 0.1 * jax.random.normal(keys[-1], (n, k))
  interpret = jax.default_backend() != "gpu"
  run = jax.jit(lambda xs, w: bitlinear_pallas.activation_codes(
      xs, w, 1e-6, jnp.int8, form, rows=rows, num_warps=warps, interpret=interpret))
  t = median_time(lambda: run(xs, norm_w), iters)
  rows_in, aux = bitlinear_pallas.split_input(xs, form)
  want, _ = bl.xla_codes(bl.Rows(tuple(rows_in)), bl.Shared(norm_w, aux=tuple(aux)), eps=1e-8,
                         x_dtype=jnp.bfloat16, form=form, in_eps=1e-6)
  got, _ = run(xs, norm_w)
  err = max(float(jnp.mean(g != w)) for g, w in zip(got, want[:n]))
  nbytes = (2 * bitlinear_pallas.form_of(form).mk_arrays + n) * tokens * k + 4 * n * tokens
  return {"case": f"bitlinear_codes-k{k}-n{n}{_form_tag(form)}-rows{rows or 'auto'}"
                  f"-warps{warps or 'auto'}",
          "ms": t * 1e3, "GB_per_s": nbytes / t / 1e9, "hbm_frac": nbytes / hbm_bw() / t,
          "max_err": err}


def gemm_case(m: int, k: int, n: int, operands: str = "bf16", epilogue: bool = True,
              iters: int = 20) -> dict:
  """One [M, K] x [K, N] product of BitLinear codes (int8 activations, ternary weights).

  operands "bf16": both codes as bf16, float32 accumulation, bf16 result (BitLinear's
  forward off CUDA, and on CUDA before its int8 GEMMs); "int8": int8 x int8 with int32
  accumulation and the weight codes stored [N, K] (K minor in both operands, the int8
  tensor-core GEMM's layout). With `epilogue` the product is scaled per row in float32 and
  written as bf16 (BitLinear's CUDA path first rounds the int32 product to bf16:
  `bitlinear.code_matmul`); without, the raw product is the result. `max_err`: relative
  to the exact product.
  """
  keys = jax.random.split(jax.random.key(3), 3)
  q = jax.random.randint(keys[0], (m, k), -128, 128, jnp.int32).astype(jnp.int8)
  t = jax.random.randint(keys[1], (k, n), -1, 2, jnp.int32).astype(jnp.int8)
  s = jax.random.uniform(keys[2], (m, 1), jnp.float32, 0.5, 1.5)
  if operands == "bf16":
    a, b, dims, acc = q.astype(jnp.bfloat16), t.astype(jnp.bfloat16), (0,), jnp.bfloat16
  elif operands == "int8":
    a, b, dims, acc = q, t.T, (1,), jnp.int32
  else:
    raise ValueError(f"operands={operands!r} is unknown; use bf16 or int8")

  def product(a, b, s):
    out = jax.lax.dot_general(a, b, (((1,), dims), ((), ())), preferred_element_type=acc)
    return (out.astype(jnp.float32) * s).astype(jnp.bfloat16) if epilogue else out
  run = jax.jit(product)
  t_s = median_time(lambda: run(a, b, s), iters)
  exact = jnp.dot(q.astype(jnp.int32), t.astype(jnp.int32))
  err = rel_err([run(a, b, s)], [exact * s if epilogue else exact])
  return {"case": f"gemm-{operands}{'' if epilogue else '-raw'}-{m}x{k}x{n}", "ms": t_s * 1e3,
          "TOP_per_s": 2 * m * k * n / t_s / 1e12, "max_err": err}
