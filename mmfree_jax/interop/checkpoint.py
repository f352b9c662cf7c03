"""Model directories: one loader for our exports, HF `hgrn_bit` dirs and packed dirs.

Our layout (written by `save_model`, and by the trainer when it exports params):

    <dir>/config.json   ModelConfig fields as JSON (`dataclasses.asdict(cfg)`)
    <dir>/params/       Orbax `StandardCheckpointer` of the unboxed param tree
                        (float32 leaves, names as in `models.init_params`)

Also accepted by `load_model`:

    <dir>/config.json (with "model_type": "hgrn_bit") + model*.safetensors   (HF, §1.5)
    <dir>/config.json + packed.safetensors   (2-bit ternary export, `infer.packed`)

    cfg, params = load_model(path, dtype="float32")
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from mmfree_jax.config import ConfigError, ModelConfig, from_dict
from mmfree_jax.interop import CheckpointError, hf
from mmfree_jax.models import abstract_params

PARAMS_DIR = "params"
PACKED_FILE = "packed.safetensors"


def detect_format(path: str | os.PathLike) -> str:
  """"ours" | "hf" | "packed" for a model directory; CheckpointError otherwise."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint directory {path!r} does not exist")
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise CheckpointError(f"{path!r} has no config.json; pass a model directory written by "
                          "mmfree_jax.convert (or an HF hgrn_bit checkpoint)")
  if hf.is_hf_dir(path):
    return "hf"
  if os.path.isfile(os.path.join(path, PACKED_FILE)):
    return "packed"
  if os.path.isdir(os.path.join(path, PARAMS_DIR)):
    return "ours"
  raise CheckpointError(f"{path!r} has config.json but neither {PARAMS_DIR}/, {PACKED_FILE} "
                        "nor HF safetensors; the export is incomplete")


def write_config(path: str | os.PathLike, cfg: ModelConfig):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(dataclasses.asdict(cfg), f, indent=2)


def read_config(path: str | os.PathLike, **overrides: Any) -> ModelConfig:
  """ModelConfig from `<path>/config.json` (our layout), with field overrides."""
  with open(os.path.join(path, "config.json")) as f:
    d = json.load(f)
  d.update({k: v for k, v in overrides.items() if v is not None})
  try:
    return from_dict(d)
  except (ConfigError, TypeError) as e:
    raise CheckpointError(f"{path}/config.json: {e}") from None


def save_model(path: str | os.PathLike, cfg: ModelConfig, params: Any):
  """Writes `<path>/config.json` and `<path>/params/` (overwrites an existing export)."""
  path = os.path.abspath(os.fspath(path))
  write_config(path, cfg)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(path, PARAMS_DIR), nn.unbox(params), force=True)
  ckptr.wait_until_finished()


def _expected(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  tree = nn.unbox(abstract_params(cfg))
  return {"/".join(p): tuple(v.shape) for p, v in hf.flatten(tree).items()}


def load_params(path: str | os.PathLike, cfg: ModelConfig) -> dict[str, Any]:
  """Restores `<path>/params/` onto the first device, checking names and shapes first."""
  ckpt = os.path.join(os.path.abspath(os.fspath(path)), PARAMS_DIR)
  ckptr = ocp.StandardCheckpointer()
  meta = ckptr.metadata(ckpt).item_metadata.tree
  got = {"/".join(p): tuple(v.shape) for p, v in hf.flatten(meta).items()}
  hf.check_names_and_shapes(got, _expected(cfg), f"{ckpt}")
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = hf.unflatten({p: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=dev)
                         for p, v in hf.flatten(meta).items()})
  return ckptr.restore(ckpt, target)


def load_model(path: str | os.PathLike, **overrides: Any) -> tuple[ModelConfig, Any]:
  """(cfg, params) from any supported directory; `overrides` replace config fields
  (e.g. dtype="float32"). Packed dirs return packed params (see `infer.packed`)."""
  fmt = detect_format(path)
  overrides = {k: v for k, v in overrides.items() if v is not None}
  if fmt == "hf":
    cfg, params = hf.load_hf(path, **overrides)
    return cfg, jax.tree.map(jax.numpy.asarray, params)
  if fmt == "packed":
    from mmfree_jax.infer import packed  # pylint: disable=import-outside-toplevel
    return packed.load_packed(path, **overrides)
  cfg = read_config(path, **overrides)
  return cfg, load_params(path, cfg)


def to_numpy(params: Any) -> Any:
  return jax.tree.map(lambda x: np.asarray(x), nn.unbox(params))
