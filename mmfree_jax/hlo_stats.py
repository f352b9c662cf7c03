"""What a compiled program holds, read from its optimized HLO text: its matmuls (each loop
body times its trip count, int8 or not) and the Pallas kernels it calls."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import NamedTuple


@dataclasses.dataclass(frozen=True)
class Matmuls:
  """A compiled step's matmuls on one device, each loop body counted its trip count times."""
  flops: float = 0.0       # all matmuls
  int8_flops: float = 0.0  # those with int8 x int8 operands
  count: int = 0           # matmul instructions in the program (each once)
  int8_count: int = 0

  def seconds(self, chip) -> float:
    """At a chip's bf16 and int8 peaks (`aot.Chip`): the step's compute-bound lower bound."""
    return (self.flops - self.int8_flops) / chip.peak_flops + self.int8_flops / chip.int8_peak


def _close(s: str, i: int) -> int:
  """The index of the parenthesis closing the one at s[i]."""
  depth = 0
  for j in range(i, len(s)):
    depth += {"(": 1, ")": -1}.get(s[j], 0)
    if depth == 0:
      return j
  return len(s)


class _Instr(NamedTuple):
  name: str
  type: str
  op: str
  args: str   # the text inside the op's parentheses
  attrs: str  # the text after them

  @property
  def operands(self) -> list[str]:
    return re.findall(r"%([\w.\-]+)", self.args)


class _Computation(dict):
  """{instruction name: _Instr} of one HLO computation, in text order, and its root."""
  root: _Instr | None = None


def _hlo_computations(hlo: str) -> dict[str, _Computation]:
  """HLO text -> {computation name: _Computation}, in text order (ENTRY last)."""
  comps: dict[str, _Computation] = {}
  comp = None
  for line in hlo.splitlines():
    if line.endswith("{") and not line.startswith(" "):
      comp = comps.setdefault(line.split()[line.startswith("ENTRY")].lstrip("%"), _Computation())
    elif comp is not None and (m := re.match(r"\s*(ROOT )?%(\S+) = ", line)):
      rest = line[m.end():]
      j = _close(rest, 0) + 1 if rest.startswith("(") else rest.index(" ")
      typ, rest = rest[:j], rest[j:].lstrip()
      op, _, rest = rest.partition("(")
      k = _close("(" + rest, 0)
      comp[m.group(2)] = instr = _Instr(m.group(2), typ, op, rest[:k - 1], rest[k:])
      if m.group(1):
        comp.root = instr
  return comps


def _shape(typ: str) -> tuple[str, list[int]]:
  """"bf16[2,128]{1,0}" -> ("bf16", [2, 128]); a tuple's first element."""
  m = re.search(r"([a-z][a-z0-9]*)\[([\d,]*)\]", typ)
  return (m.group(1), [int(d) for d in m.group(2).split(",") if d]) if m else ("", [])


def _scalar(comp: _Computation, name: str) -> int | None:
  """The integer an instruction holds (a constant, through copies); None if computed."""
  while (i := comp.get(name)) and i.op in ("copy", "bitcast", "convert"):
    name = i.operands[0]
  return int(i.args) if i and i.op == "constant" and i.args.lstrip("-").isdigit() else None


def _tuple_index(comp: _Computation, name: str) -> int | None:
  i = comp.get(name)
  m = i and i.op == "get-tuple-element" and re.search(r"index=(\d+)", i.attrs)
  return int(m.group(1)) if m else None


def _trip_count(comps: dict[str, _Computation], caller: _Computation, loop: _Instr) -> int:
  """A while loop's trip count: XLA's `known_trip_count` (CPU, GPU), else (TPU) that of a
  counted loop, (bound - start) / step from its condition's compare, its initial tuple and
  its body's increment; 1 where the loop is not one."""
  if known := re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs):
    return int(known.group(1))
  cond = comps[re.search(r"condition=%([\w.\-]+)", loop.attrs).group(1)]
  body = comps[re.search(r"body=%([\w.\-]+)", loop.attrs).group(1)]
  cmp, init = cond.root, caller.get(loop.operands[0])
  less = cmp and cmp.op == "compare" and re.search(r"direction=(LT|LE)", cmp.attrs)
  if not less or not init or init.op != "tuple" or not body.root or body.root.op != "tuple":
    return 1
  index, bound = _tuple_index(cond, cmp.operands[0]), _scalar(cond, cmp.operands[1])
  if index is None or bound is None:
    return 1
  start = _scalar(caller, init.operands[index]) or 0
  nxt = body.get(body.root.operands[index])
  steps = [_scalar(body, o) for o in nxt.operands] if nxt and nxt.op == "add" else []
  step = next((v for v in steps if v), 1)
  return max(1, -(-(bound + (less.group(1) == "LE") - start) // step))


def _conv_macs(lhs: list[int], rhs: list[int], out: list[int], attrs: str) -> int:
  """Multiply-adds of an HLO convolution (XLA:TPU writes matmuls as convolutions whose
  spatial dimensions may be padded): batch x output features x input features x, per
  spatial dimension, the (output, kernel) position pairs that land inside the input."""
  ll, rl, ol = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs).groups()
  w = re.search(r"window=\{([^}]*)\}", attrs)
  window = dict(re.findall(r"(\w+)=([\w-]+)", w.group(1))) if w else {}
  macs = out[ol.index("b")] * out[ol.index("f")] * rhs[rl.index("i")]
  for d in sorted(c for c in ll if c.isdigit()):
    n = int(d)
    get = lambda key, default: int(window[key].split("x")[n]) if key in window else default
    pad = int(window["pad"].split("x")[n].split("_")[0]) if "pad" in window else 0
    size, dil, stride = lhs[ll.index(d)], get("lhs_dilate", 1), get("stride", 1)
    macs *= sum(0 <= p <= (size - 1) * dil and p % dil == 0
                for o in range(out[ol.index(d)]) for k in range(rhs[rl.index(d)])
                for p in [o * stride + k * get("rhs_dilate", 1) - pad])
  return macs


def matmuls(hlo: str) -> Matmuls:
  """The dot / convolution FLOPs of a compiled program's HLO text, each while-loop body
  times its trip count (XLA's cost analysis counts it once)."""
  comps = _hlo_computations(hlo)
  runs = dict.fromkeys(comps, 0)
  runs[next(reversed(comps))] = 1  # ENTRY is last: callers come after their callees
  for name in reversed(comps):
    for i in comps[name].values():
      trip = _trip_count(comps, comps[name], i) if i.op == "while" else 1
      for callee in set(re.findall(r"%([\w.\-]+)", i.attrs)) & set(comps):
        runs[callee] += runs[name] * trip
  out = Matmuls()
  for name, comp in comps.items():
    for i in comp.values():
      if i.op not in ("dot", "convolution"):
        continue
      (lt, ld), (rt, rd) = (_shape(comp[o].type) for o in i.operands[:2])
      od = _shape(i.type)[1]
      if i.op == "dot":
        dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i.attrs).group(1)
        macs = math.prod(od) * math.prod(ld[int(d)] for d in dims.split(",") if d)
      else:
        macs = _conv_macs(ld, rd, od, i.attrs)
      f = 2.0 * macs * runs[name]
      int8 = lt in ("s8", "u8") and rt in ("s8", "u8")
      out = Matmuls(out.flops + f, out.int8_flops + f * int8, out.count + 1, out.int8_count + int8)
  return out


def pallas_kernels(hlo: str) -> list[str]:
  """The Pallas kernels a compiled program calls (TPU Mosaic or GPU Triton custom calls,
  named after the kernel)."""
  calls = re.finditer(r'%(\S+) = .* custom-call\(.*custom_call_target="(?:tpu_custom_call|'
                      r'__gpu\$xla\.gpu\.triton|mosaic_gpu\w*)"', hlo)
  return sorted({re.sub(r"(\.\d+)+$", "", m.group(1)) for m in calls})
