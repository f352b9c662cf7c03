"""AOT fit check: TPU topologies from this CPU host (libtpu), GPU targets on CPU devices."""

import importlib.util
import os
import subprocess
import sys

import jax
import pytest

from experiments import tiny
from mmfree_jax import aot, hlo_stats
from mmfree_jax.config import ConfigError
from mmfree_jax.train import setup
from mmfree_jax.train.optim import make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu absent: pip install -r requirements-tpu.txt")
TINY = ["--config=experiments/tiny.py", "--config.model.preset=micro", "--config.model.d_model=32",
        "--config.data.seq_len=32", "--config.train.batch_size=8"]
# 15B params on one device: does not fit any single chip.
HUGE = ["--config=experiments/tiny.py", "--config.model.d_model=32768", "--config.model.n_layers=1",
        "--config.data.seq_len=32", "--config.train.batch_size=8"]


def small(**model):
  c = tiny.get_config()
  c.model.update({"preset": "micro", "d_model": 32, "n_layers": 2, **model})
  c.data.seq_len, c.train.batch_size = 32, 8
  return c


def cli(*args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-m", "mmfree_jax.aot", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
  return out.returncode, out.stdout, out.stderr


@pytest.mark.parametrize("name,topo,chips", [
    ("v5p-32", "v5p:2x2x4", 16), ("v5p-8", "v5p:2x2x1", 4), ("v4-64", "v4:2x4x4", 32),
    ("v4-128", "v4:4x4x4", 64), ("v5e-16", "v5e:4x4", 16), ("v5litepod-8", "v5e:2x4", 8),
    ("v5e-1", "v5e:1x1", 1), ("v6e-256", "v6e:16x16", 256), ("v5e:4x8", "v5e:4x8", 32),
    ("v5p:2x2x2", "v5p:2x2x2", 8),
])
def test_topology_names(name, topo, chips):
  t = aot.parse_topology(name)
  assert (t.name, t.chips) == (topo, chips)


@pytest.mark.parametrize("name", ["v5p-33", "h100-8", "v5e:4x4x4", "v5p:4x4", "v4-2"])
def test_bad_topology_names(name):
  with pytest.raises(ConfigError):
    aot.parse_topology(name)


def test_optimizer_moments_are_sharded_like_params():
  c = small()
  c.mesh.data, c.mesh.fsdp = 2, 4
  mesh = aot.multihost.make_mesh(c.mesh.to_dict(), jax.devices())
  tx, _ = make_optimizer(c, 10)
  state, _ = aot.abstract_train_inputs(c, setup.model_config(c), tx, mesh)
  k = state.params["layers"]["mlp"]["gate_proj"]["kernel"].sharding
  mu = state.opt_state[1].mu["layers"]["mlp"]["gate_proj"]["kernel"].sharding
  assert k.spec == mu.spec and "fsdp" in str(k.spec)
  assert state.opt_state[1].count.sharding.spec == jax.sharding.PartitionSpec()


def test_gpu_target_absurd_config_does_not_fit():
  big = small(d_model=16384, n_layers=1)  # 4.3B params on one card
  r = aot.check(big, jax.devices()[:1], aot.GPUS["l4"].hbm_gib * aot.GIB)
  assert not r.fits and r.total > 22 * aot.GIB  # 3 x 4 bytes x 8.4B params alone
  text = aot.format_report(big, "l4 x 1", aot.GPUS["l4"], 1, r, 0.4)
  assert text.splitlines()[-1].startswith("DOES NOT FIT: ") and "of 22.00 GiB" in text


def test_cli_gpu_target():
  rc, out, err = cli(*TINY, "--target=h200", "--devices=4")
  assert rc == 0, err
  assert "h200 x 4 (estimated on CPU)" in out and "(0.9 of 139.8 GiB)" in out
  assert "compiled for cpu: " in out and "0 of them int8 x int8; Pallas kernels: none" in out
  assert "mesh data=4 fsdp=1 tensor=1" in out and out.splitlines()[-1].startswith("FITS: ")
  mem = out.split("per-device memory (GiB): ")[1].splitlines()[0]
  assert float(mem.split("total ")[1]) > 0


def test_cli_cudnn_for_a_cpu_compile_is_one_line_exit_2():
  """GPU targets compile on CPU devices, where cuDNN does not exist: an explicit request is
  refused before compiling, not swapped for another attention."""
  rc, out, err = cli(*TINY, "--config.model.arch=transformer", "--config.model.attention_impl=cudnn",
                     "--target=h200", "--devices=2")
  assert rc == 2 and not out and err.strip().count("\n") == 0, err
  assert err.startswith("error: model.attention_impl='cudnn' runs only on CUDA GPUs, not on cpu")


def test_cli_bad_input_is_one_line_exit_2():
  rc, out, err = cli(*TINY, "--topology=v9-8")
  assert rc == 2 and not out and err.startswith("error: ") and "not a TPU topology" in err, err
  assert err.strip().count("\n") == 0


@pytest.mark.parametrize("kw,match", [
    ({"topology": "v5e-4", "target": "h200"}, "exactly one of"),
    ({}, "exactly one of"),
    ({"target": "h200"}, "--devices=N"),
    ({"target": "k80", "devices": 1}, "unknown"),
    ({"target": "h200", "devices": 1, "mem_fraction": 1.5}, "mem_fraction"),
    ({"topology": "v5e-4", "num_slices": 0}, "num_slices"),
    ({"target": "h200", "devices": 64}, "only 8 CPU devices"),
])
def test_target_errors(kw, match):
  with pytest.raises(ConfigError, match=match):
    aot.resolve_target(**kw)


@needs_libtpu
def test_tpu_fit_and_multislice_data_axis():
  topo = aot.parse_topology("v5e-4")
  r = aot.check(small(), aot.tpu_devices(topo), topo.chip.hbm_gib * aot.GIB)
  assert r.fits and r.mesh == {"data": 4, "fsdp": 1, "tensor": 1} and r.memory["peak"] > 0
  c = small()
  c.mesh.data, c.mesh.fsdp = -1, 2
  devices = aot.tpu_devices(topo, num_slices=2)
  mesh = aot.multihost.make_mesh(c.mesh.to_dict(), devices)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  slices = [{d.slice_index for d in row.flat} for row in mesh.devices]
  assert slices == [{0}, {0}, {1}, {1}]  # data spans the slices; fsdp stays inside one
  assert aot.check(c, devices, topo.chip.hbm_gib * aot.GIB).fits


@needs_libtpu
def test_tpu_cli_does_not_fit_is_one_clear_line():
  rc, out, err = cli(*HUGE, "--topology=v5e-1")
  assert rc == 1, err
  last = out.splitlines()[-1]
  assert last.startswith("DOES NOT FIT: the step needs ") and "15.75 GiB of HBM" in last, out
  assert "RESOURCE_EXHAUSTED" in last and "Traceback" not in err


# A loop of 8 / 2 = 4 iterations around a [4, 8] x [8, 8] matmul, then an int8 matmul and a
# padded convolution as XLA:TPU writes a windowed matmul (each output position overlaps one
# of the two kernel taps): 2 x 128 x 2048 x 1024 x 2 multiply-adds.
HLO = """
%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %two = s32[] constant(2)
  %next = s32[] add(%i, %two)
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %w = f32[8,8]{1,0} constant({...})
  %y = f32[4,8]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%next, %y)
}

%cond (p.1: (s32[], f32[4,8])) -> pred[] {
  %p.1 = (s32[], f32[4,8]{1,0}) parameter(0)
  %n = s32[]{:T(128)} constant(8)
  %j = s32[] get-tuple-element(%p.1), index=0
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

ENTRY %main (x.1: f32[4,8], a: s8[16,32], b: s8[32,8], c: bf16[1024,2,128,1], d: bf16[2,2048,1024,1]) -> f32[4,8] {
  %x.1 = f32[4,8]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4,8]{1,0}) tuple(%zero, %x.1)
  %loop = (s32[], f32[4,8]{1,0}) while(%init), condition=%cond, body=%body
  %a = s8[16,32]{1,0} parameter(1)
  %b = s8[32,8]{1,0} parameter(2)
  %ab = s32[16,8]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %c = bf16[1024,2,128,1]{3,2,1,0:T(8,128)(2,1)} parameter(3)
  %d = bf16[2,2048,1024,1]{3,2,1,0:T(8,128)(2,1)} parameter(4)
  %conv = bf16[2,128,2,2048]{3,1,2,0:T(8,128)(2,1)} convolution(%c, %d), window={size=1x2 pad=0_0x1_1 rhs_reversal=0x1}, dim_labels=f0b1_1oi0->0b1f
  ROOT %out = f32[4,8]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_matmuls_of_hlo_text_count_loop_trips_int8_and_padded_convolutions():
  m = hlo_stats.matmuls(HLO)
  loop, int8, conv = 4 * 2 * 4 * 8 * 8, 2 * 16 * 32 * 8, 2 * 128 * 2048 * 1024 * 2 * 2
  assert (m.count, m.int8_count) == (3, 1)
  assert (m.flops, m.int8_flops) == (loop + int8 + conv, int8)
  chip = aot.TPUS["v6e"]
  assert m.seconds(chip) == (loop + conv) / chip.peak_flops + int8 / chip.int8_peak


def test_a_tpu_fit_is_the_compilers_peak():
  """The TPU compiler fails where its peak exceeds HBM, so a compiled TPU program is
  judged by that peak (the total counts buffers that are never live together); XLA:CPU
  reports no peak, so a CPU estimate of a GPU target is judged by the total."""
  mem = {"argument": 1 * aot.GIB, "output": 1 * aot.GIB, "alias": 1 * aot.GIB,
         "temp": 35 * aot.GIB, "code": 0, "peak": 27 * aot.GIB}
  tpu = aot.Report(fits=True, hbm_bytes=31.25 * aot.GIB, mesh={}, platform="tpu", memory=mem)
  assert tpu.used == 27 * aot.GIB and tpu.total == 36 * aot.GIB
  cpu = aot.Report(fits=True, hbm_bytes=0, mesh={}, platform="cpu", memory={**mem, "peak": 0})
  assert cpu.used == 36 * aot.GIB
  oom = aot.Report(fits=False, hbm_bytes=0, mesh={}, platform="tpu", needed=40 * aot.GIB)
  assert oom.used == 40 * aot.GIB


def test_tpu_oom_message_with_the_total_is_one_line():
  msg = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out "
         "of memory in memory space hbm. Used 31.25G of 31.25G hbm. Exceeded hbm capacity by "
         "311.7K.\n\nTotal hbm usage >= 31.50G:\n    reserved        260.01M \n")
  need, line = aot._oom(msg, 31.25 * aot.GIB)
  assert need == 31.5 * aot.GIB
  assert line == ("the step needs 31.50 GiB in all per device but the chip has 31.25 GiB of HBM "
                  "(XLA RESOURCE_EXHAUSTED)")


def test_compiled_matmuls_count_every_layer_of_the_loop():
  """XLA's cost analysis counts the layer loop's body once; `matmuls` counts it per layer:
  the scanned step's matmul FLOPs equal the unrolled step's, the most of the FLOPs XLA's
  cost analysis counts in the unrolled step (the rest: elementwise work)."""
  kw, hbm = dict(n_layers=3, d_model=64, vocab_size=256), 100 * aot.GIB
  scanned = aot.check(small(**kw), jax.devices()[:1], hbm)
  unrolled = aot.check(small(**kw, unroll_layers=True), jax.devices()[:1], hbm)
  assert scanned.matmuls.flops == unrolled.matmuls.flops > 0
  assert scanned.cost["flops"] < 0.5 * unrolled.cost["flops"]
  assert 0.8 < unrolled.matmuls.flops / unrolled.cost["flops"] <= 1.0  # 0.88 (d=64)


@needs_libtpu
def test_tpu_transformer_compiles_the_splash_kernel():
  c = small(arch="transformer")
  c.data.seq_len = 128
  topo = aot.parse_topology("v5e-4")
  r = aot.check(c, aot.tpu_devices(topo), topo.chip.hbm_gib * aot.GIB)
  assert r.fits and r.attention == "splash"
  assert {"splash_mha_fwd_segmented_residuals", "splash_mha_dq_segmented_no_residuals",
          "splash_mha_dkv_segmented_no_residuals"} == set(r.kernels)
  text = aot.format_report(c, "v5e-4", topo.chip, topo.chips, r, 0.4)
  assert "compiled for tpu: attention splash (model.attention_impl=auto); " in text


@needs_libtpu
@pytest.mark.parametrize("topology", ["v5e-4", "v6e-4"])
def test_tpu_bitlinear_matmuls_are_int8(topology):
  """The optimized TPU program multiplies the BitLinear codes as s8 x s8 (each forward
  matmul of a layer: i|f|g, o, gate|up, down); the LM head stays in the compute dtype."""
  c = small(dtype="bfloat16")
  topo = aot.parse_topology(topology)
  r = aot.check(c, aot.tpu_devices(topo), topo.chip.hbm_gib * aot.GIB)
  assert r.fits and r.matmuls.int8_count >= 6 and 0 < r.matmuls.int8_flops < r.matmuls.flops
  text = aot.format_report(c, topology, topo.chip, topo.chips, r, 0.4)
  assert "of them int8 x int8; Pallas kernels: none" in text


@needs_libtpu
def test_plan_rows(monkeypatch):
  from experiments import sweeps  # noqa: PLC0415
  c = small(dtype="bfloat16")
  c.mesh.data, c.mesh.fsdp = 1, -1
  monkeypatch.setattr(sweeps, "points", lambda name: [("mmfree-micro", c)])
  header, rule, row = aot.plan(["v6e-4"])
  assert header.count("|") == rule.count("|") == row.count("|")
  cells = [x.strip() for x in row.split("|")[1:-1]]
  assert cells[:4] == ["mmfree-micro", "v6e-4", "1 x 4 x 1", "2"] and cells[5] == "FITS"
  assert cells[4].endswith(" / 31.25") and "int8 matmuls" in cells[6] and float(cells[7]) >= 0
