"""`python -m mmfree_jax.bench.triton_report [--size=1.3B --batch=16] [--patch=JSON]`"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

from absl import flags

from mmfree_jax import cli

# Registers, spills and instruction counts of every Pallas (Triton) kernel in one layer's
# training step, without a GPU: lowers the gradient of a one-layer model of the given size
# for CUDA on this machine, then compiles each kernel's Triton module for sm_90 with the
# `triton` package's own pipeline and `ptxas` (`pip install triton`; its compiler is a
# newer or older Triton than the GPU's jaxlib carries, so the numbers are a proxy: they
# show spills and register pressure, not time). Use it to check a kernel change before
# spending GPU time on it, e.g.
# `--patch='{"mmfree_jax.layers.bitlinear_pallas.BWD_PIECES": 3}'`. Spills removed at the
# price of instructions did not make kernels faster on the GPU (BENCHMARKS.md, "Offline:
# Pallas kernels compiled for sm_90").

_SIZE = flags.DEFINE_string("size", "1.3B", "Model size preset (one layer of it is lowered).")
_BATCH = flags.DEFINE_integer("batch", 16, "Batch size (the kernels' grids and tiles follow it).")
_SEQ = flags.DEFINE_integer("seq_len", 2048, "Sequence length.")
_PATCH = flags.DEFINE_string("patch", "", 'Module attributes to set first, as JSON: '
                                          '{"module.attribute": value}.')

SM = 90  # the H100 / H200


@contextlib.contextmanager
def capturing_modules(check=None):
  """Within the block, every Pallas Triton module lowered is appended to the yielded list as
  (kernel name, its first operand's type, warps, the MLIR module); `check(*entry)` runs on
  each as it is built."""
  from jax._src.pallas.triton import lowering, pallas_call_registration  # noqa: PLC0415

  found, lower = [], lowering.lower_jaxpr_to_triton_module

  def keep(*args, **kwargs):
    result = lower(*args, **kwargs)
    # The caller (Pallas' Triton lowering rule) holds the kernel's operands and warps.
    caller = sys._getframe(1).f_locals  # noqa: SLF001
    ctx = caller.get("ctx")
    entry = (result.module.operation.attributes["sym_name"].value,
             ctx.avals_in[0].str_short() if ctx else None, caller.get("num_warps"), result.module)
    if check:
      check(*entry)
    found.append(entry)
    return result

  pallas_call_registration.lowering.lower_jaxpr_to_triton_module = keep
  try:
    yield found
  finally:
    pallas_call_registration.lowering.lower_jaxpr_to_triton_module = lower


def triton_modules(cfg, batch: int, seq_len: int) -> list[tuple[str, str, int, str]]:
  """(kernel name, its first operand's type, warps, Triton IR text) of every Pallas kernel
  in the gradient of the model `cfg`'s loss, in lowering order, lowered for CUDA on
  whatever machine this is."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from mmfree_jax.models import LM  # noqa: PLC0415
  from mmfree_jax.train.step import loss_sums  # noqa: PLC0415

  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  batch_spec = {"inputs": tokens, "targets": tokens,
                "weights": jax.ShapeDtypeStruct((batch, seq_len), jnp.float32)}
  params = jax.eval_shape(lambda: LM(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  grad = jax.grad(lambda p, b: loss_sums(cfg, p, b)[0])
  with capturing_modules() as found:
    try:
      jax.jit(grad).trace(params["params"], batch_spec).lower(lowering_platforms=("cuda",))
    except RuntimeError as e:  # jax >= 0.11 reads the GPU's model while lowering
      if "No supported GPU devices found" not in str(e):
        raise
      raise SystemExit("triton_report: this jax lowers Pallas Triton kernels only with a GPU "
                       "present; run it with the jax of requirements.txt") from None
  return [(name, operand, warps, str(module)) for name, operand, warps, module in found]


def resources(ttir: str, warps: int, sm: int = SM) -> dict:
  """ptxas's registers and spill bytes per thread and the SASS instruction count (with a
  count per opcode, and in its largest loop) of one Triton module compiled for `sm` by the
  `triton` package."""
  try:
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
  except ImportError:
    raise SystemExit("triton_report: needs the `triton` package (pip install triton); "
                     "it compiles for the GPU without one") from None
  tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
  with tempfile.TemporaryDirectory() as d:
    src, ptx, cubin = (os.path.join(d, f"kernel.{ext}") for ext in ("ttir", "ptx", "cubin"))
    with open(src, "w") as f:
      f.write(ttir)
    compiled = triton.compile(src, target=GPUTarget("cuda", sm, 32),
                              options={"num_warps": warps, "num_stages": 1})
    with open(ptx, "w") as f:
      f.write(compiled.asm["ptx"])
    log = subprocess.run([os.path.join(tools, "ptxas"), "-v", f"--gpu-name=sm_{sm}a", ptx,
                          "-o", cubin], capture_output=True, text=True, check=True).stderr
    sass = subprocess.run([os.path.join(tools, "nvdisasm"), "-c", cubin], capture_output=True,
                          text=True, check=True).stdout
  spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
  ops = collections.Counter(re.findall(_OPCODE, sass))
  return {"registers": int(re.search(r"Used (\d+) registers", log).group(1)),
          "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2)),
          "instructions": sum(ops.values()), "loop_instructions": _largest_loop(sass),
          "opcodes": dict(ops)}


_OPCODE = r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)"


def _largest_loop(sass: str) -> int:
  """Instructions in the largest span from a label to a branch back to it (a kernel's row
  or time loop: what runs once per iteration); 0 without a loop."""
  labels, order, pending = {}, [], []
  for line in sass.splitlines():
    if m := re.match(r"\s*\.(L_x_\d+):", line):
      pending.append(m.group(1))
    elif re.search(_OPCODE, line):
      for name in pending:
        labels[name] = len(order)
      pending = []
      order.append(line)
  spans = [i - labels[m.group(1)] + 1 for i, line in enumerate(order)
           if (m := re.search(r"\bBRA\b.*?\.(L_x_\d+)", line)) and labels.get(m.group(1), i) < i]
  return max(spans, default=0)


def main(argv):
  del argv
  from mmfree_jax.bench import patch_attributes  # noqa: PLC0415
  from mmfree_jax.config import preset  # noqa: PLC0415

  patch_attributes(json.loads(_PATCH.value or "{}"), "--patch")
  cfg = preset(_SIZE.value, "mmfree", n_layers=1)
  print(f"{_SIZE.value} (one layer), batch {_BATCH.value} x {_SEQ.value}, sm_{SM}"
        + (f", patch {_PATCH.value}" if _PATCH.value else ""), flush=True)
  print("| # | kernel | first operand | warps | registers | spill bytes (st/ld) | instructions "
        "| in its loop | LDG | STG | MUFU | BAR |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for i, (name, operand, warps, ttir) in enumerate(triton_modules(cfg, _BATCH.value, _SEQ.value), 1):
    r = resources(ttir, warps)
    ops = r["opcodes"]
    print(f"| {i} | {name} | {operand} | {warps} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} "
          f"| {r['instructions']} | {r['loop_instructions'] or ''} | {ops.get('LDG', 0)} | {ops.get('STG', 0)} "
          f"| {ops.get('MUFU', 0)} | {ops.get('BAR', 0)} |", flush=True)


if __name__ == "__main__":
  cli.run(main, absl_flags=True)
