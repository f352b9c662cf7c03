"""The training loop: mesh -> data -> sharded init -> restore -> steps -> eval -> checkpoints.

Everything is importable: `run(config, workdir)` trains and returns a summary dict.
"""

from __future__ import annotations

import json
import os
import signal
import time
import zlib
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tqdm

from mmfree_jax import multihost
from mmfree_jax import sharding
from mmfree_jax.config import ConfigError, ModelConfig, from_dict
from mmfree_jax.data import builder as data_builder
from mmfree_jax.data import pipeline
from mmfree_jax.models import init_params, param_counts
from mmfree_jax.scaling import flops as flops_lib
from mmfree_jax.train import checkpoint as ckpt
from mmfree_jax.train.metrics import MetricWriter, fmt_duration, read_jsonl
from mmfree_jax.train.optim import SCHEDULES, make_optimizer
from mmfree_jax.train.step import init_state, make_eval_step, make_train_step


class TrainingAborted(RuntimeError):
  """Training stopped on purpose (e.g. a non-finite loss); the message says why."""


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  d = config.model.to_dict()
  d["attention_impl"] = d.get("attention_impl") or None
  return from_dict(d)


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
  if t.on_nonfinite not in ("abort", "skip"):
    raise ConfigError(f"train.on_nonfinite={t.on_nonfinite!r} is unknown; use abort or skip")
  if o.schedule not in SCHEDULES:
    raise ConfigError(f"optim.schedule={o.schedule!r} is unknown; use one of {SCHEDULES}")
  if o.peak_lr <= 0:
    raise ConfigError(f"optim.peak_lr={o.peak_lr} must be positive")
  return cfg


def _sources(corpus: str):
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
  data_dir = config.data.data_dir or os.path.expanduser("~/.cache/mmfree_jax/data")
  try:
    info = multihost.process0_first(lambda: data_builder.prepare(
        _sources(config.data.corpus), data_dir, config.data.tokenizer or None,
        text_field=config.data.text_field))
  except (FileNotFoundError, OSError) as e:
    raise ConfigError(f"data: {e}") from None
  vocab = int((info.metadata or {}).get("vocab_size", 0))
  if vocab > cfg.vocab_size:
    raise ConfigError(f"the tokenizer has {vocab} tokens but model.vocab_size={cfg.vocab_size}; "
                      f"set --config.model.vocab_size={vocab}")
  return info


def _global_batch(batch: dict[str, np.ndarray], sh) -> dict[str, jax.Array]:
  return {k: jax.make_array_from_process_local_data(sh, v) for k, v in batch.items()}


def _fingerprint(batch: dict[str, np.ndarray]) -> int:
  """crc32 of the global batch's inputs (rows of all processes, in process order)."""
  x = batch["inputs"]
  if jax.process_count() > 1:  # a collective: every process calls it at the same steps
    x = multihost_utils.process_allgather(x, tiled=True)
  return zlib.crc32(np.ascontiguousarray(x).tobytes())


def _process_shard(config: ml_collections.ConfigDict) -> str:
  return config.data.get("process_shard", "rows")


class _Preemption:
  """SIGTERM -> save a checkpoint and exit 0 at the next step boundary.

  Several processes: jax.distributed's preemption notifier owns SIGTERM (no Python
  handler, which would hide the signal from it) and all processes agree on the step.
  """

  def __init__(self):
    self.requested = False
    self._multi = jax.process_count() > 1
    self._prev = None if self._multi else signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def restore(self):
    if not self._multi:
      signal.signal(signal.SIGTERM, self._prev)


def evaluate(eval_fn, params, info, config, batch_sh, per_proc_batch: int) -> dict[str, float]:
  it = pipeline.make_eval_iterator(
      info, "validation", per_proc_batch, config.data.seq_len, config.train.eval_batches,
      jax.process_index(), jax.process_count(), process_shard=_process_shard(config))
  tot, n = 0.0, 0.0
  for batch in it:
    ls, nt = eval_fn(params, _global_batch(batch, batch_sh))
    tot += float(ls)
    n += float(nt)
  loss = tot / max(n, 1.0)
  return {"eval_loss": loss, "eval_ppl": float(np.exp(min(loss, 50.0))), "eval_tokens": n}


def run(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict[str, Any]:
  """Trains as configured; resumes from `<workdir>/checkpoints` if present.

  `devices` (default: all) are arranged into the configured mesh.
  """
  cfg = validate(config)
  multihost.initialize()  # jax.distributed when launched as one of several processes
  t_cfg = config.train
  mesh = multihost.make_mesh(config.mesh.to_dict(), devices)
  sharding.check_divisible(cfg, mesh, t_cfg.batch_size)
  info = prepare_data(config, cfg)
  stats = data_builder.corpus_stats(info)
  pcount, pindex = jax.process_count(), jax.process_index()
  per_proc_batch = t_cfg.batch_size // pcount
  train_it = pipeline.make_iterator(
      info, "train", per_proc_batch, config.data.seq_len, seed=t_cfg.seed,
      process_index=pindex, process_count=pcount, worker_count=config.data.worker_count,
      process_shard=_process_shard(config))

  os.makedirs(workdir, exist_ok=True)
  if pindex == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, "model_config.json"), "w") as f:
      json.dump(cfg.__dict__, f, indent=2)

  total = t_cfg.steps
  tx, sched = make_optimizer(config, total)
  counts = param_counts(cfg)
  flops_tok = flops_lib.train_flops_per_token(cfg, config.data.seq_len)
  peak = flops_lib.device_peak_flops(jax.devices()[0].device_kind)
  n_dev = mesh.size
  tok_step = float(t_cfg.batch_size * config.data.seq_len)
  batch_sh = sharding.batch_sharding(mesh)

  with jax.set_mesh(mesh):
    state = init_state(cfg, tx, mesh, t_cfg.seed)
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    mngr = ckpt.make_manager(workdir, t_cfg.keep_checkpoints)
    state, restored = ckpt.restore_latest(mngr, state, train_it, workdir)
    start = int(state.step)
    if restored is not None:
      print(f"resumed from checkpoint step {restored} in {workdir}/checkpoints", flush=True)

    step_fn = jax.jit(make_train_step(cfg, tx, t_cfg.grad_accum, sched),
                      in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                      donate_argnums=0)
    eval_fn = jax.jit(make_eval_step(cfg), in_shardings=(state_sh.params, batch_sh))
    writer = MetricWriter(workdir)
    preempt = _Preemption()
    prof = [int(s) for s in str(t_cfg.profile_steps).split(",") if s.strip()] or None
    if pindex == 0:
      print(f"{cfg.arch} d={cfg.d_model} L={cfg.n_layers}: {counts['total']:,} params "
            f"({counts['non_embedding']:,} non-embedding); mesh {dict(mesh.shape)}; "
            f"{t_cfg.batch_size}x{config.data.seq_len} tokens/step; steps {start}->{total}",
            flush=True)

    pending = None  # (step, metrics, fingerprint) of the previous step, fetched lazily
    interval_t, interval_tok = time.time(), 0.0
    tokens_seen = start * tok_step
    bar = tqdm.tqdm(total=total, initial=start, disable=pindex != 0, unit="step",
                    dynamic_ncols=True, mininterval=5.0)
    last_eval: dict[str, float] = {}

    def flush(p):
      nonlocal interval_t, interval_tok, tokens_seen
      step, m, fp = p
      m = jax.device_get(m)
      if not bool(m["finite"]):
        msg = (f"non-finite loss at step {step} (loss={float(m['loss'])}, "
               f"grad_norm={float(m['grad_norm'])}); the update was dropped")
        if t_cfg.on_nonfinite == "abort":
          raise TrainingAborted(msg + "; no checkpoint was written after it. Lower "
                                "optim.peak_lr or set train.on_nonfinite=skip")
        logging.warning("%s (train.on_nonfinite=skip)", msg)
      tokens_seen += tok_step
      interval_tok += tok_step
      if step % t_cfg.log_every == 0 or step == total:
        now = time.time()
        tps = interval_tok / max(now - interval_t, 1e-9)
        interval_t, interval_tok = now, 0.0
        row = {"loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
               "tokens_per_s": tps, "tokens_seen": tokens_seen,
               "flops": flops_tok * tokens_seen, "data_fingerprint": fp}
        if peak:
          row["mfu"] = flops_tok * tps / (peak * n_dev)
        writer.write(step, row)
        eta = (total - step) * tok_step / max(tps, 1e-9)
        bar.set_postfix_str(f"loss {row['loss']:.3f} | {tps:,.0f} tok/s | eta {fmt_duration(eta)}",
                            refresh=False)

    def drain():
      """Checks (and logs) the step still in flight before eval / checkpoint / exit."""
      nonlocal pending
      if pending is not None:
        flush(pending)
        pending = None

    try:
      for step in range(start + 1, total + 1):
        if prof and step == prof[0] and pindex == 0:
          jax.profiler.start_trace(os.path.join(workdir, "profile"))
        batch = next(train_it)
        fp = _fingerprint(batch) if step % t_cfg.log_every == 0 or step == total else None
        state, metrics = step_fn(state, _global_batch(batch, batch_sh))
        drain()  # the previous step: its metrics are ready by now
        pending = (step, metrics, fp)
        bar.update(1)
        if prof and step == prof[-1] and pindex == 0:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
        last = step == total
        if (t_cfg.eval_every and step % t_cfg.eval_every == 0) or last:
          drain()
          last_eval = evaluate(eval_fn, state.params, info, config, batch_sh, per_proc_batch)
          writer.write(step, last_eval)
          bar.write(f"step {step}: held-out loss {last_eval['eval_loss']:.4f} "
                    f"(ppl {last_eval['eval_ppl']:.1f}; unigram entropy "
                    f"{stats.get('unigram_entropy', float('nan')):.3f})")
        if (t_cfg.checkpoint_every and step % t_cfg.checkpoint_every == 0) or last:
          drain()  # never checkpoint a state whose last step is unchecked
          ckpt.save(mngr, step, state, train_it)
        if preempt.should_stop(step) and not last:
          drain()
          ckpt.save(mngr, step, state, train_it, force=True)
          mngr.wait_until_finished()
          bar.close()
          print(f"preempted (SIGTERM): checkpoint saved at step {step}; rerun the same "
                "command to resume", flush=True)
          return {"preempted": True, "step": step}
      drain()
    finally:
      bar.close()
      mngr.wait_until_finished()
      writer.close()
      preempt.restore()

    if not last_eval:  # nothing left to train (e.g. rerun of a finished run): still evaluate
      last_eval = evaluate(eval_fn, state.params, info, config, batch_sh, per_proc_batch)
    summary = {
        "steps": total, "final_loss": None, **last_eval,
        "unigram_entropy": stats.get("unigram_entropy"),
        "unigram_xent_validation": stats.get("unigram_xent_validation"),
        "tokens_seen": tokens_seen, "flops": flops_tok * tokens_seen,
        "params": counts["total"], "non_embedding_params": counts["non_embedding"],
        "skipped_steps": int(state.skipped),
    }
    path = os.path.join(workdir, "metrics.jsonl")
    rows = [r for r in read_jsonl(path) if "loss" in r] if os.path.exists(path) else []
    summary["final_loss"] = rows[-1]["loss"] if rows else None
    if pindex == 0:
      with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return {"state": state, "summary": summary, "cfg": cfg}

