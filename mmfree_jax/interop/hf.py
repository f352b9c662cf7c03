"""HF `hgrn_bit` checkpoints (the released MMfreeLM models, SPEC §1.5) <-> our params."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Iterator, Mapping
import warnings

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

from mmfree_jax.config import ConfigError, ModelConfig, glu_hidden
from mmfree_jax.interop import CheckpointError

# An HF directory holds `config.json` (model_type "hgrn_bit") and either `model.safetensors`
# or shards `model-0000x-of-0000y.safetensors` listed in `model.safetensors.index.json`.
# Tensors are 16-bit latent weights; PyTorch Linear weights are [out, in] and our kernels
# [in, out], so every projection is transposed. Per-layer tensors are stacked along a
# leading L axis (our layers are an `nn.scan`).
#
#     cfg, params = load_hf("ridger_MMfreeLM-370M/", dtype="float32")
#     save_hf("out_dir/", cfg, params, dtype="float32", max_shard_bytes=2**30,
#             tokenizer="tokenizer.model")
#
# Lossless round trip: `config_to_hf` stores every ModelConfig field under the extra key
# "mmfree_jax_config" (HF keeps unknown keys), and `config_from_hf` restores them; float32
# tensors keep every bit. A 16-bit export rounds the latent weights, which can flip ternary
# codes: `save_hf` then warns (`TernaryCodesChanged`) with the count. The SentencePiece model
# goes beside the weights with HF's `tokenizer_config.json` / `special_tokens_map.json`.
#
# Tensors are NumPy throughout (no torch).

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MODEL_TYPE = "hgrn_bit"
_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}
CONFIG_KEY = "mmfree_jax_config"   # every ModelConfig field
EXPORT_KEY = "mmfree_jax_export"   # where the weights came from (step, run, params hash, source)
TOKENIZER_FILE = "tokenizer.model"


class TernaryCodesChanged(UserWarning):
  """A 16-bit export flips ternary weight codes: its logits differ from the params'."""

# (HF name inside a layer, our path under "layers", transposed?)
_LAYER_MAP = (
    ("attn_norm.weight", ("attn_norm", "scale"), False),
    *[(f"attn.{p}_proj.weight", ("attn", f"{p}_proj", "kernel"), True) for p in "ifgo"],
    *[(f"attn.{p}_proj.norm.weight", ("attn", f"{p}_proj", "norm"), False) for p in "ifgo"],
    ("attn.g_norm.weight", ("attn", "g_norm", "scale"), False),
    ("mlp_norm.weight", ("mlp_norm", "scale"), False),
    ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), True),
    ("mlp.gate_proj.norm.weight", ("mlp", "gate_proj", "norm"), False),
    ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), True),
    ("mlp.down_proj.norm.weight", ("mlp", "down_proj", "norm"), False),
)
# (HF name, our path, transposed?)
_GLOBAL_MAP = (
    ("model.embeddings.weight", ("embed",), False),
    ("model.lower_bounds", ("lower_bounds",), False),
    ("model.norm.weight", ("norm", "scale"), False),
    ("lm_head.weight", ("lm_head", "kernel"), True),
    ("lm_head.norm.weight", ("lm_head", "norm"), False),
)


# ----------------------------------------------------------------------------- config


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
  """ModelConfig from an HF `hgrn_bit` config.json dict (`overrides` e.g. dtype="float32")."""
  if hf.get("model_type", MODEL_TYPE) != MODEL_TYPE:
    raise CheckpointError(f"config.json has model_type={hf.get('model_type')!r}; only "
                          f"{MODEL_TYPE!r} (MMfreeLM) checkpoints can be converted")
  unsupported = {"num_heads": 1, "expand_ratio": 1, "use_short_conv": False,
                 "tie_word_embeddings": False}
  for key, want in unsupported.items():
    if hf.get(key, want) not in (want, None):
      raise CheckpointError(f"config.json sets {key}={hf[key]!r}; this port supports only "
                            f"{key}={want!r} (the released MMfreeLM setting)")
  if hf.get("hidden_act", "swish") not in ("swish", "silu"):
    raise CheckpointError(f"config.json sets hidden_act={hf['hidden_act']!r}; only swish "
                          "is supported")
  for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
    if key not in hf:
      raise CheckpointError(f"config.json lacks {key!r}; it is not an hgrn_bit config")
  d = int(hf["hidden_size"])
  if CONFIG_KEY in hf:
    return _exact_config(hf, overrides)
  ffn = hf.get("intermediate_size")
  ffn = int(ffn) if ffn else glu_hidden(d, int(hf.get("hidden_ratio") or 4))
  kw: dict[str, Any] = dict(
      arch="mmfree", vocab_size=int(hf["vocab_size"]), d_model=d,
      n_layers=int(hf["num_hidden_layers"]), d_ff=None if ffn == glu_hidden(d) else ffn,
      gate="code", lower_bound=bool(hf.get("use_lower_bound", True)),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)))
  kw.update(overrides)
  try:
    return ModelConfig(**kw)
  except (ConfigError, TypeError) as e:
    raise CheckpointError(f"config.json gives an invalid model: {e}") from None


def _exact_config(hf: Mapping[str, Any], overrides: Mapping[str, Any]) -> ModelConfig:
  """The ModelConfig stored under CONFIG_KEY, checked against the HF keys it must agree with.

  A null field is unset, as `config.from_dict` reads it (exports from before
  `attention_impl="auto"` store `"attention_impl": null`)."""
  kw = {**{k: v for k, v in hf[CONFIG_KEY].items() if v is not None}, **overrides}
  try:
    cfg = ModelConfig(**kw)
  except (ConfigError, TypeError) as e:
    raise CheckpointError(f"config.json's {CONFIG_KEY} is not a valid model: {e}") from None
  want = config_to_hf(cfg)
  diff = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                      "use_lower_bound", "rms_norm_eps") if k in hf and hf[k] != want[k]]
  if diff:
    raise CheckpointError(f"config.json's {CONFIG_KEY} disagrees with its {', '.join(diff)} "
                          f"({', '.join(f'{k}={hf[k]!r}' for k in diff)}); fix or remove "
                          f"{CONFIG_KEY}")
  return cfg


def config_to_hf(cfg: ModelConfig, torch_dtype: str = "bfloat16") -> dict[str, Any]:
  """HF config.json dict for an mmfree ModelConfig (inverse of `config_from_hf`)."""
  if cfg.arch != "mmfree" or cfg.gate != "code":
    raise CheckpointError(f"only arch='mmfree' with gate='code' has an hgrn_bit layout (got "
                          f"arch={cfg.arch!r}, gate={cfg.gate!r}); export those params with "
                          "mmfree_jax.interop.checkpoint.save_model instead")
  return {
      "architectures": ["HGRNBitForCausalLM"], "model_type": MODEL_TYPE,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.n_layers, "intermediate_size": cfg.ffn, "hidden_ratio": 4,
      "attn_mode": "fused_recurrent", "num_heads": 1, "expand_ratio": 1,
      "use_short_conv": False, "conv_size": 4, "share_conv_kernel": True,
      "use_lower_bound": cfg.lower_bound, "hidden_act": "swish",
      "max_position_embeddings": 2048, "rms_norm_eps": cfg.norm_eps, "use_cache": True,
      "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2,
      "tie_word_embeddings": False, "initializer_range": cfg.init_std,
      "fuse_cross_entropy": True, "torch_dtype": torch_dtype,
      CONFIG_KEY: dataclasses.asdict(cfg),
  }


# ----------------------------------------------------------------------------- tensors


def _entries(cfg: ModelConfig) -> Iterator[tuple[str, tuple[str, ...], bool, int | None]]:
  """(HF name, our path, transposed, layer index or None) for every tensor of `cfg`."""
  for name, path, tr in _GLOBAL_MAP:
    if name == "model.lower_bounds" and not cfg.lower_bound:
      continue
    yield name, path, tr, None
  for i in range(cfg.n_layers):
    for name, path, tr in _LAYER_MAP:
      yield f"model.layers.{i}.{name}", ("layers",) + path, tr, i


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> shape for `cfg` (SPEC §1.5)."""
  d, v, i2, ffn = cfg.d_model, cfg.vocab_size, 2 * cfg.ffn, cfg.ffn
  per_layer = {
      "attn_norm.weight": (d,), "attn.g_norm.weight": (d,), "mlp_norm.weight": (d,),
      "mlp.gate_proj.weight": (i2, d), "mlp.gate_proj.norm.weight": (d,),
      "mlp.down_proj.weight": (d, ffn), "mlp.down_proj.norm.weight": (ffn,),
      **{f"attn.{p}_proj.weight": (d, d) for p in "ifgo"},
      **{f"attn.{p}_proj.norm.weight": (d,) for p in "ifgo"},
  }
  glob = {"model.embeddings.weight": (v, d), "model.lower_bounds": (cfg.n_layers, d),
          "model.norm.weight": (d,), "lm_head.weight": (v, d), "lm_head.norm.weight": (d,)}
  shapes = {}
  for name, _, _, layer in _entries(cfg):
    shapes[name] = glob[name] if layer is None else per_layer[name.split(".", 3)[3]]
  return shapes


def check_names_and_shapes(got: Mapping[str, tuple[int, ...]],
                           want: Mapping[str, tuple[int, ...]], what: str):
  """Raises one CheckpointError listing missing, unexpected and mis-shaped tensors."""
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  wrong = sorted(k for k in set(want) & set(got) if tuple(got[k]) != tuple(want[k]))
  if not (missing or unexpected or wrong):
    return
  show = lambda xs: ", ".join(xs[:6]) + (f" (+{len(xs) - 6} more)" if len(xs) > 6 else "")
  parts = []
  if missing:
    parts.append(f"{len(missing)} missing: {show(missing)}")
  if unexpected:
    parts.append(f"{len(unexpected)} unexpected: {show(unexpected)}")
  if wrong:
    parts.append(f"{len(wrong)} with wrong shape: " + show(
        [f"{k} {tuple(got[k])} != expected {tuple(want[k])}" for k in wrong]))
  raise CheckpointError(f"{what} does not match its config: " + "; ".join(parts)
                        + "; check that config.json belongs to these weights")


def params_from_hf(cfg: ModelConfig, tensors: Mapping[str, np.ndarray],
                   dtype=np.float32) -> dict[str, Any]:
  """Our (unboxed) param tree, as NumPy arrays of `dtype`, from HF tensors."""
  check_names_and_shapes({k: v.shape for k, v in tensors.items()}, expected_shapes(cfg),
                         "the HF checkpoint")
  params: dict[str, Any] = {}
  stacks: dict[tuple[str, ...], list[np.ndarray]] = {}
  for name, path, tr, layer in _entries(cfg):
    a = np.asarray(tensors[name]).astype(dtype)
    a = a.T if tr else a
    if layer is None:
      _set(params, path, np.ascontiguousarray(a))
    else:
      stacks.setdefault(path, []).append(a)
  for path, arrays in stacks.items():
    _set(params, path, np.stack(arrays))
  return params


def params_to_hf(cfg: ModelConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """HF tensors (float32) from our param tree."""
  config_to_hf(cfg)  # arch / gate check
  flat = flatten(params)
  hf_shapes = expected_shapes(cfg)
  want = {}
  for name, path, tr, layer in _entries(cfg):
    s = hf_shapes[name][::-1] if tr else hf_shapes[name]
    want["/".join(path)] = s if layer is None else (cfg.n_layers,) + s
  got = {"/".join(p): tuple(np.shape(v)) for p, v in flat.items()}
  check_names_and_shapes(got, want, "the param tree")
  out = {}
  for name, path, tr, layer in _entries(cfg):
    a = np.asarray(flat[path], np.float32)
    a = a if layer is None else a[layer]
    out[name] = np.ascontiguousarray(a.T if tr else a)
  return out


# ----------------------------------------------------------------------------- files


def is_hf_dir(path: str | os.PathLike) -> bool:
  """True if `path` looks like an HF checkpoint directory (config.json with model_type)."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    return False
  with open(cfg_path) as f:
    return "model_type" in json.load(f)


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise CheckpointError(f"{cfg_path} not found; pass an HF checkpoint directory")
  with open(cfg_path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{cfg_path} is not valid JSON ({e})") from None


def read_hf_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a single-file or sharded safetensors checkpoint, as stored."""
  path = os.fspath(path)
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
      shard_path = os.path.join(path, shard)
      if not os.path.isfile(shard_path):
        raise CheckpointError(f"shard {shard_path} listed in {INDEX_FILE} is missing; "
                              "download every shard of the checkpoint")
      part = load_file(shard_path)
      for k, v in part.items():
        if weight_map.get(k) != shard:
          raise CheckpointError(f"tensor {k!r} in {shard} is not listed there by {INDEX_FILE}; "
                                "the index and shards are out of sync")
        tensors[k] = v
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
      raise CheckpointError(f"{len(missing)} tensors listed in {INDEX_FILE} are absent from "
                            f"their shards (e.g. {missing[0]!r}); re-download the checkpoint")
    return tensors
  single = os.path.join(path, SINGLE_FILE)
  if os.path.isfile(single):
    return load_file(single)
  if os.path.isfile(os.path.join(path, "pytorch_model.bin")):
    raise CheckpointError(f"{path} holds pytorch_model.bin only; convert it to safetensors "
                          "first (this loader is torch-free)")
  raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}; pass an HF checkpoint dir")


def load_hf(path: str | os.PathLike, **overrides: Any) -> tuple[ModelConfig, dict[str, Any]]:
  """(ModelConfig, float32 NumPy params) from an HF `hgrn_bit` directory."""
  cfg = config_from_hf(read_hf_config(path), **overrides)
  return cfg, params_from_hf(cfg, read_hf_tensors(path))


def ternary_code_changes(cfg: ModelConfig, tensors: Mapping[str, np.ndarray],
                         dtype: str) -> tuple[int, int]:
  """(ternary codes that change, all codes) when the float32 BitLinear weights in HF
  `tensors` are stored as `dtype` (codes as the model computes them, per tensor)."""
  from mmfree_jax.layers.quant import weight_codes  # noqa: PLC0415 - jax, only here

  np_dtype, changed, total = _np_dtype(dtype), 0, 0
  for name, _, transposed, _ in _entries(cfg):
    if transposed:  # the BitLinear weights (projections and the head)
      w = np.asarray(tensors[name], np.float32)
      before = np.asarray(weight_codes(w)[0])
      after = np.asarray(weight_codes(w.astype(np_dtype).astype(np.float32))[0])
      changed += int(np.sum(before != after))
      total += before.size
  return changed, total


def write_tokenizer(path: str | os.PathLike, spm_path: str):
  """`tokenizer.model` (a copy of `spm_path`) + HF's tokenizer_config.json and
  special_tokens_map.json (a LlamaTokenizer over it, bos prepended as in training)."""
  from mmfree_jax.data.tokenizer import load_tokenizer  # noqa: PLC0415

  tok = load_tokenizer(spm_path)
  shutil.copyfile(spm_path, os.path.join(path, TOKENIZER_FILE))
  special = {"bos_token": tok.sp.id_to_piece(tok.bos_id), "eos_token": tok.sp.id_to_piece(tok.eos_id),
             "unk_token": tok.sp.id_to_piece(tok.sp.unk_id())}
  with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
    json.dump(special, f, indent=2)
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "LlamaTokenizer", **special, "pad_token": None,
               "add_bos_token": True, "add_eos_token": False, "legacy": True,
               "clean_up_tokenization_spaces": False, "sp_model_kwargs": {}}, f, indent=2)


def save_hf(path: str | os.PathLike, cfg: ModelConfig, params: Mapping[str, Any],
            dtype: str = "float32", max_shard_bytes: int | None = None,
            tokenizer: str | None = None, export: dict[str, Any] | None = None) -> list[str]:
  """Writes config.json (+ `export` provenance) + safetensors (sharded above
  `max_shard_bytes`) + the tokenizer files when `tokenizer` (a SentencePiece .model) is
  given; returns the file names. Warns (TernaryCodesChanged) when `dtype` flips codes."""
  tensors = params_to_hf(cfg, params)
  if dtype != "float32":
    changed, total = ternary_code_changes(cfg, tensors, dtype)
    if changed:
      warnings.warn(TernaryCodesChanged(
          f"the {dtype} export changes {changed:,} of {total:,} ternary weight codes (and rounds "
          "every other weight): its logits differ from these params'; a float32 export is "
          "exact"), stacklevel=2)
    tensors = {k: v.astype(_np_dtype(dtype)) for k, v in tensors.items()}
  os.makedirs(path, exist_ok=True)
  hf_config = config_to_hf(cfg, dtype)
  if export:
    hf_config[EXPORT_KEY] = export
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
  files = ["config.json"]
  if tokenizer:
    write_tokenizer(path, tokenizer)
    files += [TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json"]
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += nbytes
  meta = {"format": "pt"}
  if len(shards) == 1:
    save_file(shards[0], os.path.join(path, SINGLE_FILE), metadata=meta)
    return [*files, SINGLE_FILE]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for name, shard in zip(names, shards):
    save_file(shard, os.path.join(path, name), metadata=meta)
    weight_map.update({k: name for k in shard})
  total = sum(t.nbytes for t in tensors.values())
  with open(os.path.join(path, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return [*files, INDEX_FILE, *names]


# ----------------------------------------------------------------------------- trees


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """Nested dict -> {path tuple: leaf}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _set(tree: dict, path: tuple[str, ...], value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, v in flat.items():
    _set(out, path, v)
  return out


def random_hf_tensors(cfg: ModelConfig, seed: int = 0,
                      dtype: str = "bfloat16") -> dict[str, np.ndarray]:
  """A random checkpoint in HF layout (for tests and demos): norms 1 +- 0.2, embeddings
  and lower bounds N(0, 1), projections N(0, 0.02)."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in expected_shapes(cfg).items():
    if name.endswith("norm.weight"):
      a = 1 + 0.2 * rng.standard_normal(shape)
    elif name in ("model.embeddings.weight", "model.lower_bounds"):
      a = rng.standard_normal(shape)
    else:
      a = 0.02 * rng.standard_normal(shape)
    out[name] = a.astype(_np_dtype(dtype))
  return out


def _np_dtype(dtype: str):
  if dtype not in _DTYPES:
    raise CheckpointError(f"dtype={dtype!r} is unsupported; use one of {sorted(_DTYPES)}")
  return _DTYPES[dtype]

