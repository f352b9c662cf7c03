"""The train step's memory plan, made before its first run, and the layout chooser behind
`model.remat="auto"`.

The trainer (and the bench) compile the step, read `compiled.memory_analysis()` and compare
its peak with what the device's allocator may hand out under the settings in force
(`memory_stats()["bytes_limit"]`: on a GPU `XLA_PYTHON_CLIENT_MEM_FRACTION` of the card).
A step that does not fit is refused in one line naming the options that would, with their
compiled peaks; alternatives are compiled only then. On CPU no limit is known and nothing
is checked.

A layout is (remat policy, unrolled layers or the layer loop, micro-batches per step).
`model.remat="auto"` compiles candidates in `preferences` order and keeps the first that
fits, so a step that fits as preferred compiles once (a candidate whose peak, extrapolated
from two with fewer micro-batches, is over the budget by 10% is not compiled). The order
comes from these train steps (H100 80GB, sequence 2048; BENCHMARKS.md "H100 beside the
official code: layouts and the allocator", and "H100 memory-saving mode" for `full`):

  | model, batch | layout (remat, layers)  | tokens/s | peak GiB |
  |--------------|-------------------------|----------|----------|
  | 370M b8      | lean, loop              | 138,757  | 16.9     |
  | 370M b16     | lean, unrolled          | 185,131  | 35.8     |
  | 370M b16     | full, loop              | 147,870  | 14.2     |
  | 1.3B b8      | lean, unrolled          |  63,043  | 44.2     |
  | 1.3B b8      | lean, loop              |  53,605  | 41.6     |
  | 1.3B b16     | lean, unrolled          |  67,213  | 70.2     |
  | 1.3B b16     | full, loop              |  54,344  | 35.2     |

Unrolled layers beat the loop by 18% (1.3B b8) for 6% more memory. At 1.3B, halving the
micro-batch (b16 -> two micro-batches of 8: `train.grad_accum=2`, same training) costs 6%,
less than the loop or `full` remat (-12% against lean unrolled in the same-card
pair, 61,764 tok/s), while it nearly halves the activations. `full` keeps only each block's
input (the smallest peak: 14.2 against 35.8 GiB at 370M b16) and needs the loop. `none` was
slower and larger than `lean` (370M b16, H200: 113,793 against 146,412 tok/s, 122 against
29.0 GiB) and `lean_inputs` gave the same peak and speed as `lean` (BENCHMARKS.md,
2026-12-05): neither is a candidate. So: lean remat with unrolled layers at the fewest
micro-batches that fit, else full remat in the loop at the fewest micro-batches that fit.
(At 370M, where a halved micro-batch may cost more than the loop, the preferred layout fits
an 80 GB card at b16.)
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mmfree_jax import sharding
from mmfree_jax.config import REMAT_POLICIES, ConfigError, ModelConfig

GIB = 2**30
AUTO = "auto"
# The trainer's and the bench's allocator on GPUs, where the environment sets none:
# preallocate this fraction of the card once (one pool: a step's large temporaries are
# carved out of it; allocated on demand they may not be, though the total fits).
TRAINING_MEM_FRACTION = 0.95
JAX_DEFAULT_MEM_FRACTION = 0.75
_FRACTION_VARS = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")
_MAX_FRACTION = 0.98  # a larger fraction leaves no room for the CUDA context and libraries


def allocator_env(env: Mapping[str, str]) -> dict[str, str]:
  """`env` plus the training allocator settings it does not set itself: preallocation of
  `TRAINING_MEM_FRACTION` of each GPU."""
  out = dict(env)
  out.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
  if not any(out.get(v) for v in _FRACTION_VARS):
    out["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{TRAINING_MEM_FRACTION}"
  return out


def set_allocator_defaults():
  """`allocator_env` applied to this process; effective only before JAX creates its GPU
  backend (the first `jax.devices()`), so entry points call it first."""
  os.environ.update(allocator_env(os.environ))


@dataclasses.dataclass(frozen=True)
class Layout:
  """How the step lays out its work; none of it changes what is trained (up to the order of
  float sums)."""
  remat: str
  unroll_layers: bool
  grad_accum: int = 1

  def __str__(self) -> str:
    return (f"remat={self.remat}, {'unrolled' if self.unroll_layers else 'loop'}, "
            f"grad_accum={self.grad_accum}")

  def apply(self, cfg: ModelConfig) -> ModelConfig:
    return cfg.replace(remat=self.remat, unroll_layers=self.unroll_layers)


def preferences(grad_accum: int, batch_size: int, batch_shards: int) -> list[Layout]:
  """`model.remat="auto"`'s candidates, preferred first (the module docstring says why):
  lean + unrolled, then full + loop, each at `grad_accum` micro-batches and then twice,
  four times ... as many while every micro-batch still splits over the `batch_shards`
  data-parallel devices."""
  accums, g = [grad_accum], 2 * grad_accum
  while batch_size % g == 0 and (batch_size // g) % batch_shards == 0:
    accums.append(g)
    g *= 2
  return ([Layout("lean", True, a) for a in accums]
          + [Layout("full", False, a) for a in accums])


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """Per-device bytes of a compiled step (`compiled.memory_analysis()`)."""
  argument: int
  output: int
  alias: int          # outputs written into donated arguments
  temp: int
  code: int
  compiler_peak: int  # XLA's own peak; 0 on CPU (where it counts only the arguments)

  @property
  def peak(self) -> int:
    return max(self.argument + self.output - self.alias + self.temp + self.code,
               self.compiler_peak)


def step_memory(compiled, platform: str) -> StepMemory:
  m = compiled.memory_analysis()
  compiler_peak = 0 if platform == "cpu" else int(getattr(m, "peak_memory_in_bytes", 0) or 0)
  return StepMemory(int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                    int(m.alias_size_in_bytes), int(m.temp_size_in_bytes),
                    int(m.generated_code_size_in_bytes), compiler_peak)


def gib(n: float) -> str:
  return f"{n / GIB:.1f}" if n >= GIB else f"{n / GIB:.2g}"


@dataclasses.dataclass(frozen=True)
class Budget:
  """What the allocator may hand out per device; `usable` None: unknown (CPU), no check."""
  usable: int | None
  fraction: float = 1.0      # of the device's memory (GPU: the allocator fraction in force)
  preallocate: bool = True
  platform: str = "gpu"

  @property
  def device_bytes(self) -> float | None:
    return None if self.usable is None else self.usable / self.fraction

  def describe(self) -> str:
    """"75.6 GiB usable (0.95 of 79.6 GiB, preallocated)"."""
    if self.usable is None:
      return f"no device memory limit known on {self.platform}, not checked"
    text = f"{gib(self.usable)} GiB usable"
    if self.platform == "gpu":
      how = ("preallocated" if self.preallocate else "allocated on demand: a large temporary "
             "may find no free block; unset XLA_PYTHON_CLIENT_PREALLOCATE")
      text += f" ({self.fraction:g} of {gib(self.device_bytes)} GiB, {how})"
    return text


def _env_fraction() -> float:
  value = next((os.environ[v] for v in _FRACTION_VARS if os.environ.get(v)), "")
  return float(value) if value else JAX_DEFAULT_MEM_FRACTION


def device_budget(device=None) -> Budget:
  """The budget of `device` (default: the first local one) under the allocator settings in
  force; with several processes the smallest of theirs, so all take the same decisions."""
  device = device or jax.local_devices()[0]
  if device.platform == "cpu":  # no limit to read (XLA:CPU allocates from the host)
    return Budget(None, platform="cpu")
  limit = int((device.memory_stats() or {}).get("bytes_limit") or 0)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    seen = multihost_utils.process_allgather(np.int64(limit))
    limit = 0 if np.any(seen == 0) else int(np.min(seen))
  if not limit:
    return Budget(None, platform=device.platform)
  if device.platform != "gpu":
    return Budget(limit, platform=device.platform)
  prealloc = os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "true") not in ("false", "False", "0")
  return Budget(limit, _env_fraction(), prealloc, "gpu")


class DoesNotFit(ConfigError):
  """The train step needs more memory than the device has; the message says what fits."""


def abstract_batch(batch_size: int, seq_len: int, batch_sharding, segment_ids: bool = True
                   ) -> dict[str, Any]:
  """The pipeline's batch (`data.pipeline`) as ShapeDtypeStructs; without `segment_ids`, a
  batch of one document per row (the bench's)."""
  keys = (("inputs", jnp.int32), ("targets", jnp.int32), ("segment_ids", jnp.int32),
          ("weights", jnp.float32))
  return {k: jax.ShapeDtypeStruct((batch_size, seq_len), dt, sharding=batch_sharding)
          for k, dt in keys if segment_ids or k != "segment_ids"}


def step_compiler(cfg: ModelConfig, tx, schedule, state, mesh, seq_len: int,
                  segment_ids: bool = True) -> Callable[[Layout, int], Any]:
  """`compile_step(layout, batch_size)`: the trainer's jitted step (donated state, batch split
  over data x fsdp) for `state`'s shapes and shardings and `abstract_batch`'s batch, lowered
  and compiled. Call it under `jax.set_mesh(mesh)`."""
  from mmfree_jax.train.step import make_train_step  # noqa: PLC0415 (step imports models)
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  abstract_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  batch_sh = sharding.batch_sharding(mesh)

  def compile_step(layout: Layout, batch_size: int):
    step = jax.jit(make_train_step(layout.apply(cfg), tx, layout.grad_accum, schedule),
                   in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                   donate_argnums=0)
    batch = abstract_batch(batch_size, seq_len, batch_sh, segment_ids)
    return step.lower(abstract_state, batch).compile()
  return compile_step


@dataclasses.dataclass
class Plan:
  """The layout the step runs with, its compiled step and memory, and what did not fit."""
  layout: Layout
  compiled: Any
  memory: StepMemory
  budget: Budget
  auto: bool
  tried: list[tuple[Layout, StepMemory]] = dataclasses.field(default_factory=list)

  def line(self) -> str:
    """"step peak 44.2 GiB of 75.6 GiB usable (...); layout remat=lean, unrolled, ..."."""
    peak = gib(self.memory.peak)
    head = (f"step peak {peak} GiB of {self.budget.describe()}" if self.budget.usable is not None
            else f"step peak {peak} GiB ({self.budget.describe()})")
    how = ", chosen by model.remat=auto" if self.auto else ""
    if self.tried:
      how += "; did not fit: " + ", ".join(f"{l} ({gib(m.peak)} GiB)" for l, m in self.tried)
    return f"{head}; layout {self.layout}{how}"

  def record(self) -> dict[str, Any]:
    """What metrics.jsonl (its first row after the start) and summary.json keep (RECORD_KEYS)."""
    usable = self.budget.usable
    return {"layout_remat": self.layout.remat, "layout_unroll_layers": self.layout.unroll_layers,
            "layout_grad_accum": self.layout.grad_accum, "layout_auto": self.auto,
            "step_peak_GiB": self.memory.peak / GIB,
            "usable_GiB": None if usable is None else usable / GIB}


RECORD_KEYS = ("layout_remat", "layout_unroll_layers", "layout_grad_accum", "layout_auto",
               "step_peak_GiB", "usable_GiB")


class _Compiler:
  """Compiles layouts on demand and remembers their memory (not their executables)."""

  def __init__(self, compile_step: Callable[[Layout, int], Any], batch_size: int,
               platform: str):
    self._compile, self.batch_size, self._platform = compile_step, batch_size, platform
    self._seen: dict[tuple[Layout, int], StepMemory] = {}

  def __call__(self, layout: Layout, batch_size: int | None = None):
    batch_size = batch_size or self.batch_size
    compiled = self._compile(layout, batch_size)
    self._seen[(layout, batch_size)] = mem = step_memory(compiled, self._platform)
    return compiled, mem

  def peak(self, layout: Layout, batch_size: int | None = None) -> int:
    key = (layout, batch_size or self.batch_size)
    if key not in self._seen:
      self(*key)
    return self._seen[key].peak


def plan(compile_step: Callable[[Layout, int], Any], layout: Layout, batch_size: int,
         batch_shards: int, budget: Budget, auto: bool = False) -> Plan:
  """Compiles the step as `layout` and checks its peak against `budget`; with `auto`, the
  first of `preferences(layout.grad_accum, ...)` that fits instead (the first, unchecked,
  where the budget is unknown). `compile_step(layout, batch_size)` returns the compiled step
  (`step_compiler`). Raises DoesNotFit naming the options that fit, with their peaks;
  alternatives are compiled only then.
  """
  compiler = _Compiler(compile_step, batch_size, budget.platform)
  if auto:
    return _choose(compiler, preferences(layout.grad_accum, batch_size, batch_shards), budget)
  compiled, mem = compiler(layout)
  if budget.usable is None or mem.peak <= budget.usable:
    return Plan(layout, compiled, mem, budget, auto=False)
  raise DoesNotFit(_what_fits(compiler, layout, mem, budget, batch_shards))


# A candidate predicted to need this much more than the budget is not compiled.
_SKIP_ABOVE = 1.1


def _extrapolated(seen: list[tuple[float, int]], rows: float) -> float | None:
  """The peak at `rows` rows per micro-batch, linear (state + activations) through the last
  two (rows, peak) points of `seen`; None before two."""
  if len(seen) < 2 or seen[-1][0] == seen[-2][0]:
    return None
  (x1, p1), (x2, p2) = seen[-2:]
  return p1 + (p2 - p1) / (x2 - x1) * (rows - x1)


def _predicted_peak(layout: Layout, tried: list[tuple[Layout, StepMemory]]) -> float | None:
  """`layout`'s peak extrapolated from the tried layouts that differ only in grad_accum."""
  same = [(1 / l.grad_accum, m.peak) for l, m in tried
          if (l.remat, l.unroll_layers) == (layout.remat, layout.unroll_layers)]
  return _extrapolated(same, 1 / layout.grad_accum)


def _choose(compiler: _Compiler, candidates: list[Layout], budget: Budget) -> Plan:
  tried: list[tuple[Layout, StepMemory]] = []
  for layout in candidates:
    if budget.usable is not None:
      predicted = _predicted_peak(layout, tried)
      if predicted is not None and predicted > _SKIP_ABOVE * budget.usable:
        continue  # e.g. a batch of 256 on one card: from 1 and 2 micro-batches straight to 32
    compiled, mem = compiler(layout)
    if budget.usable is None or mem.peak <= budget.usable:
      return Plan(layout, compiled, mem, budget, auto=True, tried=tried)
    tried.append((layout, mem))
    if mem.argument > budget.usable:  # the state alone does not fit: no layout will
      break
  options = _fraction_option(min(m.peak for _, m in tried), budget) + [
      "shard the state over more devices (mesh.fsdp) or lower train.batch_size"]
  raise DoesNotFit(f"no layout of the train step fits {budget.describe()} per device: "
                + ", ".join(f"{l} needs {gib(m.peak)} GiB" for l, m in tried)
                + f" (of which train state and batch {gib(tried[-1][1].argument)} GiB); "
                + "; ".join(options))


def _fraction_option(peak: int, budget: Budget) -> list[str]:
  """The allocator fraction that would fit `peak`, if one up to _MAX_FRACTION does."""
  if budget.platform != "gpu" or budget.device_bytes is None:
    return []
  need = math.ceil(peak / budget.device_bytes * 100) / 100
  if need > _MAX_FRACTION:
    return []
  return [f"XLA_PYTHON_CLIENT_MEM_FRACTION={need:.2f} ({gib(need * budget.device_bytes)} GiB "
          "usable)"]


# Remat policies from the least memory to the most (ModelConfig.remat).
_REMAT_WEIGHT = {p: i for i, p in enumerate(("full", "lean", "lean_inputs", "none"))}
assert set(_REMAT_WEIGHT) == set(REMAT_POLICIES)


def _lighter_layouts(layout: Layout) -> list[Layout]:
  """Layouts at the same micro-batches that keep less than `layout` by construction, the
  fastest first: the loop (same remat), lean remat (same layers), lean in the loop, full."""
  g, weight = layout.grad_accum, _REMAT_WEIGHT[layout.remat]
  out = []
  for other in (Layout(layout.remat, False, g), Layout("lean", layout.unroll_layers, g),
                Layout("lean", False, g), Layout("full", False, g)):
    no_heavier = (_REMAT_WEIGHT[other.remat] <= weight
                  and other.unroll_layers <= layout.unroll_layers)
    if no_heavier and other != layout and other not in out:
      out.append(other)
  return out


def _first_fit(compiler: _Compiler, options: list[tuple[float, Layout, int]], usable: int,
               known: tuple[float, int]) -> tuple[tuple[Layout, int], int] | None:
  """The first of `options` (rows per micro-batch, layout, batch size) whose compiled peak
  fits, and that peak. From the `known` (rows, peak) point and one miss on, an option whose
  extrapolated peak is over `usable` by 10% is not compiled."""
  seen = [known]
  for rows, layout, batch in options:
    guess = _extrapolated(seen, rows)
    if guess is not None and guess > _SKIP_ABOVE * usable:
      continue
    peak = compiler.peak(layout, batch)
    if peak <= usable:
      return (layout, batch), peak
    seen.append((rows, peak))
  return None


def _what_fits(compiler: _Compiler, layout: Layout, mem: StepMemory, budget: Budget,
               batch_shards: int) -> str:
  """One line: `layout`'s peak, the budget, and the options that fit with their peaks. Per
  kind of option (another layout, more micro-batches, a smaller batch) the first that fits
  is named; the allocator fraction is computed, not compiled."""
  usable, g, b = budget.usable, layout.grad_accum, compiler.batch_size
  fits: list[str] = []
  for other in _lighter_layouts(layout):
    peak = compiler.peak(other)
    if peak <= usable:
      change = [f"model.remat={other.remat}"] if other.remat != layout.remat else []
      if other.unroll_layers != layout.unroll_layers:
        change.append(f"model.unroll_layers={other.unroll_layers}")
      fits.append(f"{' '.join(change)} ({gib(peak)} GiB)")
      break
  halvings = range(1, b.bit_length())
  accums = [g << k for k in halvings if b % (g << k) == 0 and (b // (g << k)) % batch_shards == 0]
  found = _first_fit(compiler, [(b / a, dataclasses.replace(layout, grad_accum=a), b)
                                for a in accums], usable, (b / g, mem.peak))
  if found:
    (other, _), peak = found
    fits.append(f"train.grad_accum={other.grad_accum} ({gib(peak)} GiB)")
  batches = [b >> k for k in halvings if b % (1 << k) == 0 and (b >> k) % (g * batch_shards) == 0]
  found = _first_fit(compiler, [(x / g, layout, x) for x in batches], usable, (b / g, mem.peak))
  if found:
    (_, smaller), peak = found
    fits.append(f"train.batch_size={smaller}, {smaller // batch_shards} per device "
                f"({gib(peak)} GiB)")
  fits += _fraction_option(mem.peak, budget)
  what = ("these fit: " + "; ".join(fits)) if fits else "no other layout or batch tried fits"
  return (f"the train step needs {gib(mem.peak)} GiB per device but there are "
          f"{budget.describe()} (layout {layout}); {what}; model.remat=auto takes the fastest "
          "layout that fits")
