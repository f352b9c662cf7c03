"""Orbax checkpoints of the train state and the grain iterator, restored onto any mesh.

Layout: `<workdir>/checkpoints/<step>/{state,data}` (Orbax CheckpointManager, async).
`state` holds params, optimizer state, step and skip counter; `data` the grain
iterator position. A newest checkpoint that fails to restore is moved aside to
`<workdir>/checkpoints_corrupt/` (never deleted) and the previous one is used.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  path = os.path.abspath(os.path.join(workdir, "checkpoints"))
  opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                      enable_async_checkpointing=True)
  return ocp.CheckpointManager(path, options=opts, item_names=("state", "data"))


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


def restore_latest(mngr: ocp.CheckpointManager, state: Any, data_iter: Any,
                   workdir: str) -> tuple[Any, int | None]:
  """Restores the newest readable checkpoint into (state, data_iter).

  Returns (state, step) or (state, None) when there is none. Unreadable checkpoints
  are moved aside with a warning.
  """
  target = abstract_like(state)
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      out = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target),
          data=grain.checkpoint.CheckpointRestore(data_iter)))
      return out["state"], step
    except Exception as e:  # noqa: BLE001 - any failure means "this one is unusable"
      bad = os.path.join(str(mngr.directory), str(step))
      dest = os.path.join(os.path.abspath(workdir), "checkpoints_corrupt", str(step))
      logging.warning("checkpoint %s is unreadable (%s: %s); moved to %s, trying an older one",
                      bad, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "", dest)
      print(f"warning: checkpoint step {step} is unreadable ({type(e).__name__}); "
            f"moved to {dest}; falling back to an older checkpoint", flush=True)
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      if os.path.exists(dest):
        shutil.rmtree(dest)
      shutil.move(bad, dest)
      mngr.reload()
  return state, None
