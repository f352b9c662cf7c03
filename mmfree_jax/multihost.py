"""Several processes, one training run: distributed init, process-0-first, the mesh."""

from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

import jax
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh
import numpy as np

from mmfree_jax import sharding
from mmfree_jax.config import ConfigError

# Environment conventions (`initialize` reads them; the launchers in `launch/` set them):
#
# - explicit (`launch/local.py`, `launch/slurm.py`): `JAX_COORDINATOR_ADDRESS=host:port`,
#   `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (jax itself reads only the address);
# - SLURM (`srun`, more than one task): jax auto-detects everything (one process per GPU,
#   `SLURM_LOCALID` picks the GPU);
# - Cloud TPU VM slices (`launch/tpu_vm.py` sets `MMFREE_DISTRIBUTED=1`) and multi-slice
#   (`MEGASCALE_*`): jax auto-detects from the TPU metadata.
#
# Multi-slice meshes put the `data` axis across slices (DCN) and `fsdp` / `tensor`
# within a slice (ICI): see `make_mesh`.

T = TypeVar("T")


def wants_distributed(env: dict[str, str] | None = None) -> bool:
  """Whether the environment says this is one of several processes."""
  env = os.environ if env is None else env
  return (env.get("MMFREE_DISTRIBUTED", "") not in ("", "0")
          or "JAX_COORDINATOR_ADDRESS" in env
          or int(env.get("SLURM_NTASKS", "1") or 1) > 1
          or "MEGASCALE_COORDINATOR_ADDRESS" in env
          or env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0)


def distributed_args(env: dict[str, str] | None = None) -> dict[str, Any]:
  """Explicit `jax.distributed.initialize` arguments from JAX_NUM_PROCESSES / JAX_PROCESS_ID.

  Empty when those are unset (jax then auto-detects SLURM / TPU). One-line ConfigError
  for half-set or malformed values.
  """
  env = os.environ if env is None else env
  n, i = env.get("JAX_NUM_PROCESSES"), env.get("JAX_PROCESS_ID")
  if n is None and i is None:
    return {}
  addr = env.get("JAX_COORDINATOR_ADDRESS")
  if n is None or i is None or not addr:
    raise ConfigError("set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID together "
                      f"(got address={addr!r}, num_processes={n!r}, process_id={i!r})")
  try:
    n_, i_ = int(n), int(i)
  except ValueError:
    raise ConfigError(f"JAX_NUM_PROCESSES={n!r} and JAX_PROCESS_ID={i!r} must be integers") from None
  if not 0 <= i_ < n_:
    raise ConfigError(f"JAX_PROCESS_ID={i_} must be in [0, JAX_NUM_PROCESSES={n_})")
  if ":" not in addr:
    raise ConfigError(f"JAX_COORDINATOR_ADDRESS={addr!r} must be host:port")
  return {"coordinator_address": addr, "num_processes": n_, "process_id": i_}


def initialize() -> bool:
  """`jax.distributed.initialize(...)` when launched as one of several processes.

  Returns True when jax.distributed is (now) initialized. On CPU the cross-process
  collectives are gloo (jax's default).
  """
  if jax.distributed.is_initialized():
    return True
  if not wants_distributed():
    return False
  jax.distributed.initialize(**distributed_args())
  return True


def process0_first(fn: Callable[[], T]) -> T:
  """Runs `fn` on process 0, then (after a barrier) on the others.

  For one-off work on a possibly shared filesystem (building the tokenized dataset):
  process 0 builds, the others then find it built (or build their own local copy).
  """
  if jax.process_count() == 1:
    return fn()
  out = fn() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("mmfree_jax:process0_first")
  return fn() if jax.process_index() != 0 else out


def num_slices(devices) -> int:
  """Number of TPU slices the devices span (1 off multi-slice TPU)."""
  return len({getattr(d, "slice_index", 0) or 0 for d in devices})


def make_mesh(spec: dict[str, int], devices=None) -> Mesh:
  """The (data, fsdp, tensor) mesh; over several slices `data` spans slices.

  One slice: exactly `sharding.make_mesh`. S slices: the mesh is resolved over all
  devices, then `data` is split as S (DCN, across slices) x data/S (ICI, within a
  slice); fsdp and tensor stay within a slice, so their collectives never cross DCN.
  """
  devices = jax.devices() if devices is None else list(devices)
  s = num_slices(devices)
  if s == 1:
    return sharding.make_mesh(spec, devices)
  data, fsdp, tensor = sharding.mesh_shape(spec, len(devices))
  if data % s:
    raise ConfigError(f"mesh.data={data} must be a multiple of the {s} slices (data spans "
                      "slices; fsdp and tensor stay within one); use mesh.data=-1 or a multiple")
  arr = mesh_utils.create_hybrid_device_mesh((data // s, fsdp, tensor), (s, 1, 1), devices,
                                             allow_split_physical_axes=True)
  return Mesh(np.asarray(arr), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
