"""Benchmark helpers that run on CPU: HLO-to-model attribution and a tiny recurrence case."""

import json
import os
import time

import jax
import jax.numpy as jnp
import pytest

from mmfree_jax import models
from mmfree_jax.bench import kernels, measure, profile, steps


def test_hlo_sources_attribute_instructions_to_model_code():
  def loss(w, x):
    with jax.named_scope("layers"), jax.named_scope("mlp"):
      y = jnp.tanh(x @ w) * 2.0
    return jnp.sum(y ** 2)
  step = jax.jit(jax.grad(loss))
  w, x = jnp.ones((16, 16)), jnp.ones((8, 16))
  src = profile.hlo_sources(step.lower(w, x).compile().as_text())
  ops = {v["op"] for v in src.values()}
  assert "dot" in ops or "fusion" in ops
  wheres = [v["where"] for v in src.values() if v["where"]]
  assert any(w.startswith("fwd:layers/mlp/") for w in wheres)
  assert any(w.startswith("bwd:layers/mlp/") for w in wheres)  # transpose(...) = backward
  assert all(k.replace("_", "").isalnum() for k in src)  # names match trace kernel names
  for v in src.values():
    assert set(v) == {"op", "shape", "where", "lines"}


def test_short_op_name():
  assert profile._short_op_name(
      "jit(step)/transpose(jvp(LM))/while/body/closed_call/layers/attn/f_proj/mul") == (
          "bwd:LM/layers/attn/f_proj/mul")
  assert profile._short_op_name("jit(step)/jvp(LM)/checkpoint/layers/mlp/dot_general") == (
      "fwd:LM/layers/mlp/dot_general")


@pytest.mark.parametrize("card,bw", [(None, 3.3e12), ("H100", 2.5e12)])
def test_recurrence_case_reports_error_against_the_reference(card, bw, monkeypatch):
  """The HBM floor counts the card's own copy bandwidth (the H200's off the known cards)."""
  monkeypatch.setattr(measure, "card", lambda: card)
  row = kernels.recurrence_case("pallas", 2, 16, 32, iters=1)
  assert row["case"] == "scan-pallas-2x16x32"
  assert row["max_err"] < 1e-2 and row["fwd_ms"] > 0 and 0 < row["fwd_hbm_frac"]
  assert row["floor_fwd_ms"] == pytest.approx(3 * 2 * 16 * 32 * 2 / bw * 1e3)


@pytest.mark.parametrize("card", ["H200", "H100", None])
def test_speedup_over_the_official_code_only_on_its_card(card, monkeypatch):
  """The official numbers were measured on an H200: elsewhere a ratio would compare two
  GPUs, so the row keeps their numbers and leaves the speed-up out."""
  monkeypatch.setattr(measure, "card", lambda: card)
  row = measure.vs_official("mmfree", "1.3B", 16, 72_696.0)
  assert row["official_tokens_per_s"] == 48_464 and row["official_peak_GiB"] == 96.5
  assert row["speedup"] == (pytest.approx(1.5) if card == "H200" else None)
  assert measure.vs_official("mmfree", "micro", 2, 1.0) == {}


@pytest.mark.parametrize("fused,kernel", [(True, None), (False, None),
                                          (True, {"block_d": 16, "tile_t": 4})])
def test_gates_case_reports_error_against_the_reference(fused, kernel):
  row = kernels.gates_case(2, 12, 32, fused=fused, kernel=kernel, iters=1)
  want = "gates-" + ("fused" if fused else "two-steps") + ("-block_d16-tile_t4" if kernel else "")
  assert row["case"] == want + "-2x12x32"
  assert row["max_err"] < 2e-2 and row["fwdbwd_ms"] > 0 and 0 < row["fwdbwd_hbm_frac"]
  assert row["floor_fwdbwd_ms"] == pytest.approx(3 * row["floor_fwd_ms"])


def test_train_case_times_and_profiles_one_compiled_step(tmp_path):
  """`profile=True` traces the step it timed: the row has both, and the step's HLO and the
  per-kernel table land in out_dir (on CPU the trace has no GPU kernels to attribute)."""
  row = steps.train_case("mmfree", "micro", 2, "lean_inputs", seq_len=16, iters=1,
                         dtype="float32", profile=True, out_dir=str(tmp_path))
  assert row["case"] == "train-mmfree-micro-b2-lean_inputs-dtype=float32"
  assert row["step_ms"] > 0 and row["tokens_per_s"] == pytest.approx(32e3 / row["step_ms"])
  with open(tmp_path / "kernels.json") as f:
    table = json.load(f)
  assert row["device_ms_per_step"] == sum(v["ms"] for _, v in table["kernels"])
  assert "ENTRY" in (tmp_path / "step.hlo.txt").read_text()


def test_transformer_train_rows_name_their_attention():
  """A Transformer++ row says which attention it timed (XLA's unless "cudnn" was asked)."""
  row = steps.train_case("transformer", "micro", 2, seq_len=16, iters=1, dtype="float32")
  assert row["case"] == "train-transformer-micro-b2-lean-attention=xla-dtype=float32"


def test_train_rows_with_packed_documents_feed_segment_ids(monkeypatch):
  """`docs` > 1 trains on rows of that many documents (the step sees their segment ids),
  names it in the case and leaves out the official numbers (measured without resets)."""
  seen = []
  apply = models.LM.apply
  monkeypatch.setattr(models.LM, "apply", lambda self, v, toks, seg=None, **kw: (
      seen.append(seg), apply(self, v, toks, seg, **kw))[1])
  monkeypatch.setattr(measure, "OFFICIAL", {("transformer", "micro", 2): (1.0, 1.0)})
  row = steps.train_case("transformer", "micro", 2, seq_len=16, iters=1, docs=4)
  assert row["case"] == "train-transformer-micro-b2-lean-attention=xla-docs=4"
  assert "speedup" not in row and "official_tokens_per_s" not in row
  assert seen[0].shape == (2, 16) and seen[0].dtype == jnp.int32  # traced: shape only
  with pytest.raises(ValueError, match="docs=3 must be >= 1 and divide seq_len=16"):
    steps.train_case("transformer", "micro", 2, seq_len=16, iters=1, docs=3)


def test_one_case_can_patch_a_module_attribute_first(monkeypatch):
  """`--one` specs with "patch" set a lever that is not the default (for an A/B) before
  the case runs, and say so in the case name; a patch of nothing is an error."""
  from mmfree_jax.bench.__main__ import _run_one
  from mmfree_jax.layers import mlgru_pallas
  monkeypatch.setattr(mlgru_pallas, "GATE_TILE_T", 8)  # restored after the test
  row = _run_one({"kind": "gates", "b": 2, "t": 12, "d": 32, "iters": 1,
                  "patch": {"mmfree_jax.layers.mlgru_pallas.GATE_TILE_T": 16}})
  assert mlgru_pallas.GATE_TILE_T == 16
  assert row["case"] == "gates-fused-2x12x32-GATE_TILE_T=16"
  for target in ("mmfree_jax.layers.mlgru_pallas.NO_SUCH_LEVER", "mmfree_jax.no_such_module.LEVER"):
    with pytest.raises(ValueError, match="does not exist"):
      _run_one({"kind": "gates", "patch": {target: 1}})


@pytest.mark.parametrize("n,form,tag", [(2, "x", ""), (1, "gate", "-gate")])
def test_bitlinear_bwd_case_runs_the_kernel_and_checks_it(n, form, tag):
  row = kernels.bitlinear_bwd_case(64, n=n, form=form, rows=2, tokens=32, iters=1)
  assert row["case"] == f"bitlinear_bwd-k64-n{n}{tag}-rows2-warpsauto"
  assert row["max_err"] < 2e-2 and row["ms"] > 0 and row["GB_per_s"] > 0


@pytest.mark.parametrize("form", ["x", "glu", "gate"])
def test_bitlinear_codes_case_runs_the_kernel_and_checks_it(form):
  n = 2 if form == "x" else 1
  row = kernels.bitlinear_codes_case(64, n=n, form=form, rows=2, tokens=32, iters=1)
  tag = "" if form == "x" else f"-{form}"
  assert row["case"] == f"bitlinear_codes-k64-n{n}{tag}-rows2-warpsauto"
  assert row["max_err"] < 0.02 and row["ms"] > 0 and row["GB_per_s"] > 0


def test_gemm_case_int8_is_exact_and_the_bf16_results_within_bf16_rounding():
  raw = kernels.gemm_case(64, 96, 32, "int8", epilogue=False, iters=1)
  assert raw["case"] == "gemm-int8-raw-64x96x32" and raw["max_err"] == 0 and raw["ms"] > 0
  for operands in ("int8", "bf16"):  # the bf16 result: within a bf16 rounding of the exact one
    assert 0 < kernels.gemm_case(64, 96, 32, operands, iters=1)["max_err"] <= 2**-8


def test_median_time_groups_fast_calls_and_times_slow_ones_singly():
  """Sub-`group_s` calls run back to back in groups (host dispatch overlaps device work)
  and the result is per call; a call longer than `group_s` is timed alone."""
  calls = []

  def fast():
    calls.append(1)
    return jnp.zeros(())
  t = measure.median_time(fast, iters=3, warmup=1, group_s=0.05)
  reps = (len(calls) - 2) / 3  # warm-up, the sizing call, then 3 groups
  assert reps == int(reps) and reps > 1 and 0 < t < 0.05
  calls.clear()

  def slow():
    calls.append(1)
    time.sleep(0.03)
    return jnp.zeros(())
  t = measure.median_time(slow, iters=3, warmup=1, group_s=0.02)
  assert len(calls) == 5 and 0.03 <= t < 0.3


def test_gpu_sampler_reports_medians_of_nvidia_smi_samples(tmp_path, monkeypatch):
  """Parses nvidia-smi's CSV loop (skipping "[N/A]" and partial lines), stops it on exit."""
  fake = tmp_path / "nvidia-smi"
  fake.write_text("#!/bin/sh\necho '1980, 650.5, 61'\necho '1755, 699.9, 64'\n"
                  "echo '1830, 680.0, 63'\necho '[N/A], 1.0, 2'\necho '1700, 6'\nexec sleep 60\n")
  fake.chmod(0o755)
  monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
  t0 = time.perf_counter()
  with measure.GpuSampler() as gpu:
    time.sleep(0.5)
  assert time.perf_counter() - t0 < 5  # the loop was stopped, not waited for
  assert gpu.summary() == {"sm_MHz": 1830.0, "power_W": 680.0, "temp_C": 63.0}


def test_gpu_sampler_without_nvidia_smi_reports_nothing(monkeypatch):
  monkeypatch.setattr(measure.shutil, "which", lambda name: None)
  with measure.GpuSampler() as gpu:
    pass
  assert gpu.summary() == {}


def test_kernels_are_attributed_by_their_hlo_op_annotation_or_name():
  """Library GEMMs and Pallas calls carry their HLO instruction in the trace's `hlo_op`
  argument; XLA fusions are named after it. CPU events are not counted."""
  sources = {
      "custom_call_7": {"op": "custom-call", "shape": "bf16[8,4]", "where": "bwd:LM/mlp/dot_general",
                        "lines": ["bwd:LM/mlp/dot_general"]},
      "custom_call_9": {"op": "custom-call", "shape": "bf16[8,8]", "where": "fwd:LM/attn/dot_general",
                        "lines": ["fwd:LM/attn/dot_general"]},
      "loop_add_fusion_3": {"op": "fusion", "shape": "f32[8]", "where": "fwd:LM/norm/add",
                            "lines": ["fwd:LM/norm/add", "fwd:LM/norm/mul"]}}
  events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
            {"ph": "X", "pid": 1, "name": "nvjet_gemm", "dur": 3000.0, "args": {"hlo_op": "custom-call.7"}},
            {"ph": "X", "pid": 1, "name": "nvjet_gemm", "dur": 1000.0, "args": {"hlo_op": "custom-call.9"}},
            {"ph": "X", "pid": 1, "name": "loop_add_fusion.3", "dur": 500.0},
            {"ph": "X", "pid": 1, "name": "mystery_kernel", "dur": 100.0},
            {"ph": "X", "pid": 2, "name": "nvjet_gemm", "dur": 9000.0, "args": {"hlo_op": "custom-call.7"}}]
  kernels, by_module = profile.attribute_kernels(events, sources, steps=2)
  assert kernels["nvjet_gemm"]["ms"] == pytest.approx(2.0) and kernels["nvjet_gemm"]["calls"] == 2
  assert kernels["nvjet_gemm"]["lines"] == ["bwd:LM/mlp/dot_general", "fwd:LM/attn/dot_general"]
  assert kernels["loop_add_fusion.3"]["op"] == "fusion"
  assert kernels["mystery_kernel"]["lines"] == []
  assert by_module == pytest.approx({"bwd:LM/mlp": 1.5, "fwd:LM/attn": 0.5, "fwd:LM/norm": 0.25,
                                     "?": 0.05})


def test_train_case_runs_the_trainers_planned_step():
  """A train row says which layout ran and the compiled step's peak; "auto" on CPU (no
  memory limit known) is the first preference."""
  row = steps.train_case("mmfree", "micro", 8, remat="auto", seq_len=16, iters=1,
                         dtype="float32")
  assert row["case"] == "train-mmfree-micro-b8-auto-dtype=float32"
  assert row["layout"] == "remat=lean, unrolled, grad_accum=1"
  assert 0 < row["planned_peak_GiB"] < 1 and row["tokens_per_s"] > 0
