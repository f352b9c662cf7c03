"""Device mesh and the logical-axis rules table (MaxText style)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mmfree_jax.config import ConfigError, ModelConfig

# Parameters and activations carry logical axis names (`embed`, `mlp`, `state`, `heads`,
# `vocab`, `layers`, `batch`, `length`); `RULES` maps them onto the mesh axes
# (`data`, `fsdp`, `tensor`). A rule whose mesh axis is already used by an earlier
# dimension of the same array is skipped (so activations shard the batch over
# data x fsdp while weights shard `embed` over fsdp).

MESH_AXES = ("data", "fsdp", "tensor")

RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("state", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
)


def mesh_shape(spec: dict[str, int], n_devices: int) -> tuple[int, int, int]:
  """Resolve a {data, fsdp, tensor} spec where one entry may be -1 (= the rest)."""
  dims = [int(spec.get(a, 1)) for a in MESH_AXES]
  if dims.count(-1) > 1:
    raise ConfigError("at most one mesh axis may be -1; set the others explicitly")
  if -1 in dims:
    rest = int(np.prod([d for d in dims if d != -1]))
    if n_devices % rest:
      raise ConfigError(f"mesh {dict(zip(MESH_AXES, dims))} does not divide {n_devices} devices; "
                        "choose axis sizes whose product divides the device count")
    dims[dims.index(-1)] = n_devices // rest
  if int(np.prod(dims)) != n_devices:
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, dims))} uses {int(np.prod(dims))} devices but "
                      f"{n_devices} are present; make data*fsdp*tensor equal the device count")
  return tuple(dims)  # type: ignore[return-value]


def make_mesh(spec: dict[str, int], devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axes (sharding propagated by XLA)."""
  devices = jax.devices() if devices is None else devices
  dims = mesh_shape(spec, len(devices))
  return Mesh(np.asarray(devices).reshape(dims), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def check_divisible(cfg: ModelConfig, mesh: Mesh, global_batch: int):
  """One-line errors for shapes the mesh cannot split evenly."""
  data, fsdp, tensor = (mesh.shape[a] for a in MESH_AXES)
  if global_batch % (data * fsdp):
    raise ConfigError(f"batch size {global_batch} is not divisible by data*fsdp={data * fsdp} "
                      "devices; change train.batch_size or the mesh")
  if cfg.d_model % fsdp:
    raise ConfigError(f"model.d_model={cfg.d_model} is not divisible by mesh.fsdp={fsdp}")
  for name, size in (("d_model", cfg.d_model), ("ffn width", cfg.ffn), ("vocab_size", cfg.vocab_size)):
    if size % tensor:
      raise ConfigError(f"model {name}={size} is not divisible by mesh.tensor={tensor}; "
                        "change the width or the tensor axis")
  if cfg.arch == "transformer" and cfg.n_heads % tensor:
    raise ConfigError(f"{cfg.n_heads} attention heads are not divisible by mesh.tensor={tensor}")


def logical_shardings(boxed_tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a tree of `nn.LogicallyPartitioned` (or abstract) leaves."""
  specs = nn.get_partition_spec(boxed_tree)
  mesh_specs = nn.logical_to_mesh(specs, RULES)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), mesh_specs,
                      is_leaf=lambda x: isinstance(x, P))


def opt_state_shardings(tx: optax.GradientTransformation, params: Any, param_sh: Any,
                        mesh: Mesh) -> Any:
  """Optimizer-state shardings: moments like their parameters, counters replicated."""
  shapes = jax.eval_shape(tx.init, params)
  return optax.tree_map_params(tx, lambda _, s: s, shapes, param_sh,
                               transform_non_params=lambda _: replicated(mesh),
                               is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def cuda_kernel(kernel, fallback, *args, replicated_args: tuple[int, ...] = ()):
  """`kernel(*args)` on CUDA GPUs, `fallback(*args)` (same math in XLA) elsewhere.

  The platform is picked at lowering (`lax.platform_dependent`). XLA cannot partition a
  custom kernel, so every argument (except those in `replicated_args`; an argument may be
  a pytree) must have the batch as its leading dimension, and every result a leading
  dimension that splits with it (the batch, or per-block partial results over the rows):
  with no mesh in context, or a one-device mesh, the dispatch runs as is; under a (data,
  fsdp) mesh it runs inside `jax.shard_map` on each device's own rows; with a tensor axis
  > 1, or a batch the mesh does not divide, `fallback` runs and XLA partitions it.
  """
  def run(*a):
    return jax.lax.platform_dependent(*a, cuda=kernel, default=fallback)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return run(*args)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  if set(sizes) - set(MESH_AXES) or sizes.get("tensor", 1) != 1:
    return fallback(*args)
  axes = tuple(a for a in ("data", "fsdp") if sizes.get(a, 1) > 1)
  rows = next(x for i, x in enumerate(args) if i not in replicated_args)
  batch = jax.tree.leaves(rows)[0].shape[0]
  if batch % int(np.prod([sizes[a] for a in axes])):
    return fallback(*args)
  in_specs = tuple(P() if i in replicated_args else P(axes) for i in range(len(args)))
  return jax.shard_map(run, mesh=mesh, in_specs=in_specs, out_specs=P(axes),
                       check_vma=False)(*args)
