"""Ahead-of-time fit check: compile the real sharded train step for a target, print memory.

    python -m mmfree_jax.aot --config=experiments/paper.py:mmfree-1.3B --topology=v5p-32
    python -m mmfree_jax.aot --config=experiments/paper.py:mmfree-2.7B --topology=v5e:16x16 --num_slices=2
    python -m mmfree_jax.aot --config=experiments/paper.py:mmfree-1.3B --target=h200 --devices=8

TPU targets compile on this (CPU) host against abstract TPU devices from libtpu
(`pip install 'jax[tpu]==0.10.2'`); an over-large model fails to compile with
RESOURCE_EXHAUSTED, translated into a DOES NOT FIT line. GPU targets compile the same
step for N CPU devices and compare the per-device total with the card's memory times
`--mem_fraction`: a conservative estimate (XLA:CPU fuses less and keeps f32 copies; for
1.3B at 16 sequences per device it gave 88 GiB where the TPU compiler needs 55 GiB);
`--target=local` compiles for the attached accelerators (exact on a GPU host).
Exit 0 = fits, 1 = does not fit, 2 = bad input.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from typing import Any

from absl import app, flags, logging
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
from mmfree_jax.models import init_params, param_counts
from mmfree_jax.scaling import flops as flops_lib

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One compiled device of a target: usable memory and dense bf16 peak."""
  name: str
  hbm_gib: float
  peak_flops: float
  dims: int = 0              # TPU torus rank (2 or 3); 0 for GPUs
  cores_in_name: bool = False  # v4-64 / v5p-32 count TensorCores (2 per chip)
  devices_per_chip: int = 1


# Usable HBM per compiled device as libtpu 0.0.42 reports it in RESOURCE_EXHAUSTED.
# libtpu compiles v4 per TensorCore (2 devices of 15.25 GiB per chip), v5p megacore.
TPUS = {
    "v4": Chip("TPU v4", 15.25, 275e12 / 2, 3, True, 2),
    "v5p": Chip("TPU v5p", 95.74, 459e12, 3, True),
    "v5e": Chip("TPU v5e", 15.75, 197e12, 2),
    "v6e": Chip("TPU v6e", 31.25, 918e12, 2),
}
_TPU_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}

# Nominal memory per card (GiB); JAX's allocator gets `XLA_PYTHON_CLIENT_MEM_FRACTION` of it.
GPUS = {
    "h100": Chip("NVIDIA H100 80GB", 79.6, 989e12),
    "h200": Chip("NVIDIA H200", 139.8, 989e12),
    "b200": Chip("NVIDIA B200", 178.0, 2250e12),
    "a100-40": Chip("NVIDIA A100 40GB", 39.4, 312e12),
    "a100-80": Chip("NVIDIA A100 80GB", 79.2, 312e12),
    "l4": Chip("NVIDIA L4", 22.0, 121e12),
}


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
    raise ConfigError("TPU targets need libtpu on this host: pip install 'jax[tpu]==0.10.2' "
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
  memory: dict[str, int] = dataclasses.field(default_factory=dict)  # per device
  error: str = ""

  @property
  def total(self) -> int:
    m = self.memory
    return m["argument"] + m["output"] - m["alias"] + m["temp"] if m else 0


def _oom_line(msg: str, hbm_bytes: float) -> str:
  """RESOURCE_EXHAUSTED text -> one line that says how much was needed and what there is."""
  need = re.search(r"(?:temporaries|required)\D*\(?([\d.]+)\s*([GMK])", msg)
  have = re.search(r"available HBM \(([\d.]+)\s*([GMK])", msg) or re.search(r"of ([\d.]+)([GMK]) hbm", msg)
  unit = {"G": 1, "M": 1 / 1024, "K": 1 / 1024**2}
  if need and have:
    n, h = float(need.group(1)) * unit[need.group(2)], float(have.group(1)) * unit[have.group(2)]
    return (f"the step needs {n:.2f} GiB of temporaries per device but the chip has {h:.2f} GiB "
            "of HBM (XLA RESOURCE_EXHAUSTED)")
  first = msg.strip().splitlines()[0] if msg.strip() else "RESOURCE_EXHAUSTED"
  return f"{first[:300]} (chip HBM {hbm_bytes / GIB:.2f} GiB)"


def check(config: ml_collections.ConfigDict, devices: list[Any], hbm_bytes: float) -> Report:
  """Compiles the train step over `devices` with the config's mesh; per-device memory."""
  from mmfree_jax.train import loop  # noqa: PLC0415
  from mmfree_jax.train.optim import make_optimizer  # noqa: PLC0415
  from mmfree_jax.train.step import make_train_step  # noqa: PLC0415
  config = _for_compile(config, devices[0].platform)
  cfg = loop.validate(config)
  mesh = multihost.make_mesh(config.mesh.to_dict(), devices)
  sharding.check_divisible(cfg, mesh, config.train.batch_size)
  tx, sched = make_optimizer(config, config.train.steps)
  report = Report(fits=False, hbm_bytes=hbm_bytes, mesh=dict(mesh.shape))
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
      report.error = _oom_line(str(e), hbm_bytes)
      return report
  m = compiled.memory_analysis()
  report.memory = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
                   "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
                   "code": m.generated_code_size_in_bytes,
                   "peak": int(getattr(m, "peak_memory_in_bytes", 0) or 0)}
  if devices[0].platform == "cpu":  # XLA:CPU's "peak" counts only the arguments
    report.memory["peak"] = 0
  report.fits = max(report.total, report.memory["peak"]) <= hbm_bytes
  return report


def _for_compile(config: ml_collections.ConfigDict, platform: str) -> ml_collections.ConfigDict:
  """The corpus is irrelevant to memory; cuDNN attention only compiles for CUDA."""
  config = ml_collections.ConfigDict(config.to_dict())
  if not str(config.data.corpus).strip():
    config.data.corpus = "shakespeare"
  if platform != "gpu" and config.model.get("attention_impl") == "cudnn":
    config.model.attention_impl = ""
  return config


def format_report(config: ml_collections.ConfigDict, target: str, chip: Chip, n_devices: int,
                  report: Report, mfu: float, mem_fraction: float = 1.0) -> str:
  """The human-readable report; the last line starts with FITS or DOES NOT FIT."""
  from mmfree_jax.train import loop  # noqa: PLC0415
  cfg = loop.model_config(_for_compile(config, "tpu"))
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
  if report.memory:
    m = report.memory
    peak = f" | peak {g(m['peak'])}" if m["peak"] else ""
    lines.append(f"per-device memory (GiB): arguments {g(m['argument'])} | outputs {g(m['output'])} "
                 f"| aliased (donated) {g(m['alias'])} | temporaries {g(m['temp'])}{peak} | total "
                 f"{g(report.total)}")
    flops_tok = flops_lib.train_flops_per_token(cfg, config.data.seq_len)
    tps = mfu * chip.peak_flops / flops_tok
    step_s = t.batch_size * config.data.seq_len / (tps * n_devices)
    lines.append(f"estimate: {tps:,.0f} tokens/s per device at an assumed {mfu:.0%} MFU "
                 f"({flops_tok / 1e9:.2f} GFLOP/token, {chip.peak_flops / 1e12:.0f} TFLOP/s peak) "
                 f"-> {step_s:.2f} s/step")
    used = max(report.total, m["peak"])
    verdict = "FITS" if report.fits else "DOES NOT FIT"
    lines.append(f"{verdict}: {g(used)} of {g(report.hbm_bytes)} GiB per device "
                 f"({used / report.hbm_bytes:.0%})")
  else:
    lines.append(f"DOES NOT FIT: {report.error}")
  return "\n".join(lines)


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
    chip = Chip(devs[0].device_kind, (limit or 0) / GIB,
                flops_lib.device_peak_flops(devs[0].device_kind) or 1e12)
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
  config = cli.load_config(_CONFIG)
  if _TARGET.value != "local":
    jax.config.update("jax_platforms", "cpu")  # TPU / GPU targets compile from this host
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
  app.run(main, flags_parser=cli.parse_flags)
