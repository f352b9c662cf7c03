"""Measuring: the median time of a call, the GPU's clocks while it runs, peak memory, each
card's HBM bandwidth and the official code's numbers (SPEC §5) to compare with."""

from __future__ import annotations

import math
import shutil
import statistics
import subprocess
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

# Official PyTorch/Triton code on one H200 (OFFICIAL_CARD), SPEC §5: (tokens/s, peak GiB).
OFFICIAL_CARD = "H200"
OFFICIAL = {
    ("mmfree", "370M", 8): (74_170, 25.1), ("mmfree", "370M", 16): (105_436, 45.3),
    ("mmfree", "1.3B", 8): (43_177, 57.2), ("mmfree", "1.3B", 16): (48_464, 96.5),
    ("transformer", "370M", 8): (89_932, 36.1), ("transformer", "1.3B", 8): (38_353, 73.1),
}
# Measured elementwise copy bandwidth (bytes read + written per second), so HBM floors are
# per card: the H200's from SPEC §5, the H100's from a 1 GiB bf16 elementwise copy
# (BENCHMARKS.md, "NVIDIA H100 80GB HBM3"). Other devices are counted as an H200.
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
  runs). `summary()` gives the medians, or {} where nvidia-smi is missing or
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


def rel_err(got, want) -> float:
  """Largest |got - want| of each pair relative to max |want|, maximised over the pairs."""
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return max(float(jnp.max(jnp.abs(f32(g) - f32(w))) / jnp.max(jnp.abs(f32(w))))
             for g, w in zip(got, want))
