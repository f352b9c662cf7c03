"""Ahead-of-time fit check: compile the real sharded train step for a target, print memory.
    python -m mmfree_jax.aot --config=experiments/paper.py:mmfree-1.3B --topology=v5p-32
    python -m mmfree_jax.aot --config=experiments/paper.py:mmfree-1.3B --target=h200 --devices=8
    python -m mmfree_jax.aot --plan    # every paper point on the slices of PLAN_SLICES
Exit 0 = fits, 1 = does not fit, 2 = bad input."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from typing import Any, Iterator, Sequence

from absl import flags, logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import optax

from mmfree_jax import cli
from mmfree_jax import multihost
from mmfree_jax import sharding
from mmfree_jax.config import ConfigError, ModelConfig
from mmfree_jax.layers import attention
from mmfree_jax import flops as flops_lib
from mmfree_jax import hlo_stats
from mmfree_jax.models import init_params, param_counts

# Several TPU slices: --topology=v5e:16x16 --num_slices=2 (the data axis spans slices).
# TPU targets compile on this (CPU) host against abstract TPU devices from libtpu
# (`pip install -r requirements-tpu.txt`); an over-large model fails to compile with
# RESOURCE_EXHAUSTED, translated into a DOES NOT FIT line. GPU targets compile the same
# step for N CPU devices and compare the per-device total with the card's memory times
# `--mem_fraction`: a conservative estimate (XLA:CPU fuses less and keeps f32 copies; for
# 1.3B at 16 sequences per device it gave 88 GiB where the TPU compiler needs 55 GiB);
# `--target=local` compiles for the attached accelerators (exact on a GPU host).
# The program is the trainer's for that platform: the report names what the platform
# decided (the attention implementation, the int8 matmuls, the Pallas kernels compiled).

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One compiled device of a target: usable memory, dense bf16 and int8 peaks."""
  name: str
  hbm_gib: float
  peak_flops: float
  int8_peak: float
  dims: int = 0              # TPU torus rank (2 or 3); 0 for GPUs
  cores_in_name: bool = False  # v4-64 / v5p-32 count TensorCores (2 per chip)
  devices_per_chip: int = 1


# Usable HBM per compiled device as libtpu 0.0.42 reports it in RESOURCE_EXHAUSTED.
# libtpu compiles v4 per TensorCore (2 devices of 15.25 GiB per chip), v5p megacore.
TPUS = {
    "v4": Chip("TPU v4", 15.25, 275e12 / 2, 275e12 / 2, 3, True, 2),
    "v5p": Chip("TPU v5p", 95.74, 459e12, 918e12, 3, True),
    "v5e": Chip("TPU v5e", 15.75, 197e12, 394e12, 2),
    "v6e": Chip("TPU v6e", 31.25, 918e12, 1836e12, 2),
}
_TPU_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}

# Nominal memory per card (GiB); JAX's allocator gets `XLA_PYTHON_CLIENT_MEM_FRACTION` of it.
GPUS = {
    "h100": Chip("NVIDIA H100 80GB", 79.6, 989e12, 1979e12),
    "h200": Chip("NVIDIA H200", 139.8, 989e12, 1979e12),
    "b200": Chip("NVIDIA B200", 178.0, 2250e12, 4500e12),
    "a100-40": Chip("NVIDIA A100 40GB", 39.4, 312e12, 624e12),
    "a100-80": Chip("NVIDIA A100 80GB", 79.2, 312e12, 624e12),
    "l4": Chip("NVIDIA L4", 22.0, 121e12, 242e12),
}

# The plan's slices (`--plan`): slices rented by the hour, up to 64 chips (a compile for 64
# chips takes ~10 minutes on a CPU host; the time grows with the chip count).
PLAN_SLICES = ("v5e-64", "v5p-16", "v5p-32", "v6e-16", "v6e-32", "v6e-64")


@dataclasses.dataclass(frozen=True)
class TpuTopology:
  gen: str          # v4 | v5p | v5e | v6e
  name: str         # libtpu topology name, e.g. "v5p:2x2x4"
  shape: tuple[int, ...]
  chips: int

  @property
  def chip(self) -> Chip:
    return TPUS[self.gen]


def _torus(chips: int, dims: int) -> tuple[int, ...]:
  """Cloud's slice shapes: double the smallest axis (the last on ties)."""
  shape = [1, 1] if dims == 2 else [2, 2, 1]
  if dims == 3 and chips < 4:
    raise ConfigError(f"{chips} chips: 3D TPU slices start at 4 chips (v4-8 / v5p-8)")
  while math.prod(shape) < chips:
    i = max(j for j in range(dims) if shape[j] == min(shape))
    shape[i] *= 2
  return tuple(shape)


def parse_topology(name: str) -> TpuTopology:
  """"v5p-32", "v5e-16", "v5litepod-16", "v6e-256", "v4-64" or "v5e:4x4", "v5p:2x2x4"."""
  s = name.strip().lower()
  m = re.fullmatch(r"([a-z0-9]+?)(?:-(\d+)|:(\d+(?:x\d+){1,2}))", s)
  gen = _TPU_ALIASES.get(m.group(1), m.group(1)) if m else None
  if not m or gen not in TPUS:
    raise ConfigError(f"--topology={name!r} is not a TPU topology; use e.g. v5e-16, v5e:4x4, "
                      f"v5p-32, v4-64, v6e-256 (generations {sorted(TPUS)})")
  chip = TPUS[gen]
  if m.group(2):
    n = int(m.group(2))
    chips = n // 2 if chip.cores_in_name else n
    if chips < 1 or chips & (chips - 1) or (chip.cores_in_name and n % 2):
      raise ConfigError(f"--topology={name!r}: {n} must give a power-of-two chip count")
    shape = _torus(chips, chip.dims)
  else:
    shape = tuple(int(x) for x in m.group(3).split("x"))
    if len(shape) != chip.dims:
      raise ConfigError(f"--topology={name!r}: {gen} slices are {chip.dims}D (e.g. "
                        f"{'v5e:4x4' if chip.dims == 2 else 'v5p:2x2x4'})")
  return TpuTopology(gen, f"{gen}:{'x'.join(map(str, shape))}", shape, math.prod(shape))


def tpu_devices(topo: TpuTopology, num_slices: int = 1) -> list[Any]:
  """Abstract (compile-only) devices of `num_slices` slices of `topo`, from libtpu."""
  try:
    import libtpu  # noqa: F401, PLC0415  # pytype: disable=import-error
  except ImportError:
    raise ConfigError("TPU targets need libtpu on this host: pip install -r requirements-tpu.txt "
                      "(or check a GPU target: --target=h200 --devices=8)") from None
  # libtpu on a non-TPU host: no metadata server, no lockfile, no TPU-worker warnings.
  for k, v in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_SKIP_MDS_QUERY", "1"),
               ("TPU_ACCELERATOR_TYPE", f"{topo.gen}-{topo.chips}"),
               ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0")):
    os.environ.setdefault(k, v)
  from jax.experimental import topologies  # noqa: PLC0415
  bounds = [min(topo.shape[0], 2), min(topo.shape[1], 2), 1]
  desc = topologies.get_topology_desc(topology_name=topo.name, platform="tpu",
                                      chips_per_host_bounds=bounds, num_slices=num_slices)
  return list(desc.devices)


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_train_inputs(config: ml_collections.ConfigDict, cfg: ModelConfig, tx, mesh):
  """(state, batch) as ShapeDtypeStructs carrying the trainer's shardings."""
  from mmfree_jax.train.step import TrainState  # noqa: PLC0415
  boxed = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  param_sh = sharding.logical_shardings(boxed, mesh)
  params = _abstract(nn.unbox(boxed), param_sh)
  opt = _abstract(jax.eval_shape(tx.init, params), sharding.opt_state_shardings(tx, params, param_sh, mesh))
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))
  state = TrainState(step=scalar, params=params, opt_state=opt, skipped=scalar)
  b, t = config.train.batch_size, config.data.seq_len
  bsh = sharding.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct((b, t), dt, sharding=bsh) for k, dt in (
      ("inputs", jnp.int32), ("targets", jnp.int32), ("segment_ids", jnp.int32),
      ("weights", jnp.float32))}
  return state, batch


@dataclasses.dataclass
class Report:
  fits: bool
  hbm_bytes: float
  mesh: dict[str, int]
  platform: str
  attention: str = ""  # the transformer's compiled attention (`attention.resolve_impl`)
  memory: dict[str, int] = dataclasses.field(default_factory=dict)  # per device
  needed: float = 0.0  # bytes per device a RESOURCE_EXHAUSTED compile asked for
  error: str = ""
  cost: dict[str, float] = dataclasses.field(default_factory=dict)  # XLA's cost analysis
  matmuls: hlo_stats.Matmuls = hlo_stats.Matmuls()
  kernels: list[str] = dataclasses.field(default_factory=list)

  @property
  def total(self) -> int:
    m = self.memory
    return m["argument"] + m["output"] - m["alias"] + m["temp"] if m else 0

  @property
  def used(self) -> float:
    """Per-device bytes: on TPUs the compiler's peak (it fails with RESOURCE_EXHAUSTED where
    the peak exceeds HBM; the total double-counts buffers that are never live together),
    elsewhere the larger of peak and total; after an OOM, at least what XLA asked for."""
    if not self.memory:
      return self.needed
    peak = self.memory["peak"]
    return peak if self.platform == "tpu" and peak else max(self.total, peak)


def _oom(msg: str, hbm_bytes: float) -> tuple[float, str]:
  """RESOURCE_EXHAUSTED text -> (bytes needed per device or 0, one line that says how much
  was needed, in all or of temporaries as XLA's message tells, and what there is)."""
  total = re.search(r"Total hbm usage >= ([\d.]+)([GMK])", msg)
  need = total or re.search(r"(?:temporaries|required)\D*\(?([\d.]+)\s*([GMK])", msg)
  have = re.search(r"available HBM \(([\d.]+)\s*([GMK])", msg) or re.search(r"of ([\d.]+)([GMK]) hbm", msg)
  unit = {"G": 1, "M": 1 / 1024, "K": 1 / 1024**2}
  if need and have:
    n, h = float(need.group(1)) * unit[need.group(2)], float(have.group(1)) * unit[have.group(2)]
    return n * GIB, (f"the step needs {n:.2f} GiB {'in all' if total else 'of temporaries'} per "
                     f"device but the chip has {h:.2f} GiB of HBM (XLA RESOURCE_EXHAUSTED)")
  first = msg.strip().splitlines()[0] if msg.strip() else "RESOURCE_EXHAUSTED"
  return 0.0, f"{first[:300]} (chip HBM {hbm_bytes / GIB:.2f} GiB)"


def check(config: ml_collections.ConfigDict, devices: list[Any], hbm_bytes: float) -> Report:
  """Compiles the trainer's step over `devices` with the config's mesh: per-device memory
  and cost, and what the platform decided."""
  from mmfree_jax.train import setup  # noqa: PLC0415
  from mmfree_jax.train.optim import make_optimizer  # noqa: PLC0415
  from mmfree_jax.train.step import make_train_step  # noqa: PLC0415
  config = _for_compile(config)
  cfg = setup.validate(config)
  platform = devices[0].platform
  mesh = multihost.make_mesh(config.mesh.to_dict(), devices)
  sharding.check_divisible(cfg, mesh, config.train.batch_size)
  tx, sched = make_optimizer(config, config.train.steps)
  report = Report(fits=False, hbm_bytes=hbm_bytes, mesh=dict(mesh.shape), platform=platform)
  if cfg.arch == "transformer":  # a kernel asked for off its platform fails here, in one line
    report.attention = attention.resolve_impl(cfg.attention_impl, platform, config.data.seq_len,
                                              cfg.dtype)
  state, batch = abstract_train_inputs(config, cfg, tx, mesh)
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  with jax.set_mesh(mesh):
    step = jax.jit(make_train_step(cfg, tx, config.train.grad_accum, sched),
                   in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sh, None), donate_argnums=0)
    try:
      compiled = step.lower(state, batch).compile()
    except Exception as e:  # noqa: BLE001 - XLA raises JaxRuntimeError / XlaRuntimeError
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      report.needed, report.error = _oom(str(e), hbm_bytes)
      return report
  m = compiled.memory_analysis()
  report.memory = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
                   "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
                   "code": m.generated_code_size_in_bytes,
                   "peak": int(getattr(m, "peak_memory_in_bytes", 0) or 0)}
  if platform == "cpu":  # XLA:CPU's "peak" counts only the arguments
    report.memory["peak"] = 0
  report.fits = report.used <= hbm_bytes
  cost = compiled.cost_analysis()
  report.cost = {k: float(cost.get(k, 0.0)) for k in ("flops", "bytes accessed")}
  hlo = compiled.as_text()
  report.matmuls, report.kernels = hlo_stats.matmuls(hlo), hlo_stats.pallas_kernels(hlo)
  return report


def _for_compile(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The corpus is irrelevant to memory: an empty one (the paper configs') compiles."""
  config = ml_collections.ConfigDict(config.to_dict())
  if not str(config.data.corpus).strip():
    config.data.corpus = "shakespeare"
  return config


def _compiled_line(cfg: ModelConfig, report: Report) -> str:
  """What the platform decided: the attention, the int8 matmuls, the Pallas kernels."""
  m = report.matmuls
  parts = [f"attention {report.attention} (model.attention_impl={cfg.attention_impl})"
           ] if report.attention else []
  if report.memory:
    parts += [f"{m.count} matmuls, {m.int8_count} of them int8 x int8",
              f"Pallas kernels: {', '.join(report.kernels) or 'none'}"]
  return f"compiled for {report.platform}: {'; '.join(parts)}" if parts else ""


def format_report(config: ml_collections.ConfigDict, target: str, chip: Chip, n_devices: int,
                  report: Report, mfu: float, mem_fraction: float = 1.0) -> str:
  """The human-readable report; the last line starts with FITS or DOES NOT FIT."""
  from mmfree_jax.train import setup  # noqa: PLC0415
  cfg = setup.model_config(_for_compile(config))
  n = param_counts(cfg)["total"]
  t = config.train
  g = lambda b: f"{b / GIB:.2f}"
  lines = [
      f"model: {cfg.arch} d={cfg.d_model} L={cfg.n_layers} ({n / 1e9:.2f}B params); batch "
      f"{t.batch_size}x{config.data.seq_len}, grad_accum {t.grad_accum}, remat {cfg.remat}, "
      f"dtype {cfg.dtype}",
      f"target: {target}: {n_devices} x {chip.name}, {g(report.hbm_bytes)} GiB usable per device"
      + (f" ({mem_fraction:g} of {chip.hbm_gib:g} GiB)" if mem_fraction != 1.0 else "")
      + f"; mesh {' '.join(f'{k}={v}' for k, v in report.mesh.items())}",
  ]
  if compiled := _compiled_line(cfg, report):
    lines.append(compiled)
  if report.memory:
    m = report.memory
    peak = f" | peak {g(m['peak'])}" if m["peak"] else ""
    lines.append(f"per-device memory (GiB): arguments {g(m['argument'])} | outputs {g(m['output'])} "
                 f"| aliased (donated) {g(m['alias'])} | temporaries {g(m['temp'])}{peak} | total "
                 f"{g(report.total)}")
    c, mm = report.cost, report.matmuls
    lines.append(f"cost analysis (XLA, per device, each loop body counted once): "
                 f"{c['flops'] / 1e12:.2f} TFLOP, {c['bytes accessed'] / 1e9:.2f} GB accessed")
    lines.append(f"estimate (compute-bound, a lower bound): {mm.seconds(chip):.2f} s/step: the "
                 f"compiled matmuls' {mm.flops / 1e12:.2f} TFLOP per device (loop bodies x trip "
                 f"counts; {mm.int8_flops / 1e12:.2f} of them int8) at {chip.peak_flops / 1e12:.0f} "
                 f"TFLOP/s bf16, {chip.int8_peak / 1e12:.0f} TOP/s int8")
    flops_tok = flops_lib.train_flops_per_token(cfg, config.data.seq_len)
    tps = mfu * chip.peak_flops / flops_tok
    step_s = t.batch_size * config.data.seq_len / (tps * n_devices)
    lines.append(f"estimate: {tps:,.0f} tokens/s per device at an assumed {mfu:.0%} MFU "
                 f"({flops_tok / 1e9:.2f} GFLOP/token, {chip.peak_flops / 1e12:.0f} TFLOP/s peak) "
                 f"-> {step_s:.2f} s/step")
    verdict = "FITS" if report.fits else "DOES NOT FIT"
    lines.append(f"{verdict}: {g(report.used)} of {g(report.hbm_bytes)} GiB per device "
                 f"({report.used / report.hbm_bytes:.0%})")
  else:
    lines.append(f"DOES NOT FIT: {report.error}")
  return "\n".join(lines)


def plan(slices: Sequence[str] = PLAN_SLICES) -> Iterator[str]:
  """A markdown table, row by row: every `paper` point (experiments/sweeps.py) compiled for
  each TPU slice at its global batch, fsdp over the slice."""
  from experiments import sweeps  # noqa: PLC0415
  yield ("| point | slice | mesh (data x fsdp x tensor) | batch / chip | peak / HBM (GiB) | fits "
         "| compiled | est. s/step at peak | est. hours for train.steps |")
  yield "|---|---|---|---|---|---|---|---|---|"
  for name, config in sweeps.points("paper"):
    for s in slices:
      topo = parse_topology(s)
      r = check(config, tpu_devices(topo), topo.chip.hbm_gib * GIB)
      mesh = " x ".join(str(r.mesh[a]) for a in sharding.MESH_AXES)
      per_chip = config.train.batch_size // topo.chips
      compiled = (f"{r.attention} attention" if r.attention else
                  f"{r.matmuls.int8_count}/{r.matmuls.count} int8 matmuls" if r.memory else "")
      step = r.matmuls.seconds(topo.chip) if r.memory else 0
      est = f"{step:.3g} | {step * config.train.steps / 3600:.3g}" if step else "- | -"
      used = f"{r.used / GIB:.1f}" if r.memory else f">= {r.used / GIB:.1f}"
      yield (f"| {name} | {s} | {mesh} | {per_chip} | {used} / {topo.chip.hbm_gib:g} | "
             f"{'FITS' if r.fits else 'OOM'} | {compiled} | {est} |")


_CONFIG = config_flags.DEFINE_config_file("config", "experiments/tiny.py", "Experiment config file.")
_TOPOLOGY = flags.DEFINE_string("topology", "", "TPU slice: v5e-16, v5e:4x4, v5p-32, v4-64, v6e-256.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "TPU slices (data axis spans slices).")
_TARGET = flags.DEFINE_string("target", "", f"GPU target {sorted(GPUS)} or 'local' (attached "
                              "devices); compiled on --devices CPU devices unless local.")
_DEVICES = flags.DEFINE_integer("devices", 0, "GPU target: number of GPUs (all nodes).")
_HBM = flags.DEFINE_float("hbm_gib", 0.0, "Override the usable memory per device (GiB).")
_MEM_FRACTION = flags.DEFINE_float("mem_fraction", 0.9, "GPU targets: fraction of the card JAX "
                                   "may use (XLA_PYTHON_CLIENT_MEM_FRACTION; JAX's default 0.75).")
_MFU = flags.DEFINE_float("mfu", 0.4, "Assumed model-FLOPs utilisation for the throughput estimate.")
_PLAN = flags.DEFINE_bool("plan", False, "Print the plan table instead: every paper point on "
                          "each of --plan_slices.")
_PLAN_SLICES = flags.DEFINE_list("plan_slices", list(PLAN_SLICES), "TPU slices of --plan.")


def resolve_target(topology: str = "", num_slices: int = 1, target: str = "", devices: int = 0,
                   hbm_gib: float = 0.0, mem_fraction: float = 0.9
                   ) -> tuple[str, Chip, list[Any], float, float]:
  """(target name, chip, devices, usable bytes per device, memory fraction shown)."""
  if bool(topology) == bool(target):
    raise ConfigError("give exactly one of --topology (TPU) or --target (GPU: "
                      f"{', '.join(sorted(GPUS))}, local)")
  if num_slices < 1:
    raise ConfigError(f"--num_slices={num_slices} must be >= 1")
  if topology:
    topo = parse_topology(topology)
    devs = tpu_devices(topo, num_slices)
    slices = f" x {num_slices} slices" if num_slices > 1 else ""
    return (f"{topology} ({topo.name}{slices})", topo.chip, devs,
            (hbm_gib or topo.chip.hbm_gib) * GIB, 1.0)
  if target == "local":
    devs = jax.devices()
    limit = (devs[0].memory_stats() or {}).get("bytes_limit") if devs[0].platform != "cpu" else None
    if not limit and not hbm_gib:
      raise ConfigError("--target=local on a host without accelerator memory stats: pass --hbm_gib")
    peak = flops_lib.device_peak_flops(devs[0].device_kind) or 1e12
    chip = Chip(devs[0].device_kind, (limit or 0) / GIB, peak, peak)  # int8: no faster assumed
    return "local", chip, devs, hbm_gib * GIB if hbm_gib else float(limit), 1.0  # limit has the fraction
  if target not in GPUS:
    raise ConfigError(f"--target={target!r} is unknown; use one of {sorted(GPUS)} or local")
  if devices < 1:
    raise ConfigError("--target needs --devices=N (the number of GPUs)")
  if not 0 < mem_fraction <= 1:
    raise ConfigError(f"--mem_fraction={mem_fraction} must be in (0, 1]")
  try:
    jax.config.update("jax_num_cpu_devices", devices)
  except RuntimeError:  # the CPU backend already exists (e.g. under pytest): use its devices
    pass
  devs = jax.devices("cpu")
  if len(devs) < devices:
    raise ConfigError(f"only {len(devs)} CPU devices for --devices={devices}; unset XLA_FLAGS "
                      "--xla_force_host_platform_device_count or lower --devices")
  chip = GPUS[target]
  hbm = (hbm_gib or chip.hbm_gib * mem_fraction) * GIB
  return (f"{target} x {devices} (estimated on CPU)", chip, devs[:devices], hbm,
          1.0 if hbm_gib else mem_fraction)


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if _TARGET.value != "local":
    jax.config.update("jax_platforms", "cpu")  # TPU / GPU targets compile from this host
  if _PLAN.value:
    try:
      for row in plan(_PLAN_SLICES.value):
        print(row, flush=True)
    except ConfigError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    return
  config = cli.load_config(_CONFIG)
  try:
    name, chip, devices, hbm, frac = resolve_target(
        _TOPOLOGY.value, _NUM_SLICES.value, _TARGET.value, _DEVICES.value, _HBM.value,
        _MEM_FRACTION.value)
    report = check(config, devices, hbm)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(format_report(config, name, chip, len(devices), report, _MFU.value, frac))
  sys.exit(0 if report.fits else 1)


if __name__ == "__main__":
  cli.run(main, absl_flags=True)
