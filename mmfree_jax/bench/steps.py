"""Model-level cases: the whole train step (against the official code), its kernel profile,
and per-token generation."""

from __future__ import annotations

import itertools
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmfree_jax import flops as flops_lib
from mmfree_jax import sharding
from mmfree_jax.bench.measure import (OFFICIAL_CARD, GpuSampler, card, median_time, peak_gib,
                                      vs_official)
from mmfree_jax.bench.profile import trace_kernels
from mmfree_jax.config import preset
from mmfree_jax.models import init_params, param_counts


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
  # several times slower than cuDNN's (BENCHMARKS.md, "H200 train step"), so a row must say
  # which one it timed
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
    row.update(trace_kernels(one, compiled, out_dir))
  return row


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
          **trace_kernels(one, compiled, out_dir, top)}


def decode_case(arch: str, size: str, batch: int = 1, prompt: int = 128, new: int = 256,
                packed: bool = False, iters: int = 3) -> dict:
  """Per-token generation latency (greedy, whole loop on device) and peak memory.

  ms/token = (time(prompt + `new` tokens) - time(prompt + `new`/8 tokens)) / (7/8 `new`):
  the prefill and launch costs cancel.
  """
  from mmfree_jax.infer import generate as gen  # noqa: PLC0415
  from mmfree_jax.interop import packed as packed_lib  # noqa: PLC0415
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
