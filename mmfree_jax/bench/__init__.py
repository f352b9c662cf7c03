"""Benchmarks: `measure` (timing, GPU clocks, memory, cards), the cases (`kernels`, `steps`,
by kind in `cases`), `profile` (kernel time by model code); CLIs `python -m mmfree_jax.bench`
and `.triton_report`."""

from __future__ import annotations

import importlib


def patch_attributes(patch: dict, flag: str) -> None:
  """Sets module attributes {"module.attribute": value} (a lever that is not the default
  yet, for an A/B); a target that does not exist is an error naming `flag`."""
  for target, value in patch.items():
    module_name, _, attr = target.rpartition(".")
    try:
      module = importlib.import_module(module_name)
    except ImportError:
      module = None
    if not hasattr(module, attr):
      raise ValueError(f"{flag}: patch target {target!r} does not exist; name a module attribute")
    setattr(module, attr, value)
