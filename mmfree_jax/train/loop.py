"""The training loop: mesh -> data -> sharded init -> restore -> steps -> eval -> checkpoints.

Everything is importable: `run(config, workdir)` trains and returns a summary dict.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
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

from mmfree_jax import cli
from mmfree_jax import multihost
from mmfree_jax import sharding
from mmfree_jax.config import ConfigError, ModelConfig
from mmfree_jax.data import builder as data_builder
from mmfree_jax.data import pipeline
from mmfree_jax.models import param_counts
from mmfree_jax import flops as flops_lib
from mmfree_jax.train import checkpoint as ckpt
from mmfree_jax.train import memory
from mmfree_jax.train import workdir as workdir_lib
from mmfree_jax.train.metrics import MetricWriter, fmt_duration, read_jsonl
from mmfree_jax.train import optim
from mmfree_jax.train.setup import prepare_data, validate
from mmfree_jax.train.step import init_state, make_eval_step


class TrainingAborted(RuntimeError):
  """Training stopped on purpose (non-finite steps, a failed checkpoint save); the message
  says why."""


class Preempted(BaseException):
  """SIGTERM outside the step loop; the message says what is saved. A BaseException (like
  KeyboardInterrupt): the `except Exception` around a restore must not take it for an
  unreadable checkpoint."""


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
  """SIGTERM at any phase -> exit 0 with a line saying what is saved.

  In the step loop the handler only sets a flag and the loop saves a checkpoint at the
  next step boundary; elsewhere (data, init, restore, the end) it raises Preempted at
  once, whose message names the phase and the checkpoint on disk. Several processes:
  jax.distributed's preemption notifier owns SIGTERM (a Python handler would hide the
  signal from it) and all processes agree on the step, in the loop only.
  """

  def __init__(self):
    self.requested = False
    self.in_loop = False
    self.phase = "starting"
    self.saved: int | None = None  # the newest checkpoint step on disk, once known
    self._multi = jax.process_count() > 1
    self._prev = None if self._multi else signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    first = not self.requested
    self.requested = True
    if first and not self.in_loop:
      raise Preempted(self.message())

  def message(self) -> str:
    saved = ("nothing new was saved" if self.saved is None
             else f"checkpoint step {self.saved} is on disk")
    return f"preempted (SIGTERM) while {self.phase}: {saved}; rerun the same command to resume"

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


def _layout(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The settings a checkpoint's data position and token count depend on (ckpt.LAYOUT_KEYS)."""
  return {"train.batch_size": config.train.batch_size, "data.seq_len": config.data.seq_len,
          "data.process_shard": _process_shard(config)}


def _resumed_tokens(meta: dict[str, Any] | None, start: int, tok_step: float) -> float:
  """Tokens consumed before `start` (a checkpoint without `meta`: start x tokens per step)."""
  if meta is not None:
    return float(meta["tokens_seen"])
  if start:
    print(f"note: checkpoint step {start} stores no token count (an older checkpoint); counting "
          f"{start} steps x {tok_step:.0f} tokens", flush=True)
  return start * tok_step


def nonfinite_message(step: int, loss: float, grad_norm: float) -> str:
  """Which of loss / gradient norm was non-finite at `step`."""
  what = "loss" if not math.isfinite(loss) else "gradient norm"
  return (f"non-finite {what} at step {step} (loss={loss}, grad_norm={grad_norm}); "
          "the update was dropped")


class _StepLog:
  """Checks each step's metrics one step late (no device sync), logs them, counts tokens."""

  def __init__(self, config, writer: MetricWriter, bar, tokens_seen: float, flops_tok: float,
               peak_flops: float, lr_plan: dict[str, Any]):
    self._config, self.t, self._lr_plan = config, config.train, lr_plan
    self.tok_step = float(config.train.batch_size * config.data.seq_len)
    self.tokens_seen = tokens_seen
    self.skips_in_a_row = 0
    self._writer, self._bar, self._flops_tok, self._peak = writer, bar, flops_tok, peak_flops
    self._pending = None  # (step, metrics, fingerprint) of the newest step, fetched lazily
    self.once: dict[str, Any] = {}  # goes into the next row written (the step's memory plan)
    self._interval_t, self._interval_tok = time.time(), 0.0

  def meta(self) -> dict[str, Any]:
    """The checkpoint's `meta` item: tokens consumed so far, the layout that consumed them and
    the LR plan (`optim.resume_plan`)."""
    return {"tokens_seen": self.tokens_seen, "layout": _layout(self._config),
            "lr_plan": self._lr_plan}

  def push(self, step: int, metrics, fingerprint: int | None):
    """Records a dispatched step; checks and logs the previous one (its metrics are ready)."""
    self.drain()
    self._pending = (step, metrics, fingerprint)

  def drain(self):
    """Checks and logs the step still in flight (before eval / checkpoint / exit)."""
    if self._pending is not None:
      pending, self._pending = self._pending, None
      self._flush(*pending)

  def _check_finite(self, step: int, m: dict[str, Any]):
    if bool(m["finite"]):
      self.skips_in_a_row = 0
      return
    self.skips_in_a_row += 1
    msg = nonfinite_message(step, float(m["loss"]), float(m["grad_norm"]))
    if self.t.on_nonfinite == "abort":
      raise TrainingAborted(msg + "; no checkpoint was written after it. Lower "
                            "optim.peak_lr or set train.on_nonfinite=skip")
    bound = self.t.max_consecutive_skips
    if self.skips_in_a_row > bound:
      raise TrainingAborted(f"{self.skips_in_a_row} non-finite steps in a row (more than "
                            f"train.max_consecutive_skips={bound}), the last: {msg}; checkpoints "
                            "hold only finite parameters. Lower optim.peak_lr or raise the bound")
    logging.warning("%s (train.on_nonfinite=skip; %d in a row)", msg, self.skips_in_a_row)

  def _flush(self, step: int, m, fp: int | None):
    m = jax.device_get(m)
    self._check_finite(step, m)
    self.tokens_seen += self.tok_step
    self._interval_tok += self.tok_step
    if step % self.t.log_every and step != self.t.steps:
      return
    now = time.time()
    tps = self._interval_tok / max(now - self._interval_t, 1e-9)
    self._interval_t, self._interval_tok = now, 0.0
    row = {"loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
           "tokens_per_s": tps, "tokens_seen": self.tokens_seen,
           "flops": self._flops_tok * self.tokens_seen, "data_fingerprint": fp, **self.once}
    self.once = {}
    if self._peak:
      row["mfu"] = self._flops_tok * tps / self._peak
    self._writer.write(step, row)
    eta = (self.t.steps - step) * self.tok_step / max(tps, 1e-9)
    self._bar.set_postfix_str(
        f"loss {row['loss']:.3f} | {tps:,.0f} tok/s | eta {fmt_duration(eta)}", refresh=False)


@contextlib.contextmanager
def _workdir_lock(workdir: str):
  """Process 0 holds the workdir's lock for the run; every process stops if it could not."""
  with contextlib.ExitStack() as stack:
    error = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(workdir_lib.locked(workdir))
      except ConfigError as e:
        error = e
    failed = np.int32(error is not None)
    if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(failed):
      error = error or ConfigError(f"process 0 could not lock workdir {workdir}; its log says why")
    if error is not None:
      raise error
    yield


# The workdir's storage failed (full, quota, remounted read-only, I/O error): one line, not a bug.
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


def run(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict[str, Any]:
  """Trains as configured; resumes from `<workdir>/checkpoints` if present.

  `devices` (default: all) are arranged into the configured mesh. Returns
  {"state", "summary", "cfg"}, or {"preempted": True, "step": newest checkpoint step or
  None} after a SIGTERM (a line on stdout says what is saved). Raises ConfigError (bad
  input; nothing in the workdir changed) or TrainingAborted (non-finite steps, a failed
  checkpoint save, a full disk).
  """
  cfg = validate(config)
  multihost.initialize()  # jax.distributed when launched as one of several processes
  mesh = multihost.make_mesh(config.mesh.to_dict(), devices)
  sharding.check_divisible(cfg, mesh, config.train.batch_size)
  preempt = _Preemption()
  try:
    with _workdir_lock(workdir):
      return _train(config, cfg, mesh, workdir, preempt)
  except Preempted as e:
    print(e, flush=True)
    return {"preempted": True, "step": preempt.saved}
  except OSError as e:
    if e.errno not in _STORAGE_ERRNOS:
      raise
    steps = ckpt.saved_steps(workdir)
    newest = f"the newest checkpoint is step {steps[-1]}" if steps else "no checkpoint was saved"
    raise TrainingAborted(f"cannot write {e.filename or workdir} ({e.strerror}); training "
                          f"stopped; {newest}; fix the cause and rerun the same command") from None
  finally:
    preempt.restore()


def _restore(ckpts: ckpt.Checkpoints, state, train_it, config: ml_collections.ConfigDict,
             workdir: str, preempt: _Preemption) -> tuple[Any, float, dict[str, Any]]:
  """The newest usable checkpoint -> (state, tokens seen, LR plan); the run's files are
  written by `_write_run_files` once the step's memory plan is accepted too."""
  state, restored, meta = ckpt.restore_latest(ckpts.mngr, state, train_it, workdir,
                                              _layout(config))
  preempt.saved = restored
  plan, note = optim.resume_plan(config, (meta or {}).get("lr_plan"), int(state.step))
  if restored is not None:
    print(f"resumed from checkpoint step {restored} in {workdir}/checkpoints", flush=True)
  if note and jax.process_index() == 0:
    print(note, flush=True)
  tokens_seen = _resumed_tokens(meta, int(state.step),
                                float(config.train.batch_size * config.data.seq_len))
  return state, tokens_seen, plan


def _plan_step(config: ml_collections.ConfigDict, cfg: ModelConfig, tx, sched, state, mesh
               ) -> memory.Plan:
  """The compiled train step, its peak checked against the device's memory before the first
  step (`train/memory.py`); with model.remat="auto", the layout it prefers that fits."""
  compile_step = memory.step_compiler(cfg, tx, sched, state, mesh, config.data.seq_len)
  layout = memory.Layout(cfg.remat, cfg.unroll_layers, config.train.grad_accum)
  return memory.plan(compile_step, layout, config.train.batch_size,
                     mesh.shape["data"] * mesh.shape["fsdp"], memory.device_budget(),
                     auto=config.model.remat == memory.AUTO)


def _write_run_files(ckpts: ckpt.Checkpoints, config: ml_collections.ConfigDict,
                     cfg: ModelConfig, workdir: str):
  """The run's config files, only once the resume and the memory plan are accepted (a
  refused run leaves the run's files as they were)."""
  if jax.process_index() == 0:
    ckpts.remove_unfinished()
    workdir_lib.write_json(os.path.join(workdir, "config.json"),
                           json.loads(config.to_json_best_effort()))
    workdir_lib.write_json(os.path.join(workdir, "model_config.json"), cfg.__dict__)


def _recorded_layout(workdir: str) -> dict[str, Any]:
  """The memory plan's record in an earlier summary.json, if any (`memory.Plan.record`)."""
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return {k: v for k, v in json.load(f).items() if k in memory.RECORD_KEYS}


def _summary(workdir: str, steps: int, state, last_eval: dict[str, float], stats: dict[str, Any],
             counts: dict[str, int], tokens_seen: float, flops_tok: float,
             layout: dict[str, Any]) -> dict[str, Any]:
  """summary.json's contents (written by process 0); final_loss is metrics.jsonl's last loss."""
  path = os.path.join(workdir, "metrics.jsonl")
  rows = [r for r in read_jsonl(path) if "loss" in r] if os.path.exists(path) else []
  summary = {
      "steps": steps, "final_loss": rows[-1]["loss"] if rows else None, **last_eval,
      "unigram_entropy": stats.get("unigram_entropy"),
      "unigram_xent_validation": stats.get("unigram_xent_validation"),
      "tokens_seen": tokens_seen, "flops": flops_tok * tokens_seen,
      "params": counts["total"], "non_embedding_params": counts["non_embedding"],
      "skipped_steps": int(state.skipped), **layout,
  }
  if jax.process_index() == 0:
    workdir_lib.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


def _train(config: ml_collections.ConfigDict, cfg: ModelConfig, mesh, workdir: str,
           preempt: _Preemption) -> dict[str, Any]:
  """`run` once the workdir is locked."""
  t_cfg = config.train
  preempt.phase = "preparing data"
  info = prepare_data(config, cfg)
  stats = data_builder.corpus_stats(info)
  pcount, pindex = jax.process_count(), jax.process_index()
  per_proc_batch = t_cfg.batch_size // pcount
  train_it = pipeline.make_iterator(
      info, "train", per_proc_batch, config.data.seq_len, seed=t_cfg.seed,
      process_index=pindex, process_count=pcount, worker_count=config.data.worker_count,
      process_shard=_process_shard(config))

  total = t_cfg.steps
  tx, _ = optim.make_optimizer(config, total)  # the state's structure; the LR plan comes later
  counts = param_counts(cfg)
  flops_tok = flops_lib.train_flops_per_token(cfg, config.data.seq_len)
  peak = flops_lib.device_peak_flops(jax.devices()[0].device_kind)
  batch_sh = sharding.batch_sharding(mesh)

  with jax.set_mesh(mesh):
    preempt.phase = "initializing the model"
    state = init_state(cfg, tx, mesh, t_cfg.seed)
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    preempt.phase = "restoring the newest checkpoint"
    ckpts = ckpt.Checkpoints(workdir, t_cfg.keep_checkpoints)
    try:
      state, tokens_seen, plan = _restore(ckpts, state, train_it, config, workdir, preempt)
      start = int(state.step)
      tx, sched = optim.plan_optimizer(config, plan)
      preempt.phase = "compiling the train step"
      # A finished run (nothing left to train) compiles no step and keeps its recorded plan.
      step_plan = _plan_step(config, cfg, tx, sched, state, mesh) if start < total else None
      if step_plan is not None:
        cfg, step_fn = step_plan.layout.apply(cfg), step_plan.compiled
      layout = step_plan.record() if step_plan else _recorded_layout(workdir)
      _write_run_files(ckpts, config, cfg, workdir)
      eval_fn = jax.jit(make_eval_step(cfg), in_shardings=(state_sh.params, batch_sh))
      writer = MetricWriter(workdir, config)
      prof = [int(s) for s in str(t_cfg.profile_steps).split(",") if s.strip()] or None
      if pindex == 0:
        print(f"{cfg.arch} d={cfg.d_model} L={cfg.n_layers}: {counts['total']:,} params "
              f"({counts['non_embedding']:,} non-embedding); mesh {dict(mesh.shape)}; "
              f"{t_cfg.batch_size}x{config.data.seq_len} tokens/step; steps {start}->{total}",
              flush=True)
        if step_plan is not None:
          print(step_plan.line(), flush=True)
      # One ETA: the postfix's, from the throughput of the last log interval (tqdm's own
      # would average in the compile time).
      bar = cli.progress_bar(total=total, initial=start, disable=pindex != 0, unit="step",
                             bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
      log = _StepLog(config, writer, bar, tokens_seen, flops_tok, (peak or 0.0) * mesh.size,
                     plan)
      log.once = dict(layout)
      last_eval: dict[str, float] = {}
      preempt.in_loop = True
      try:
        for step in range(start + 1, total + 1):
          if prof and step == prof[0] and pindex == 0:
            jax.profiler.start_trace(os.path.join(workdir, "profile"))
          batch = next(train_it)
          fp = _fingerprint(batch) if step % t_cfg.log_every == 0 or step == total else None
          state, metrics = step_fn(state, _global_batch(batch, batch_sh))
          log.push(step, metrics, fp)
          ckpts.poll()  # a failed background save stops training at once
          bar.update(1)
          if prof and step == prof[-1] and pindex == 0:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
          last = step == total
          if (t_cfg.eval_every and step % t_cfg.eval_every == 0) or last:
            log.drain()
            last_eval = evaluate(eval_fn, state.params, info, config, batch_sh, per_proc_batch)
            writer.write(step, last_eval)
            bar.write(f"step {step}: held-out loss {last_eval['eval_loss']:.4f} "
                      f"(ppl {last_eval['eval_ppl']:.1f}; unigram entropy "
                      f"{stats.get('unigram_entropy', float('nan')):.3f})")
          if (t_cfg.checkpoint_every and step % t_cfg.checkpoint_every == 0) or last:
            log.drain()  # never checkpoint a state whose last step is unchecked
            ckpts.save(step, state, train_it, log.meta())
          if preempt.should_stop(step) and not last:
            log.drain()
            ckpts.save(step, state, train_it, log.meta(), force=True)
            ckpts.wait()
            bar.close()
            print(f"preempted (SIGTERM): checkpoint saved at step {step}; rerun the same "
                  "command to resume", flush=True)
            return {"preempted": True, "step": step}
        log.drain()
        ckpts.wait()
      except ckpt.SaveError as e:
        raise TrainingAborted(str(e)) from None
      finally:
        preempt.in_loop = False
        bar.close()
        writer.close()
    finally:
      ckpts.close()

  preempt.phase, preempt.saved = "finishing (final evaluation and summary)", total
  if preempt.requested:  # SIGTERM at the last step: its checkpoint is saved
    raise Preempted(preempt.message())
  if not last_eval:  # nothing left to train (e.g. rerun of a finished run): still evaluate
    last_eval = evaluate(eval_fn, state.params, info, config, batch_sh, per_proc_batch)
  summary = _summary(workdir, total, state, last_eval, stats, counts, log.tokens_seen, flops_tok,
                     layout)
  return {"state": state, "summary": summary, "cfg": cfg}
