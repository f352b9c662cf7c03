"""A training config's model config, checked before any device or data is touched, and
its tokenized corpus (built once, shared by every process)."""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from mmfree_jax import multihost
from mmfree_jax.config import ConfigError, ModelConfig, from_dict
from mmfree_jax.data import builder as data_builder
from mmfree_jax.train import memory, optim


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The model's config; with `model.remat="auto"`, the layout `memory.preferences` tries
  first (the trainer's memory plan picks the one it runs)."""
  d = config.model.to_dict()
  d["attention_impl"] = d.get("attention_impl") or None
  if d.get("remat") == memory.AUTO:
    first = memory.preferences(1, 1, 1)[0]
    d.update(remat=first.remat, unroll_layers=first.unroll_layers)
  return from_dict(d)


_TRAIN_MINIMA = (  # (key, smallest value, what it means)
    ("log_every", 1, "log every N steps"),
    ("eval_every", 0, "0 = only at the end"),
    ("eval_batches", 1, "batches per held-out evaluation"),
    ("checkpoint_every", 0, "0 = only at the end"),
    ("keep_checkpoints", 1, "a rerun resumes from the newest"),
    ("max_consecutive_skips", 1, "use train.on_nonfinite=abort to stop at the first"),
    ("sample_tokens", 0, "0 = no sample"),
)


def validate(config: ml_collections.ConfigDict) -> ModelConfig:
  """Checks that need no devices or data; raises ConfigError with a one-line message."""
  cfg = model_config(config)
  t, o = config.train, config.optim
  if t.steps <= 0:
    raise ConfigError(f"train.steps={t.steps} must be positive")
  if t.batch_size <= 0 or t.grad_accum <= 0 or t.batch_size % t.grad_accum:
    raise ConfigError(f"train.batch_size={t.batch_size} must be a positive multiple of "
                      f"train.grad_accum={t.grad_accum}")
  if config.data.seq_len <= 0:
    raise ConfigError(f"data.seq_len={config.data.seq_len} must be positive")
  if not str(config.data.corpus).strip():
    raise ConfigError("data.corpus is empty; set --config.data.corpus=shakespeare or to "
                      "comma-separated text/JSONL files")
  if t.on_schedule_change not in optim.SCHEDULE_CHANGES:
    raise ConfigError(f"train.on_schedule_change={t.on_schedule_change!r} is unknown; use one "
                      f"of {optim.SCHEDULE_CHANGES}")
  if t.on_nonfinite not in ("abort", "skip"):
    raise ConfigError(f"train.on_nonfinite={t.on_nonfinite!r} is unknown; use abort or skip")
  for key, low, why in _TRAIN_MINIMA:
    if t[key] < low:
      raise ConfigError(f"train.{key}={t[key]} must be >= {low} ({why})")
  if o.schedule not in optim.SCHEDULES:
    raise ConfigError(f"optim.schedule={o.schedule!r} is unknown; use one of {optim.SCHEDULES}")
  if o.peak_lr <= 0:
    raise ConfigError(f"optim.peak_lr={o.peak_lr} must be positive")
  if t.wandb_project and importlib.util.find_spec("wandb") is None:
    raise ConfigError(f"train.wandb_project={t.wandb_project!r} needs wandb: pip install wandb "
                      "(or set train.wandb_project='' to log to metrics.jsonl and TensorBoard only)")
  return cfg


def data_dir(config: ml_collections.ConfigDict) -> str:
  """Where the tokenized corpus is built: `data.data_dir`, else ~/.cache/mmfree_jax/data."""
  return config.data.data_dir or os.path.expanduser("~/.cache/mmfree_jax/data")


def corpus_sources(corpus: str):
  """`data.corpus` as the builder's sources: "shakespeare", or its comma-separated files
  (ConfigError if one is missing)."""
  corpus = str(corpus).strip()
  if corpus == "shakespeare":
    return corpus
  files = [s.strip() for s in corpus.split(",") if s.strip()]
  try:
    data_builder.resolve_sources(files)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(f"data.corpus: {e}") from None
  return files


def prepare_data(config: ml_collections.ConfigDict, cfg: ModelConfig):
  """Builds (once) the tokenized dataset; returns its tfds DatasetInfo."""
  try:
    info = multihost.process0_first(lambda: data_builder.prepare(
        corpus_sources(config.data.corpus), data_dir(config), config.data.tokenizer or None,
        text_field=config.data.text_field))
  except data_builder.CorpusError as e:
    raise ConfigError(f"data.corpus: {e}") from None
  except OSError as e:
    raise ConfigError(f"data: {e}") from None
  vocab = int((info.metadata or {}).get("vocab_size", 0))
  if vocab > cfg.vocab_size:
    raise ConfigError(f"the tokenizer has {vocab} tokens but model.vocab_size={cfg.vocab_size}; "
                      f"set --config.model.vocab_size={vocab}")
  return info


def corpus_train_tokens(config: ml_collections.ConfigDict, build: bool) -> float | None:
  """Tokens of the corpus's train split, building the dataset if `build` (else None when it
  is not built yet); None when unknown."""
  try:
    cfg = model_config(config)
    if not build:
      b = data_builder.MmfreeText(
          data_dir=data_dir(config), config=data_builder.make_config(
              corpus_sources(config.data.corpus), config.data.tokenizer or None,
              text_field=config.data.text_field), file_format="array_record")
      if not os.path.exists(os.path.join(os.fspath(b.data_dir), "dataset_info.json")):
        return None
    info = prepare_data(config, cfg)
    return float(data_builder.corpus_stats(info)["train"]["tokens"])
  except Exception:  # noqa: BLE001 - an unknown corpus size only blanks an epochs column
    return None
