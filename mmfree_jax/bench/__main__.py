"""`python -m mmfree_jax.bench [--suite=gpu|quick] [--only=train,scan] [--out=DIR]`

Runs every benchmark case in its own process (clean peak-memory readings), prints one
table per kind and writes `bench.json` + `bench.md` under --out. `quick` is a CPU smoke
run of the same code on tiny shapes. Cases run with the trainer's GPU allocator settings
(`train.memory.allocator_env`: 0.95 of the card preallocated, unless the environment sets
its own); a train step that does not fit is a one-line error row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import flags

from mmfree_jax import cli

_SUITE = flags.DEFINE_enum("suite", "gpu", ["gpu", "quick"], "Which case list to run.")
_ONLY = flags.DEFINE_list("only", [], "Case kinds to run (bitlinear, bitlinear_bwd, gemm, "
                                      "recurrence, gates, train, decode, profile).")
_FILTER = flags.DEFINE_string("filter", "", "Run only cases whose JSON spec contains this substring.")
_OUT = flags.DEFINE_string("out", "", "Directory for bench.json / bench.md.")
_ONE = flags.DEFINE_string("one", "", "Run one case given as JSON (e.g. a kernel tile), print JSON.")
_TIMEOUT = flags.DEFINE_integer("case_timeout", 300, "Seconds per case before it is abandoned.")


def suite(name: str) -> list[dict]:
  if name == "quick":
    return ([{"kind": "bitlinear", "variant": v, "d": 128, "tokens": 256, "iters": 3}
             for v in ("lean", "naive")]
            + [{"kind": kind, "k": 96, "n": n, "form": f, "tokens": 64, "iters": 2}
               for kind in ("bitlinear_codes", "bitlinear_bwd")
               for n, f in ((3, "x"), (1, "glu"), (1, "gate"))]
            + [{"kind": "gemm", "m": 64, "k": 96, "n": 32, "operands": o, "iters": 2}
               for o in ("bf16", "int8")]
            + [{"kind": "recurrence", "impl": i, "b": 2, "t": 64, "d": 32, "iters": 3}
               for i in ("sequential", "associative", "chunked", "pallas")]
            + [{"kind": "gates", "fused": f, "b": 2, "t": 64, "d": 32, "iters": 3}
               for f in (True, False)]
            + [{"kind": "train", "arch": a, "size": "micro", "batch": 2, "seq_len": 32,
                "remat": r, "iters": 2, "dtype": "float32"}
               for a in ("mmfree", "transformer") for r in ("lean", "full", "auto")]
            + [{"kind": "decode", "arch": a, "size": "micro", "batch": 2, "prompt": 16, "new": 16,
                "iters": 1} for a in ("mmfree", "transformer")])
  cases = [{"kind": "bitlinear", "variant": v, "d": d, "impl": i}
           for d in (1024, 2048) for v, i in (("lean", "pallas"), ("lean", "xla"), ("naive", "xla"))]
  # The backward kernel per group shape of the 1.3B model (f/i/g, one projection, GLU down,
  # o_proj with the MLGRU's gate); add "rows"/"warps" to a spec (--one) to sweep the tile.
  cases += [{"kind": "bitlinear_bwd", "k": k, "n": n, "form": f}
            for k, n, f in ((2048, 3, "x"), (2048, 1, "x"), (5632, 1, "glu"), (2048, 1, "gate"))]
  cases += [{"kind": "bitlinear_codes", "k": 2048, "n": 1, "form": f} for f in ("x", "gate")]
  # The forward matmuls of the 1.3B model (f/i/g/o, GLU gate+up, GLU down) at batch 8 and 16.
  for m in (16384, 32768):
    for k, n in ((2048, 2048), (2048, 11264), (5632, 2048)):
      cases += [{"kind": "gemm", "m": m, "k": k, "n": n, "operands": o, "epilogue": e}
                for o, e in (("bf16", True), ("int8", True), ("int8", False))]
  for shape in ((8, 2048, 1024), (16, 2048, 2048)):
    for impl in ("pallas", "associative"):
      cases.append({"kind": "recurrence", "impl": impl, "b": shape[0], "t": shape[1],
                    "d": shape[2]})
    for chunk in (8, 16):
      cases.append({"kind": "recurrence", "impl": "chunked", "chunk": chunk, "b": shape[0],
                    "t": shape[1], "d": shape[2]})
  cases.append({"kind": "recurrence", "impl": "sequential", "b": 8, "t": 2048, "d": 1024, "iters": 3})
  # At the small shape "pallas" runs the time-chunked kernels; the whole-sequence ones beside them.
  cases.append({"kind": "recurrence", "impl": "pallas", "b": 8, "t": 2048, "d": 1024,
                "kernel": {"block_d": 32}})
  # The MLGRU's recurrence from its projections at the 1.3B shapes: gate kernels vs two steps.
  cases += [{"kind": "gates", "fused": f, "b": b, "t": 2048, "d": 2048}
            for b in (8, 16) for f in (True, False)]
  xla = {"scan_impl": "associative", "bitlinear_impl": "xla"}  # the pure-XLA model, for reference
  cases.append({"kind": "train", "arch": "mmfree", "size": "370M", "batch": 8, "remat": "lean", **xla})
  for size in ("370M", "1.3B"):
    for batch in (8, 16):
      for unroll in (False, True):  # the layer loop, and straight-line blocks (fastest)
        cases.append({"kind": "train", "arch": "mmfree", "size": size, "batch": batch,
                      "remat": "lean", **({"unroll_layers": True} if unroll else {})})
      if size == "1.3B":  # "lean" plus each projection group's input: more memory, less recompute
        cases.append({"kind": "train", "arch": "mmfree", "size": size, "batch": batch,
                      "remat": "lean_inputs", "unroll_layers": True})
    cases.append({"kind": "train", "arch": "mmfree", "size": size, "batch": 16, "remat": "full"})
    if size == "370M":  # at 1.3B, keeping everything does not fit
      cases.append({"kind": "train", "arch": "mmfree", "size": size, "batch": 16, "remat": "none"})
    for batch in (8, 16):
      cases.append({"kind": "train", "arch": "transformer", "size": size, "batch": batch,
                    "attention_impl": "cudnn"})
  # The trainer's default layout (`model.remat="auto"`: the fastest that fits this card) for
  # every preset at batch 8 and 16.
  cases += [{"kind": "train", "arch": "mmfree", "size": size, "batch": batch, "remat": "auto"}
            for size in ("370M", "1.3B", "2.7B") for batch in (8, 16)]
  for arch in ("mmfree", "transformer"):
    for batch, prompt in ((1, 128), (1, 2048), (16, 128)):
      cases.append({"kind": "decode", "arch": arch, "size": "370M", "batch": batch, "prompt": prompt})
    cases.append({"kind": "decode", "arch": arch, "size": "1.3B", "batch": 1, "prompt": 128})
  cases.append({"kind": "decode", "arch": "mmfree", "size": "370M", "batch": 1, "prompt": 128,
                "packed": True})
  cases.append({"kind": "profile", "arch": "mmfree", "size": "370M", "batch": 8})
  return cases


def _run_one(spec: dict) -> dict:
  """Runs one case; a spec's "patch" ({"module.attribute": value}) sets module attributes
  first (a lever that is not the default yet, for an A/B) and tags the case name."""
  from mmfree_jax.bench import cases, patch_attributes  # noqa: PLC0415 (imports jax)
  spec = dict(spec)
  patch = spec.pop("patch", {})
  patch_attributes(patch, "--one")
  row = cases.CASES[spec.pop("kind")](**spec)
  if patch:
    row["case"] += "".join(f"-{t.rpartition('.')[2]}={v}" for t, v in patch.items())
  return row


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
  return "" if v is None else str(v)


def table(rows: list[dict]) -> str:
  cols: list[str] = []
  for r in rows:
    cols += [k for k in r if k not in cols]
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
  return "\n".join(lines)


def main(argv):
  del argv
  from mmfree_jax.train import memory  # noqa: PLC0415 (imports jax, creates no backend)
  if _ONE.value:
    memory.set_allocator_defaults()
    print("RESULT " + json.dumps(_run_one(json.loads(_ONE.value))), flush=True)
    return
  case_env = memory.allocator_env(os.environ)
  # This process only reads the device's name; its memory belongs to the cases.
  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  import jax  # noqa: PLC0415
  header = f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})"
  print(header, flush=True)
  results = []
  for spec in suite(_SUITE.value):
    if (_ONLY.value and spec["kind"] not in _ONLY.value) or _FILTER.value not in json.dumps(spec):
      continue
    cmd = [sys.executable, "-m", "mmfree_jax.bench", f"--one={json.dumps(spec)}"]
    try:
      out = subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT.value,
                           env=case_env)
      line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
      row = json.loads(line[-1][7:]) if line else {
          "case": json.dumps(spec), "error": (out.stderr.strip().splitlines() or ["?"])[-1][:200]}
    except subprocess.TimeoutExpired:
      row = {"case": json.dumps(spec), "error": f"timeout {_TIMEOUT.value}s"}
    results.append(row)
    print(json.dumps(row), flush=True)
  groups: dict[str, list[dict]] = {}
  for r in results:
    groups.setdefault(r["case"].split("-")[0] if "error" not in r else "errors", []).append(r)
  md = "\n\n".join(f"### {k}\n\n{table(v)}" for k, v in groups.items())
  print("\n" + header + "\n\n" + md)
  if _OUT.value:
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "bench.json"), "w") as f:
      json.dump({"header": header, "results": results}, f, indent=1)
    with open(os.path.join(_OUT.value, "bench.md"), "w") as f:
      f.write(header + "\n\n" + md + "\n")


if __name__ == "__main__":
  cli.run(main, absl_flags=True)
