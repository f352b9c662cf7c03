"""Orbax checkpoints of the train state and the grain iterator, restored onto any mesh.

Layout: `<workdir>/checkpoints/<step>/{state,data}` (Orbax CheckpointManager, async).
`state` holds params, optimizer state, step and skip counter; `data` the grain
iterator position. A newest checkpoint that fails to restore is moved aside to
`<workdir>/checkpoints_corrupt/` (never deleted) and the previous one is used; one written
for another model or another data layout is refused with a clear error, untouched.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from mmfree_jax.config import ConfigError


def make_manager(workdir: str, keep: int | None) -> ocp.CheckpointManager:
  """The run's checkpoint manager; `keep` = how many to keep (None: all)."""
  path = os.path.abspath(os.path.join(workdir, "checkpoints"))
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                      enable_async_checkpointing=True)
  handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}
  return ocp.CheckpointManager(path, options=opts, item_handlers=handlers)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_iter: Any, force: bool = False):
  """Async save; returns at once (call `mngr.wait_until_finished()` before exit)."""
  if step in mngr.all_steps():
    return
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=grain.checkpoint.CheckpointSave(data_iter)),
            force=force)


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


def _move_aside(mngr: ocp.CheckpointManager, step: int, workdir: str, err: Exception):
  bad = os.path.join(str(mngr.directory), str(step))
  dest = os.path.join(os.path.abspath(workdir), "checkpoints_corrupt", str(step))
  first = str(err).splitlines()[0][:200] if str(err) else ""
  logging.warning("checkpoint %s is unreadable (%s: %s); moved to %s", bad, type(err).__name__,
                  first, dest)
  print(f"warning: checkpoint step {step} is unreadable ({type(err).__name__}); "
        f"moved to {dest}; falling back to an older checkpoint", flush=True)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if os.path.exists(dest):
      shutil.rmtree(dest)
    shutil.move(bad, dest)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"moved aside checkpoint {step}")
  mngr.reload()


def restore_latest(mngr: ocp.CheckpointManager, state: Any, data_iter: Any,
                   workdir: str) -> tuple[Any, int | None]:
  """Restores the newest readable checkpoint into (state, data_iter).

  Returns (state, step) or (state, None) when there is none. An unreadable checkpoint is
  moved aside with a warning and the previous one is tried. A checkpoint written for a
  different model, or a data-iterator state that does not fit this run (e.g. another
  process count), is a ConfigError and nothing is moved.
  """
  target = abstract_like(state)
  for step in sorted(mngr.all_steps(), reverse=True):
    mismatch = _shape_mismatch(mngr, step, target)
    if mismatch:
      raise ConfigError(f"the checkpoint at step {step} in {mngr.directory} was written for a "
                        f"different model ({mismatch}); use a new --workdir")
    try:
      out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    except Exception as e:  # noqa: BLE001 - any failure means "this one is unusable"
      _move_aside(mngr, step, workdir, e)
      continue
    try:
      mngr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iter)))
    except Exception as e:  # noqa: BLE001
      raise ConfigError(
          f"the data-iterator state of checkpoint step {step} does not fit this run "
          f"({type(e).__name__}); resume with the data config and process count that wrote it"
      ) from None
    return out["state"], step
  return state, None
