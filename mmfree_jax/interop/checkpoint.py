"""Model directories: one loader for our exports, HF `hgrn_bit` dirs and packed dirs.

Our layout (written by `save_model`):

    <dir>/config.json      ModelConfig fields as JSON (`dataclasses.asdict(cfg)`), plus
                           "export": {"step", "run_dir", "params_sha256", "source"} when known
    <dir>/params/          Orbax `StandardCheckpointer` of the unboxed param tree
                           (float32 leaves, names as in `models.init_params`)
    <dir>/tokenizer.model  the SentencePiece model it was trained with, when known

The trainer exports versions: `<workdir>/model/step_<N>/` and `<workdir>/model/latest` (a
relative symlink to the newest); an existing version is never replaced (`export_run`).

Also accepted by `load_model`:

    <dir>/config.json (with "model_type": "hgrn_bit") + model*.safetensors   (HF, §1.5)
    <dir>/config.json + packed.safetensors   (2-bit ternary export, `infer.packed`)

Every loader takes a model directory, a versioned `model/` directory (its `latest`) or a run
directory (its `model/latest`):

    cfg, params = load_model("runs/tiny", dtype="float32")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
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
TOKENIZER_FILE = hf.TOKENIZER_FILE  # the SentencePiece model beside the weights
EXPORT_KEY = "export"
MODEL_DIR = "model"  # a run directory's exports
LATEST = "latest"


def model_dir(path: str | os.PathLike) -> str:
  """The model directory `path` names: `path/latest` if there is one, else (a run directory,
  whose own config.json is the training config) `path/model`'s, else `path`."""
  path = os.fspath(path)
  if os.path.isdir(os.path.join(path, LATEST)):
    return os.path.realpath(os.path.join(path, LATEST))
  if os.path.isdir(os.path.join(path, MODEL_DIR)):
    return model_dir(os.path.join(path, MODEL_DIR))
  return path


def tokenizer_file(path: str | os.PathLike) -> str | None:
  """The tokenizer.model shipped beside a model's weights, if any."""
  f = os.path.join(model_dir(path), TOKENIZER_FILE)
  return f if os.path.isfile(f) else None


def detect_format(path: str | os.PathLike) -> str:
  """"ours" | "hf" | "packed" for a model directory (see `model_dir`); CheckpointError otherwise."""
  path = model_dir(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint directory {path!r} does not exist")
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise CheckpointError(f"{path!r} has no config.json, {MODEL_DIR}/ or {LATEST}; pass a run "
                          "directory, a model directory written by the trainer or "
                          "mmfree_jax.convert, or an HF hgrn_bit checkpoint")
  if hf.is_hf_dir(path):
    return "hf"
  if os.path.isfile(os.path.join(path, PACKED_FILE)):
    return "packed"
  if os.path.isdir(os.path.join(path, PARAMS_DIR)):
    return "ours"
  raise CheckpointError(f"{path!r} has config.json but neither {PARAMS_DIR}/, {PACKED_FILE} "
                        "nor HF safetensors; the export is incomplete")


def write_config(path: str | os.PathLike, cfg: ModelConfig, export: dict[str, Any] | None = None,
                 tokenizer: str | None = None):
  """`<path>/tokenizer.model` (a copy of `tokenizer`, if given), then `<path>/config.json`: the
  ModelConfig fields and `export` (provenance), if given. Written last, config.json marks a
  finished export."""
  os.makedirs(path, exist_ok=True)
  if tokenizer:
    shutil.copyfile(tokenizer, os.path.join(path, TOKENIZER_FILE))
  d = dataclasses.asdict(cfg)
  if export:
    d[EXPORT_KEY] = export
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(d, f, indent=2)


def _read_json(path: str | os.PathLike) -> dict[str, Any]:
  with open(os.path.join(path, "config.json")) as f:
    return json.load(f)


def export_info(path: str | os.PathLike) -> dict[str, Any]:
  """The provenance a model directory records ({} if none)."""
  return _read_json(model_dir(path)).get(EXPORT_KEY) or {}


def read_config(path: str | os.PathLike, **overrides: Any) -> ModelConfig:
  """ModelConfig from `<path>/config.json` (our layout), with field overrides."""
  d = _read_json(path)
  d.pop(EXPORT_KEY, None)
  d.update({k: v for k, v in overrides.items() if v is not None})
  try:
    return from_dict(d)
  except (ConfigError, TypeError) as e:
    raise CheckpointError(f"{path}/config.json: {e}") from None


def params_sha256(params: Any) -> str:
  """sha256 over every leaf's path, dtype, shape and bytes (float32 master weights)."""
  from jax.experimental import multihost_utils  # noqa: PLC0415

  h = hashlib.sha256()
  for p, x in sorted(hf.flatten(nn.unbox(params)).items()):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = multihost_utils.process_allgather(x, tiled=True)
    a = np.ascontiguousarray(np.asarray(x))
    h.update(f"{'/'.join(p)}:{a.dtype}:{a.shape};".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def save_model(path: str | os.PathLike, cfg: ModelConfig, params: Any,
               export: dict[str, Any] | None = None, tokenizer: str | None = None):
  """Writes `<path>/params/`, then `write_config`. Overwrites."""
  path = os.path.abspath(os.fspath(path))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(path, PARAMS_DIR), nn.unbox(params), force=True)
  ckptr.wait_until_finished()
  if jax.process_index() == 0:
    write_config(path, cfg, export, tokenizer)


def export_run(workdir: str, cfg: ModelConfig, params: Any, step: int,
               tokenizer: str | None) -> tuple[str, str]:
  """Exports a run's params as `<workdir>/model/step_<step>` and points `model/latest` at it.

  Returns (directory, what happened): "written"; "unchanged" (the same params were exported
  before); or "kept" (that step holds an export of other params, which is never replaced).
  """
  root = os.path.join(os.path.abspath(workdir), MODEL_DIR)
  name = f"step_{step}"
  path = os.path.join(root, name)
  digest = params_sha256(params)
  status = "written"
  if os.path.isfile(os.path.join(path, "config.json")):
    status = "unchanged" if export_info(path).get("params_sha256") == digest else "kept"
  else:
    if jax.process_index() == 0 and os.path.isdir(path):
      shutil.rmtree(path)  # an unfinished export (no config.json)
    save_model(path, cfg, params, {"step": step, "run_dir": os.path.abspath(workdir),
                                   "params_sha256": digest}, tokenizer)
  if jax.process_index() == 0 and status != "kept":
    tmp = os.path.join(root, f".{LATEST}.tmp")
    if os.path.lexists(tmp):
      os.remove(tmp)
    os.symlink(name, tmp)
    os.replace(tmp, os.path.join(root, LATEST))
  return path, status


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
  """(cfg, params) from any supported directory (see `model_dir`); `overrides` replace
  config fields (e.g. dtype="float32"). Packed dirs return packed params (see `infer.packed`)."""
  path = model_dir(path)
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
