"""Orbax checkpoints of the train state, the grain iterator and the token accounting.

Layout: `<workdir>/checkpoints/<step>/{state,data,meta}` (Orbax CheckpointManager, async).
`state` holds params, optimizer state, step and skip counter; `data` the grain iterator
position (one file per process); `meta` the tokens seen so far and the data layout that
consumed them (`LAYOUT_KEYS`). Checkpoints written before `meta` existed still restore.

Restore: a checkpoint with an unreadable item (state, data or meta) is moved aside to
`<workdir>/checkpoints_corrupt/` (never deleted) and the previous one is used; one written
for another model, data layout or process count is refused with a one-line ConfigError,
untouched. Damage that still reads back (a flipped bit inside a tensor) is not detected:
Orbax stores no checksums of the array data.

Saves run in the background; `Checkpoints.poll()` / `.wait()` turn a failed save (a full
disk, a lost mount) into one SaveError naming the step, the cause and the last good
checkpoint, and remove the failed save's temporary directory.
"""

from __future__ import annotations

import contextlib
import glob
import logging as stdlib_logging
import os
import re
import shutil
from typing import Any

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from mmfree_jax.config import ConfigError

LAYOUT_KEYS = ("train.batch_size", "data.seq_len", "data.process_shard")


class SaveError(RuntimeError):
  """A checkpoint save failed; the message names the step, the cause and the last good one."""


def make_manager(workdir: str, keep: int | None) -> ocp.CheckpointManager:
  """The run's checkpoint manager; `keep` = how many to keep (None: all)."""
  path = os.path.abspath(os.path.join(workdir, "checkpoints"))
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                      enable_async_checkpointing=True)
  handlers = {"state": ocp.StandardCheckpointHandler(),
              "data": grain.checkpoint.CheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(path, options=opts, item_handlers=handlers)


def _cause(err: BaseException) -> str:
  """The OS error behind `err` if there is one ('No space left on device'), else its first line."""
  e: BaseException | None = err
  while e is not None:
    if isinstance(e, OSError) and e.errno:
      return os.strerror(e.errno)
    code = re.search(r"os_error_code='?(\d+)", str(e))  # TensorStore's wording
    if code:
      return os.strerror(int(code.group(1)))
    e = e.__cause__ or e.__context__
  first = (str(err).splitlines() or [""])[0]
  return f"{type(err).__name__}: {first[:200]}"


class Checkpoints:
  """The trainer's checkpoints: async saves whose failures surface at the next `poll`."""

  def __init__(self, workdir: str, keep: int):
    self.mngr = make_manager(workdir, keep)
    self._saving: int | None = None  # step of the newest save, until it is known to be done

  def remove_unfinished(self, step: int | str = "*"):
    """Deletes the temporary directories of saves that never finished (all, or `step`'s)."""
    for tmp in glob.glob(os.path.join(str(self.mngr.directory), f"{step}.orbax-checkpoint-tmp*")):
      shutil.rmtree(tmp, ignore_errors=True)

  def save(self, step: int, state: Any, data_iter: Any, meta: dict[str, Any], force: bool = False):
    """Starts an async save (after the previous one finished); SaveError if either fails."""
    if step in self.mngr.all_steps():
      return
    self.wait()
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=grain.checkpoint.CheckpointSave(data_iter),
                              meta=ocp.args.JsonSave(meta))
    try:
      self.mngr.save(step, args=args, force=force)
    except Exception as e:  # noqa: BLE001 - the synchronous part failed (e.g. the data item)
      raise self._failed(step, e) from None
    self._saving = step

  def poll(self):
    """After every step: SaveError if the newest save has failed; never blocks.

    One process only: several could see a save end at different steps and diverge; they
    find out at the next `save` or `wait`, which every process reaches together.
    """
    if jax.process_count() == 1 and not self.mngr.is_saving_in_progress():
      self.wait()

  def wait(self):
    """Blocks until the newest save is done; SaveError if it failed."""
    if self._saving is None:
      return
    step, self._saving = self._saving, None
    try:
      self.mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - whatever the storage raised
      raise self._failed(step, e) from None

  def close(self):
    """Waits for a save still running and closes the manager, quietly: a failure of that
    save was reported by `wait`, or another error is on its way out."""
    with contextlib.suppress(Exception):
      self.mngr.close()

  def _failed(self, step: int, err: BaseException) -> SaveError:
    # The save's other write tasks fail the same way; asyncio would print each one's traceback
    # ("Task exception was never retrieved") after our one line. The run stops here.
    stdlib_logging.getLogger("asyncio").setLevel(stdlib_logging.CRITICAL)
    if jax.process_index() == 0:
      self.remove_unfinished(step)
    good = [s for s in self.mngr.all_steps() if s < step]
    last = (f"the last good checkpoint is step {max(good)} in {self.mngr.directory}" if good
            else "no checkpoint was saved before it")
    return SaveError(f"checkpoint save at step {step} failed ({_cause(err)}); {last}; training "
                     "stopped: fix the cause and rerun the same command to resume")


def saved_steps(workdir: str) -> list[int]:
  """The finished checkpoints' steps in `workdir`, oldest first (read from the directory)."""
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings (restores onto the current mesh)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {"/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in kp):
          tuple(v.shape) for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]
          if hasattr(v, "shape")}


def _shape_mismatch(mngr: ocp.CheckpointManager, step: int, target: Any) -> str | None:
  """How the saved parameters' shapes differ from `target.params` (None if same or unreadable)."""
  try:
    saved = _leaf_shapes(mngr.item_metadata(step)["state"]["params"])
  except Exception:  # noqa: BLE001 - unreadable metadata: let the restore decide
    return None
  want = _leaf_shapes(target.params)
  diff = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
  if not saved or not diff:
    return None
  return f"{len(diff)} parameters differ, e.g. {diff[0]}: saved {saved.get(diff[0])} vs now {want.get(diff[0])}"


def _layout_mismatch(meta: dict[str, Any], layout: dict[str, Any]) -> str | None:
  """'train.batch_size=8 (this run: 16)' for each layout key that differs, else None."""
  saved = meta.get("layout", {})
  diff = [f"{k}={saved[k]} (this run: {layout[k]})" for k in LAYOUT_KEYS
          if k in saved and saved[k] != layout[k]]
  return ", ".join(diff) or None


def _other_process_count(step_dir: str) -> str | None:
  """The process count a data item was written by, if not this run's (None if it fits)."""
  i, n = jax.process_index(), jax.process_count()
  data = os.path.join(step_dir, "data")
  if not os.path.isdir(data) or os.path.exists(os.path.join(data, f"process_{i}-of-{n}.json")):
    return None  # fits, or is damaged: the restore will tell
  counts = {m.group(1) for m in map(re.compile(r"process_\d+-of-(\d+)\.json$").match,
                                      os.listdir(data)) if m}
  return ",".join(sorted(counts)) or None


def _move_aside(mngr: ocp.CheckpointManager, step: int, workdir: str, what: str, err: Exception):
  bad = os.path.join(str(mngr.directory), str(step))
  dest = os.path.join(os.path.abspath(workdir), "checkpoints_corrupt", str(step))
  first = str(err).splitlines()[0][:200] if str(err) else ""
  logging.warning("checkpoint %s: %s is unreadable (%s: %s); moved to %s", bad, what,
                  type(err).__name__, first, dest)
  print(f"warning: checkpoint step {step} is unreadable ({what}: {type(err).__name__}); "
        f"moved to {dest}; falling back to an older checkpoint", flush=True)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if os.path.exists(dest):
      shutil.rmtree(dest)
    shutil.move(bad, dest)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"moved aside checkpoint {step}")
  mngr.reload()


def _refuse_if_foreign(mngr: ocp.CheckpointManager, step: int, target: Any,
                       meta: dict[str, Any] | None, layout: dict[str, Any]):
  """ConfigError if checkpoint `step` was written for another model, layout or process count."""
  where = f"the checkpoint at step {step} in {mngr.directory}"
  mismatch = _shape_mismatch(mngr, step, target)
  if mismatch:
    raise ConfigError(f"{where} was written for a different model ({mismatch}); use a new "
                      "--workdir")
  mismatch = meta and _layout_mismatch(meta, layout)
  if mismatch:
    raise ConfigError(f"{where} was written with {mismatch}: resuming would change the data "
                      "order and the token count; set them back, or use a new --workdir")
  counts = _other_process_count(os.path.join(str(mngr.directory), str(step)))
  if counts:
    raise ConfigError(f"{where} was written by {counts} process(es), this run has "
                      f"{jax.process_count()}; resume with the process count that wrote it")


def _read_meta(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
  """The `meta` item of `step`; None for checkpoints written before it existed."""
  if not os.path.isdir(os.path.join(str(mngr.directory), str(step), "meta")):
    return None
  meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  if not isinstance(meta, dict) or "tokens_seen" not in meta:
    raise ValueError(f"meta holds {type(meta).__name__}, not the token accounting")
  return meta


def restore_latest(mngr: ocp.CheckpointManager, state: Any, data_iter: Any, workdir: str,
                   layout: dict[str, Any]) -> tuple[Any, int | None, dict[str, Any] | None]:
  """Restores the newest readable checkpoint into (state, data_iter).

  Returns (state, step, meta), or (state, None, None) when there is none; `meta` is None
  for a checkpoint without one. `layout` maps `LAYOUT_KEYS` to this run's values.
  """
  target = abstract_like(state)
  fresh = data_iter.get_state()
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      meta = _read_meta(mngr, step)
    except Exception as e:  # noqa: BLE001 - any failure means "this one is unusable"
      _move_aside(mngr, step, workdir, "meta", e)
      continue
    _refuse_if_foreign(mngr, step, target, meta, layout)
    try:
      out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    except Exception as e:  # noqa: BLE001
      _move_aside(mngr, step, workdir, "state", e)
      continue
    try:
      mngr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iter)))
    except Exception as e:  # noqa: BLE001
      data_iter.set_state(fresh)
      _move_aside(mngr, step, workdir, "data iterator", e)
      continue
    return out["state"], step, meta
  return state, None, None
