"""Where a compiled step's time goes: GPU kernels from a profiler trace, matched to their
HLO instructions and those to the model code they were traced from."""

from __future__ import annotations

import collections
import json
import os
import re
from typing import Any, Callable

import jax


def _short_op_name(name: str) -> str:
  """`jit(step)/transpose(jvp(LM))/while/body/closed_call/layers/attn/f_proj/mul` ->
  `bwd:LM/layers/attn/f_proj/mul` (`eval_jaxpr` in a path = remat recomputation)."""
  bwd = "transpose(" in name
  parts = []
  for p in name.split("/"):
    if p.startswith("jit("):
      continue
    while p.startswith(("transpose(", "jvp(", "vmap(")) and p.endswith(")"):
      p = p[p.index("(") + 1:-1]
    if p not in ("while", "body", "closed_call", "cond", "checkpoint", "remat",
                 "rematted_computation"):
      parts.append(p)
  return ("bwd:" if bwd else "fwd:") + "/".join(parts)


def _hlo_name(name: str) -> str:
  """An HLO instruction or kernel name as `hlo_sources` keys it (`[A-Za-z0-9_]` only)."""
  return re.sub(r"[^A-Za-z0-9_]", "_", name)


def hlo_sources(hlo_text: str) -> dict[str, dict]:
  """Per HLO instruction (name normalised to `[A-Za-z0-9_]`): its opcode, shape and the
  JAX op names (module path + primitive, by count) of everything it runs — a fusion's
  names are those of the instructions inside its fused computation. `transpose(...)`
  in a name marks backward-pass work."""
  comp_lines: dict[str, collections.Counter] = {}
  insts: dict[str, dict] = {}
  comp = None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and not line.startswith(" "):
      comp = head.group(1)
      comp_lines[comp] = collections.Counter()
      continue
    m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\(", line)
    if not m or comp is None:
      continue
    name, shape, op = m.groups()
    src = re.search(r'op_name="([^"]*)"', line)
    where = _short_op_name(src.group(1)) if src else None
    if where and not where.endswith(":"):
      comp_lines[comp][where] += 1
    calls = re.search(r"calls=%?([\w.\-]+)", line)
    insts[_hlo_name(name)] = {"op": op, "shape": shape[:40], "where": where,
                              "calls": calls.group(1) if calls else None}
  for inst in insts.values():
    lines = comp_lines.get(inst.pop("calls") or "", collections.Counter())
    inst["lines"] = [w for w, _ in lines.most_common(4)] or ([inst["where"]] if inst["where"] else [])
  return insts


def attribute_kernels(events: list[dict], sources: dict[str, dict], steps: int
                      ) -> tuple[dict[str, dict], dict[str, float]]:
  """GPU kernel time per step from trace events: by kernel name (ms, calls, the HLO op and
  shape of its first call, the model code its time went to, most first) and by model
  module. A kernel is matched to its HLO instruction (`hlo_sources`) by the trace's
  `hlo_op` annotation where there is one (library GEMMs and Pallas calls are named after
  their kernel, not the instruction), else by its own name (XLA fusions)."""
  pids = {e["pid"]: e.get("args", {}).get("name", "") for e in events
          if e.get("ph") == "M" and e.get("name") == "process_name"}
  kernels: dict[str, dict] = {}
  by_module: dict[str, float] = collections.defaultdict(float)
  for e in events:
    if e.get("ph") != "X" or "GPU" not in pids.get(e.get("pid"), ""):
      continue
    hlo_op = (e.get("args") or {}).get("hlo_op")
    info = ((sources.get(_hlo_name(hlo_op)) if hlo_op else None)
            or sources.get(_hlo_name(e["name"]), {}))
    ms = e.get("dur", 0.0) / steps / 1e3
    row = kernels.setdefault(e["name"][:60], {"ms": 0.0, "calls": 0, "op": info.get("op"),
                                              "shape": info.get("shape"),
                                              "wheres": collections.Counter()})
    row["ms"] += ms
    row["calls"] += 1
    for line in info.get("lines", []):
      row["wheres"][line] += ms
    where = info.get("where") or "?"
    by_module[where.rsplit("/", 1)[0] if "/" in where else where] += ms
  for row in kernels.values():
    row["lines"] = [w for w, _ in row.pop("wheres").most_common(4)]
  return kernels, dict(by_module)


def trace_kernels(one: Callable[[], Any], compiled, out_dir: str, top: int = 40) -> dict:
  """Traces 3 calls of `one` (the compiled step); `profile_case`'s columns."""
  import glob  # noqa: PLC0415
  import gzip  # noqa: PLC0415
  hlo = compiled.as_text()
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "step.hlo.txt"), "w") as f:
    f.write(hlo)
  sources = hlo_sources(hlo)
  for _ in range(2):
    jax.block_until_ready(one())
  with jax.profiler.trace(out_dir, create_perfetto_trace=True):
    for _ in range(3):
      jax.block_until_ready(one())
  path = sorted(glob.glob(f"{out_dir}/**/perfetto_trace.json.gz", recursive=True))[-1]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  kernels, by_module = attribute_kernels(events, sources, steps=3)
  ranked = sorted(kernels.items(), key=lambda kv: -kv[1]["ms"])
  modules = sorted(by_module.items(), key=lambda kv: -kv[1])
  with open(os.path.join(out_dir, "kernels.json"), "w") as f:
    json.dump({"kernels": ranked, "by_module": modules}, f, indent=1)
  return {"device_ms_per_step": sum(v["ms"] for v in kernels.values()),
          "top_kernels": [(k, round(v["ms"], 2), v["calls"] // 3, v["op"], v["shape"],
                           v["lines"]) for k, v in ranked[:top]],
          "by_module": [(k, round(v, 2)) for k, v in modules[:top]]}
