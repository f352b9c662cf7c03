"""A sweep: its file (`get_config(name)`, `get_sweep(name)`), point selection and overrides."""

from __future__ import annotations

import ast
import dataclasses
import fnmatch
import importlib.util
import os
from typing import Any, Sequence

import ml_collections

from mmfree_jax import cli


class SweepError(ValueError):
  """A bad sweep spec, point selection or override; the message says how to fix it."""


@dataclasses.dataclass
class Sweep:
  file: str           # absolute path of the sweep file
  name: str           # the sweep's name inside the file
  base: ml_collections.ConfigDict
  points: list[tuple[str, dict[str, Any]]]  # (point name, overrides)

  @property
  def spec(self) -> str:
    return f"{self.file}:{self.name}"


def _import_file(path: str):
  cli.import_root(path)  # so `from experiments import base` works
  mod_name = "_sweep_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(mod_name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def load_sweep(spec: str) -> Sweep:
  """`path/to/file.py:name` -> Sweep (SweepError with a one-line message if bad)."""
  path, sep, name = str(spec).rpartition(":")
  if not sep or not path or not name:
    raise SweepError(f"--sweep={spec!r} must look like experiments/sweeps.py:<name>")
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise SweepError(f"sweep file {path!r} does not exist")
  mod = _import_file(path)
  if not hasattr(mod, "get_sweep") or not hasattr(mod, "get_config"):
    raise SweepError(f"{path} must define get_config(name) and get_sweep(name)")
  try:
    overrides = mod.get_sweep(name)
    base = mod.get_config(name)
  except (ValueError, KeyError) as e:
    raise SweepError(f"{path}:{name}: {e}") from None
  points, seen = [], set()
  for i, o in enumerate(overrides):
    o = dict(o)
    pname = str(o.pop("name", "") or _auto_name(o) or f"point{i}")
    if pname in seen:
      raise SweepError(f"sweep {name!r} has two points named {pname!r}")
    if os.sep in pname or pname.startswith("."):
      raise SweepError(f"point name {pname!r} must be a plain directory name")
    seen.add(pname)
    points.append((pname, o))
  sw = Sweep(path, name, base, points)
  for pname, o in points:  # every override must name an existing key
    point_config(sw, pname, o)
  return sw


def _auto_name(o: dict[str, Any]) -> str:
  return "-".join(f"{k.split('.')[-1]}{v}" for k, v in sorted(o.items()))


def parse_sets(sets: Sequence[str]) -> dict[str, Any]:
  """`["train.steps=8", "data.corpus=a.txt"]` -> {"train.steps": 8, "data.corpus": "a.txt"}."""
  out = {}
  for s in sets or ():
    key, eq, val = str(s).partition("=")
    if not eq or "." not in key:
      raise SweepError(f"--set={s!r} must look like section.key=value (e.g. train.steps=100)")
    try:
      out[key.strip()] = ast.literal_eval(val)
    except (ValueError, SyntaxError):
      out[key.strip()] = val
  return out


def _apply(c: ml_collections.ConfigDict, overrides: dict[str, Any], what: str):
  for key, val in overrides.items():
    node, parts = c, key.split(".")
    for p in parts[:-1]:
      if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
        raise SweepError(f"{what}: config has no section {key.rsplit('.', 1)[0]!r}")
      node = node[p]
    if parts[-1] not in node:
      raise SweepError(f"{what}: config has no key {key!r}")
    old = node[parts[-1]]
    if isinstance(old, float) and isinstance(val, int) and not isinstance(val, bool):
      val = float(val)
    if isinstance(old, str) and not isinstance(val, str):
      val = str(val)
    try:
      node[parts[-1]] = val
    except TypeError:
      raise SweepError(f"{what}: {key}={val!r} has the wrong type (the config holds "
                       f"{type(old).__name__})") from None


def point_config(sw: Sweep, name: str, overrides: dict[str, Any] | None = None,
                 sets: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
  """The full config of point `name`: base + its overrides + `sets`."""
  if overrides is None:
    overrides = dict(sw.points)[name]
  c = ml_collections.ConfigDict(sw.base.to_dict())
  _apply(c, overrides, f"point {name!r}")
  _apply(c, sets or {}, "--set")
  return c


def select(sw: Sweep, patterns: str | Sequence[str] | None) -> list[str]:
  """Point names matching comma-separated names or globs (all when empty)."""
  names = [n for n, _ in sw.points]
  if isinstance(patterns, str):
    patterns = [p for p in patterns.split(",")]
  patterns = [p.strip() for p in patterns or () if p.strip()]
  if not patterns:
    return names
  out = []
  for p in patterns:
    hit = [n for n in names if fnmatch.fnmatchcase(n, p)]
    if not hit:
      raise SweepError(f"--points: {p!r} matches no point of {sw.name!r}; points: {names}")
    out += [n for n in hit if n not in out]
  return [n for n in names if n in out]
