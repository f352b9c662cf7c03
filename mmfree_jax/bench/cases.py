"""Benchmark cases. Each returns a flat dict of numbers; run one per process for clean
peak-memory readings (`python -m mmfree_jax.bench` does that).

Timing follows the device method: warm up (compile + 2 runs), block on results,
report the median of repeated runs. Synthetic random tokens: no data stack involved.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmfree_jax import sharding
from mmfree_jax.config import preset
from mmfree_jax.layers import bitlinear as bl
from mmfree_jax.layers import bitlinear_pallas
from mmfree_jax.layers.scan import linear_recurrence, mlgru_gates, mlgru_recurrence
from mmfree_jax.models import init_params, param_counts
from mmfree_jax.scaling import flops as flops_lib

# Official PyTorch/Triton code on one H200 (OFFICIAL_CARD), SPEC §5: (tokens/s, peak GiB).
OFFICIAL_CARD = "H200"
OFFICIAL = {
    ("mmfree", "370M", 8): (74_170, 25.1), ("mmfree", "370M", 16): (105_436, 45.3),
    ("mmfree", "1.3B", 8): (43_177, 57.2), ("mmfree", "1.3B", 16): (48_464, 96.5),
    ("transformer", "370M", 8): (89_932, 36.1), ("transformer", "1.3B", 8): (38_353, 73.1),
}
# Measured elementwise copy bandwidth (bytes read + written per second): the H200's from
# SPEC §5, the H100's from a 1 GiB bf16 scaling on the device machine (2.50 TB/s,
# BENCHMARKS.md "2026-12-05, fourth session"). Other devices are counted as an H200.
HBM_BW = {"H200": 3.3e12, "H100": 2.5e12}


def card() -> str | None:
  """The card ("H200" or "H100") when the first device's kind names one, else None."""
  kind = jax.devices()[0].device_kind
  return next((c for c in HBM_BW if c in kind), None)


def hbm_bw() -> float:
  return HBM_BW[card() or OFFICIAL_CARD]


def vs_official(arch: str, size: str, batch: int, tokens_per_s: float) -> dict:
  """The official code's numbers for this shape, if measured, and our speed-up over them;
  on another card than theirs the speed-up would compare two GPUs, so it is None."""
  if (arch, size, batch) not in OFFICIAL:
    return {}
  tps, peak = OFFICIAL[(arch, size, batch)]
  return {"official_tokens_per_s": tps, "official_peak_GiB": peak,
          "speedup": tokens_per_s / tps if card() == OFFICIAL_CARD else None}


def median_time(fn: Callable[[], Any], iters: int = 10, warmup: int = 2,
                group_s: float = 0.02) -> float:
  """Median time (s) per call of `fn()`, measured over groups of back-to-back calls blocked
  at the end of each group: a group lasts >= `group_s`, so the host's dispatch of a sub-ms
  call overlaps the device work of the one before (one call per group for slow calls)."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  reps = min(50, max(1, math.ceil(group_s / (time.perf_counter() - t0))))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = fn()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / reps)
  return statistics.median(times)


class GpuSampler:
  """Samples GPU 0's SM clock (MHz), power draw (W) and temperature (C) every `period_ms`
  with `nvidia-smi` while the block runs, so a timed row says what clocks it ran at (the
  card lowers them under its power and thermal limits, one source of the spread between
  device sessions). `summary()` gives the medians, or {} where nvidia-smi is missing or
  printed nothing usable.
  """

  FIELDS = (("sm_MHz", "clocks.sm"), ("power_W", "power.draw"), ("temp_C", "temperature.gpu"))

  def __init__(self, period_ms: int = 200):
    self.period_ms = period_ms
    self._proc: subprocess.Popen | None = None
    self._out = ""

  def __enter__(self) -> "GpuSampler":
    exe = shutil.which("nvidia-smi")
    if exe is not None:
      query = ",".join(q for _, q in self.FIELDS)
      self._proc = subprocess.Popen(
          [exe, f"--query-gpu={query}", "--format=csv,noheader,nounits", "--id=0",
           f"--loop-ms={self.period_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
          text=True)
    return self

  def __exit__(self, *exc) -> None:
    if self._proc is not None:
      self._proc.terminate()
      try:
        self._out = self._proc.communicate(timeout=10)[0]
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._out = self._proc.communicate()[0]

  def summary(self) -> dict[str, float]:
    samples = []
    for line in self._out.splitlines():
      try:
        samples.append([float(v) for v in line.split(",")])
      except ValueError:  # "[N/A]" fields, a partial last line
        continue
    samples = [v for v in samples if len(v) == len(self.FIELDS)]
    if not samples:
      return {}
    return {name: statistics.median(v[i] for v in samples)
            for i, (name, _) in enumerate(self.FIELDS)}


def peak_gib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30


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


def _rel_err(got, want) -> float:
  """Largest |got - want| of each pair relative to max |want|, maximised over the pairs."""
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return max(float(jnp.max(jnp.abs(f32(g) - f32(w))) / jnp.max(jnp.abs(f32(w))))
             for g, w in zip(got, want))


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
  err = _rel_err(got, want)
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
  (fused only) passes block_d / tile_t / num_warps to `scan_pallas.gate_forward/backward`
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
    from mmfree_jax.layers import scan_pallas  # noqa: PLC0415
    kw = {**kernel, "interpret": jax.default_backend() != "gpu"}

    def run(fp, ip, lb):
      return scan_pallas.gate_forward(fp, ip, lb, h0, **kw)[0]

    def vjp(fp, ip, lb, dh):
      h = run(fp, ip, lb)
      return scan_pallas.gate_backward(fp, ip, h, dh, lb, h0, dlast, **kw)[:3]
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
          "max_err": _rel_err(got, want)}


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
  rows_out, parts = bl._xla_backward(*rows_in, *dys, norm_w, 0.5 * norm_w, *aux,
                                     nx=len(rows_in), n=n, eps=1e-8, form=form, in_eps=1e-6)
  got = run(xs, dys, norm_w)
  err = _rel_err([*got[0], *got[1], *got[2]], [*rows_out, *parts])
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
  want, _ = bl._xla_codes(*rows_in, norm_w, *aux, eps=1e-8, x_dtype=jnp.bfloat16, form=form,
                          in_eps=1e-6)
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
  `bitlinear._code_matmul`); without, the raw product is the result. `max_err`: relative
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
  err = _rel_err([run(a, b, s)], [exact * s if epilogue else exact])
  return {"case": f"gemm-{operands}{'' if epilogue else '-raw'}-{m}x{k}x{n}", "ms": t_s * 1e3,
          "TOP_per_s": 2 * m * k * n / t_s / 1e12, "max_err": err}


def _train_setup(arch: str, size: str, batch: int, remat: str, seq_len: int,
                 attention_impl: str, docs: int = 1, **model_kw):
  """The trainer's compiled train step, its memory plan (`train.memory.plan`: refused in one
  line where it does not fit; remat "auto" picks the layout), a donated state and two random
  batches (`docs` > 1: each row packs that many equal documents, as `segment_ids`)."""
  if docs < 1 or seq_len % docs:
    raise ValueError(f"docs={docs} must be >= 1 and divide seq_len={seq_len}")
  from experiments import base  # noqa: PLC0415 (ml_collections only needed here)
  from mmfree_jax.train import memory  # noqa: PLC0415
  from mmfree_jax.train.optim import make_optimizer  # noqa: PLC0415
  from mmfree_jax.train.step import init_state  # noqa: PLC0415

  auto = remat == memory.AUTO
  if auto and "unroll_layers" in model_kw:
    raise ValueError("remat='auto' picks unroll_layers too; drop it from the case")
  cfg = preset(size, arch, remat="lean" if auto else remat, attention_impl=attention_impl,
               **model_kw)
  tx, sched = make_optimizer(base.get_config(), 1000)
  # The batch split over as many devices as divide it (one GPU: all of it on that one).
  mesh = sharding.make_mesh({"data": -1}, jax.devices()[:math.gcd(batch, jax.device_count())])
  with jax.set_mesh(mesh):
    state = init_state(cfg, tx, mesh, 0)
    rng = np.random.default_rng(0)
    batches = [{"inputs": jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq_len)), jnp.int32),
                "targets": jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq_len)), jnp.int32),
                "weights": jnp.ones((batch, seq_len), jnp.float32)} for _ in range(2)]
    if docs > 1:
      seg = jnp.repeat(jnp.arange(1, docs + 1, dtype=jnp.int32), seq_len // docs)
      for bt in batches:
        bt["segment_ids"] = jnp.broadcast_to(seg, (batch, seq_len))
    batches = jax.device_put(batches, sharding.batch_sharding(mesh))
    t0 = time.perf_counter()
    compile_step = memory.step_compiler(cfg, tx, sched, state, mesh, seq_len, docs > 1)
    plan = memory.plan(compile_step, memory.Layout(cfg.remat, cfg.unroll_layers), batch,
                       mesh.size, memory.device_budget(), auto=auto)
    compiled = plan.compiled
  holder, calls = [state], itertools.count()

  def one():
    holder[0], m = compiled(holder[0], batches[next(calls) % 2])
    return m["loss"]
  return plan.layout.apply(cfg), one, time.perf_counter() - t0, compiled, plan


def train_case(arch: str, size: str, batch: int, remat: str = "lean", seq_len: int = 2048,
               iters: int = 10, attention_impl: str = "xla", profile: bool = False,
               out_dir: str = "/tmp/profile", docs: int = 1, **model_kw) -> dict:
  """Full train step (AdamW, clip, bf16 compute, float32 master weights) on random tokens, as
  the trainer compiles it (`layout`: what ran, `remat="auto"` picks it; `planned_peak_GiB`:
  the compiled step's peak); on NVIDIA GPUs also the median SM clock, power and temperature during the timed steps
  (`GpuSampler`). `profile=True` then traces the same compiled step (`profile_case`'s
  columns, written under `out_dir`): the timing and the profile for one compile. `docs` > 1
  packs that many documents per row (document resets, as training on a corpus does; the
  official numbers are without, so such rows carry no speed-up over them)."""
  cfg, one, compile_s, compiled, plan = _train_setup(arch, size, batch, remat, seq_len,
                                                     attention_impl, docs, **model_kw)
  with GpuSampler() as gpu:
    t = median_time(one, iters)
  tps = batch * seq_len / t
  fl = flops_lib.train_flops_per_token(cfg, seq_len) * tps
  # attention's implementation is part of a Transformer++ row's name: XLA's attention is
  # ~3x slower than cuDNN's at 370M (BENCHMARKS.md), so a row must say which one it timed
  attn = {"attention": attention_impl} if arch == "transformer" else {}
  packed = {"docs": docs} if docs > 1 else {}
  tag = "".join(f"-{k}={v}" for k, v in {**attn, **packed, **model_kw}.items())
  row = {"case": f"train-{arch}-{size}-b{batch}-{remat}{tag}", "step_ms": t * 1e3,
         "tokens_per_s": tps, "peak_GiB": peak_gib(), "compile_s": compile_s,
         "mfu_989": fl / 989e12, "mfu_810": fl / flops_lib.H200_MEASURED_PEAK,
         "params": param_counts(cfg)["total"], "layout": str(plan.layout),
         "planned_peak_GiB": plan.memory.peak / 2**30, **gpu.summary(),
         **({} if packed else vs_official(arch, size, batch, tps))}
  if profile:
    row.update(_trace_kernels(one, compiled, out_dir))
  return row


def _short_op_name(name: str) -> str:
  """`jit(step)/transpose(jvp(LM))/while/body/closed_call/layers/attn/f_proj/mul` ->
  `bwd:LM/layers/attn/f_proj/mul` (`eval_jaxpr` in a path = remat recomputation)."""
  bwd = "transpose(" in name
  parts = []
  for p in name.split("/"):
    if p.startswith("jit("):
      continue
    while p.startswith(("transpose(", "jvp(", "vmap(")) and p.endswith(")"):
      p = p[p.index("(") + 1:-1]
    if p not in ("while", "body", "closed_call", "cond", "checkpoint", "remat",
                 "rematted_computation"):
      parts.append(p)
  return ("bwd:" if bwd else "fwd:") + "/".join(parts)


def _hlo_name(name: str) -> str:
  """An HLO instruction or kernel name as `hlo_sources` keys it (`[A-Za-z0-9_]` only)."""
  return re.sub(r"[^A-Za-z0-9_]", "_", name)


def hlo_sources(hlo_text: str) -> dict[str, dict]:
  """Per HLO instruction (name normalised to `[A-Za-z0-9_]`): its opcode, shape and the
  JAX op names (module path + primitive, by count) of everything it runs — a fusion's
  names are those of the instructions inside its fused computation. `transpose(...)`
  in a name marks backward-pass work."""
  comp_lines: dict[str, collections.Counter] = {}
  insts: dict[str, dict] = {}
  comp = None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and not line.startswith(" "):
      comp = head.group(1)
      comp_lines[comp] = collections.Counter()
      continue
    m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\(", line)
    if not m or comp is None:
      continue
    name, shape, op = m.groups()
    src = re.search(r'op_name="([^"]*)"', line)
    where = _short_op_name(src.group(1)) if src else None
    if where and not where.endswith(":"):
      comp_lines[comp][where] += 1
    calls = re.search(r"calls=%?([\w.\-]+)", line)
    insts[_hlo_name(name)] = {"op": op, "shape": shape[:40], "where": where,
                              "calls": calls.group(1) if calls else None}
  for inst in insts.values():
    lines = comp_lines.get(inst.pop("calls") or "", collections.Counter())
    inst["lines"] = [w for w, _ in lines.most_common(4)] or ([inst["where"]] if inst["where"] else [])
  return insts


def attribute_kernels(events: list[dict], sources: dict[str, dict], steps: int
                      ) -> tuple[dict[str, dict], dict[str, float]]:
  """GPU kernel time per step from trace events: by kernel name (ms, calls, the HLO op and
  shape of its first call, the model code its time went to, most first) and by model
  module. A kernel is matched to its HLO instruction (`hlo_sources`) by the trace's
  `hlo_op` annotation where there is one (library GEMMs and Pallas calls are named after
  their kernel, not the instruction), else by its own name (XLA fusions)."""
  pids = {e["pid"]: e.get("args", {}).get("name", "") for e in events
          if e.get("ph") == "M" and e.get("name") == "process_name"}
  kernels: dict[str, dict] = {}
  by_module: dict[str, float] = collections.defaultdict(float)
  for e in events:
    if e.get("ph") != "X" or "GPU" not in pids.get(e.get("pid"), ""):
      continue
    hlo_op = (e.get("args") or {}).get("hlo_op")
    info = ((sources.get(_hlo_name(hlo_op)) if hlo_op else None)
            or sources.get(_hlo_name(e["name"]), {}))
    ms = e.get("dur", 0.0) / steps / 1e3
    row = kernels.setdefault(e["name"][:60], {"ms": 0.0, "calls": 0, "op": info.get("op"),
                                              "shape": info.get("shape"),
                                              "wheres": collections.Counter()})
    row["ms"] += ms
    row["calls"] += 1
    for line in info.get("lines", []):
      row["wheres"][line] += ms
    where = info.get("where") or "?"
    by_module[where.rsplit("/", 1)[0] if "/" in where else where] += ms
  for row in kernels.values():
    row["lines"] = [w for w, _ in row.pop("wheres").most_common(4)]
  return kernels, dict(by_module)


def profile_case(arch: str, size: str, batch: int, remat: str = "lean", seq_len: int = 2048,
                 out_dir: str = "/tmp/profile", top: int = 40, **model_kw) -> dict:
  """Traces 3 train steps; device kernel time per step, by kernel and by model module.

  Kernels are matched to HLO instructions of the compiled step (`attribute_kernels`), and
  each instruction to the JAX op names it was traced from (`hlo_sources`), so the table
  says which model code (forward or backward) the time goes to. Writes the optimised HLO
  and `kernels.json` next to the trace.
  """
  _, one, _, compiled, _ = _train_setup(arch, size, batch, remat, seq_len, "xla", **model_kw)
  tag = "".join(f"-{k}={v}" for k, v in model_kw.items())
  return {"case": f"profile-{arch}-{size}-b{batch}-{remat}{tag}",
          **_trace_kernels(one, compiled, out_dir, top)}


def _trace_kernels(one: Callable[[], Any], compiled, out_dir: str, top: int = 40) -> dict:
  """Traces 3 calls of `one` (the compiled step); `profile_case`'s columns."""
  import glob  # noqa: PLC0415
  import gzip  # noqa: PLC0415
  hlo = compiled.as_text()
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "step.hlo.txt"), "w") as f:
    f.write(hlo)
  sources = hlo_sources(hlo)
  for _ in range(2):
    jax.block_until_ready(one())
  with jax.profiler.trace(out_dir, create_perfetto_trace=True):
    for _ in range(3):
      jax.block_until_ready(one())
  path = sorted(glob.glob(f"{out_dir}/**/perfetto_trace.json.gz", recursive=True))[-1]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  kernels, by_module = attribute_kernels(events, sources, steps=3)
  ranked = sorted(kernels.items(), key=lambda kv: -kv[1]["ms"])
  modules = sorted(by_module.items(), key=lambda kv: -kv[1])
  with open(os.path.join(out_dir, "kernels.json"), "w") as f:
    json.dump({"kernels": ranked, "by_module": modules}, f, indent=1)
  return {"device_ms_per_step": sum(v["ms"] for v in kernels.values()),
          "top_kernels": [(k, round(v["ms"], 2), v["calls"] // 3, v["op"], v["shape"],
                           v["lines"]) for k, v in ranked[:top]],
          "by_module": [(k, round(v, 2)) for k, v in modules[:top]]}


def decode_case(arch: str, size: str, batch: int = 1, prompt: int = 128, new: int = 256,
                packed: bool = False, iters: int = 3) -> dict:
  """Per-token generation latency (greedy, whole loop on device) and peak memory.

  ms/token = (time(prompt + `new` tokens) - time(prompt + `new`/8 tokens)) / (7/8 `new`):
  the prefill and launch costs cancel.
  """
  from mmfree_jax.infer import generate as gen  # noqa: PLC0415
  from mmfree_jax.infer import packed as packed_lib  # noqa: PLC0415
  cfg = preset(size, arch)
  params = jax.jit(lambda k: nn.unbox(init_params(cfg, k)))(jax.random.key(0))
  if packed:
    params = packed_lib.pack_params(cfg, params)
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, cfg.vocab_size, (batch, prompt)).tolist()
  short = max(new // 8, 1)
  times = {}
  for n in (short, new):
    times[n] = median_time(lambda: gen.generate(cfg, params, prompts, n).tokens, iters, warmup=1)
  ms = (times[new] - times[short]) / (new - short) * 1e3
  return {"case": f"decode-{arch}-{size}-b{batch}-p{prompt}{'-packed' if packed else ''}",
          "ms_per_token": ms, "tokens_per_s": batch * 1e3 / ms, "peak_GiB": peak_gib(),
          "speedup_vs_official_80ms": (80.0 / ms if batch == 1 and card() == OFFICIAL_CARD
                                       else None)}


CASES: dict[str, Callable[..., dict]] = {
    "bitlinear": bitlinear_case, "bitlinear_bwd": bitlinear_bwd_case,
    "bitlinear_codes": bitlinear_codes_case, "gemm": gemm_case,
    "recurrence": recurrence_case, "gates": gates_case, "train": train_case, "profile": profile_case,
    "decode": decode_case}
