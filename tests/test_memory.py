"""The train step's memory plan (train/memory.py): compiled peaks, the fit check, remat=auto."""

import json
import os
import types

import jax
import numpy as np
import pytest

from experiments import tiny
from mmfree_jax import multihost
from mmfree_jax.config import ConfigError
from mmfree_jax.train import loop, memory, optim, setup
from mmfree_jax.train.metrics import read_jsonl
from mmfree_jax.train.step import init_state

BATCH, SEQ = 8, 32
LU1, LU2 = memory.Layout("lean", True, 1), memory.Layout("lean", True, 2)


def small_config(data_dir="", steps=2):
  c = tiny.get_config()
  c.model.preset, c.model.d_model, c.model.n_layers = "micro", 32, 2
  c.data.seq_len, c.data.data_dir = SEQ, data_dir
  c.train.update(batch_size=BATCH, steps=steps, log_every=1, eval_every=0, checkpoint_every=0,
                 eval_batches=1, sample_tokens=0)
  c.mesh.data = 1
  return c


class Counted:
  """The trainer's step compiler on one device, each (layout, batch) compiled once per module."""

  def __init__(self):
    c = small_config()
    self.cfg = setup.model_config(c)
    self.mesh = multihost.make_mesh(c.mesh.to_dict(), jax.devices()[:1])
    tx, sched = optim.make_optimizer(c, c.train.steps)
    with jax.set_mesh(self.mesh):
      self.state = init_state(self.cfg, tx, self.mesh, 0)
      self._compile = memory.step_compiler(self.cfg, tx, sched, self.state, self.mesh, SEQ)
    self._cache, self.calls = {}, []

  def __call__(self, layout, batch_size):
    self.calls.append((layout, batch_size))
    if (layout, batch_size) not in self._cache:
      with jax.set_mesh(self.mesh):
        self._cache[(layout, batch_size)] = self._compile(layout, batch_size)
    return self._cache[(layout, batch_size)]

  def peak(self, layout, batch_size=BATCH):
    return memory.step_memory(self(layout, batch_size), "cpu").peak


@pytest.fixture(scope="module")
def steps():
  return Counted()


@pytest.fixture
def compile_step(steps):
  steps.calls.clear()
  return steps


def test_step_memory_reads_the_compiled_step(steps):
  """Arguments are the train state and the batch, byte for byte; the donated state comes back
  in place (aliased); the peak adds the step's temporaries."""
  mem = memory.step_memory(steps(LU1, BATCH), "cpu")
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(steps.state))
  batch_bytes = 4 * BATCH * SEQ * 4  # inputs, targets, segment_ids int32; weights float32
  assert mem.argument == state_bytes + batch_bytes
  assert mem.alias == state_bytes
  assert mem.temp > 0 and mem.compiler_peak == 0
  assert mem.peak == mem.argument + mem.output - mem.alias + mem.temp + mem.code


def test_more_micro_batches_lower_the_peak(steps):
  """What the chooser relies on: two micro-batches keep about half the activations."""
  assert steps.peak(LU2) < steps.peak(LU1)


def test_preferences_order_and_micro_batches_that_split_over_devices():
  assert memory.preferences(1, 16, 1) == (
      [memory.Layout("lean", True, g) for g in (1, 2, 4, 8, 16)]
      + [memory.Layout("full", False, g) for g in (1, 2, 4, 8, 16)])
  # 8 rows over 4 data-parallel devices: at most 2 micro-batches of 4 (one row per device)
  assert [l.grad_accum for l in memory.preferences(1, 8, 4)] == [1, 2, 1, 2]
  assert [l.grad_accum for l in memory.preferences(2, 8, 1)] == [2, 4, 8, 2, 4, 8]


def test_auto_without_a_known_limit_compiles_the_first_preference_only(compile_step):
  p = memory.plan(compile_step, memory.Layout("none", False, 1), BATCH, 1,
                  memory.Budget(None, platform="cpu"), auto=True)
  assert p.layout == LU1 and p.auto and not p.tried
  assert compile_step.calls == [(LU1, BATCH)]
  assert "not checked" in p.line() and "layout remat=lean, unrolled, grad_accum=1" in p.line()


def test_auto_takes_the_first_layout_that_fits(compile_step):
  """A limit between the first and second preferences' peaks: the second, after one miss."""
  first, second = compile_step.peak(LU1), compile_step.peak(LU2)
  compile_step.calls.clear()
  budget = memory.Budget((first + second) // 2, 0.9, True, "gpu")
  p = memory.plan(compile_step, memory.Layout("none", False, 1), BATCH, 1, budget, auto=True)
  assert p.layout == LU2 and p.memory.peak == second
  assert [l for l, _ in p.tried] == [LU1]
  assert [l for l, _ in compile_step.calls] == [LU1, LU2]  # stops at the first that fits
  assert p.record()["layout_grad_accum"] == 2 and p.record()["layout_auto"] is True
  assert "chosen by model.remat=auto; did not fit: remat=lean, unrolled, grad_accum=1" in p.line()


def test_a_fixed_layout_that_fits_compiles_once(compile_step):
  budget = memory.Budget(10 * compile_step.peak(LU1))
  compile_step.calls.clear()
  p = memory.plan(compile_step, LU1, BATCH, 1, budget)
  assert p.layout == LU1 and not p.auto and compile_step.calls == [(LU1, BATCH)]


def test_a_fixed_layout_that_does_not_fit_names_what_fits(compile_step):
  """One line: the layout's peak, the budget, and per kind of option the first that fits, with
  its compiled peak (each checked against the limit here); the fraction is computed."""
  need = compile_step.peak(LU1)
  budget = memory.Budget(need - 1, 0.5, True, "gpu")
  with pytest.raises(memory.DoesNotFit) as e:
    memory.plan(compile_step, LU1, BATCH, 1, budget)
  msg = str(e.value)
  assert isinstance(e.value, ConfigError) and "\n" not in msg
  assert msg.startswith(f"the train step needs {memory.gib(need)} GiB per device but there are "
                        f"{memory.gib(need - 1)} GiB usable (0.5 of ")
  named = {"model.unroll_layers=False": memory.Layout("lean", False, 1),
           "train.grad_accum=2": LU2}
  for option, layout in named.items():
    peak = compile_step.peak(layout)
    assert peak < need and f"{option} ({memory.gib(peak)} GiB)" in msg
  assert f"train.batch_size=4, 4 per device ({memory.gib(compile_step.peak(LU1, 4))} GiB)" in msg
  fraction = np.ceil(need / ((need - 1) / 0.5) * 100) / 100
  assert f"XLA_PYTHON_CLIENT_MEM_FRACTION={fraction:.2f}" in msg
  assert msg.endswith("model.remat=auto takes the fastest layout that fits")


def test_nothing_fits_when_the_state_alone_is_too_large(compile_step):
  """Below the arguments' size no layout can fit: one compile, then the line says why."""
  arg = memory.step_memory(compile_step(LU1, BATCH), "cpu").argument
  compile_step.calls.clear()
  with pytest.raises(memory.DoesNotFit, match=r"^no layout of the train step fits .* "
                     r"remat=lean, unrolled, grad_accum=1 needs .* GiB \(of which train state "
                     r"and batch .* GiB\); shard the state") as e:
    memory.plan(compile_step, LU1, BATCH, 1, memory.Budget(arg // 2, platform="cpu"), auto=True)
  assert "\n" not in str(e.value) and len(compile_step.calls) == 1


def test_allocator_defaults_only_where_the_environment_sets_none():
  assert memory.allocator_env({}) == {"XLA_PYTHON_CLIENT_PREALLOCATE": "true",
                                      "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"}
  mine = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_CLIENT_MEM_FRACTION": ".5"}
  assert memory.allocator_env(mine) == mine  # (both fraction variables set is JAX's error)


def test_budget_of_a_cpu_device_is_unknown():
  assert memory.device_budget(jax.devices()[0]) == memory.Budget(None, platform="cpu")


# --- the trainer ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


def test_trainer_runs_the_auto_layout_and_records_it(steps, data_dir, tmp_path, monkeypatch,
                                                     capsys):
  limit = (steps.peak(LU1) + steps.peak(LU2)) // 2
  monkeypatch.setattr(memory, "device_budget", lambda: memory.Budget(limit, platform="cpu"))
  c = small_config(data_dir)
  c.model.remat = "auto"
  out = loop.run(c, str(tmp_path), devices=jax.devices()[:1])
  assert "layout remat=lean, unrolled, grad_accum=2, chosen by model.remat=auto" in (
      capsys.readouterr().out)
  want = {"layout_remat": "lean", "layout_unroll_layers": True, "layout_grad_accum": 2,
          "layout_auto": True, "usable_GiB": limit / memory.GIB}
  with open(tmp_path / "summary.json") as f:
    summary = json.load(f)
  assert {k: summary[k] for k in want} == want
  assert summary["step_peak_GiB"] * memory.GIB == steps.peak(LU2)
  rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r.get("layout_grad_accum") for r in rows if "loss" in r] == [2, None]
  with open(tmp_path / "model_config.json") as f:
    assert json.load(f)["unroll_layers"] is True and out["cfg"].remat == "lean"


def test_trainer_refuses_a_step_that_does_not_fit_and_leaves_the_workdir(data_dir, tmp_path,
                                                                         monkeypatch):
  monkeypatch.setattr(memory, "device_budget", lambda: memory.Budget(1 << 20, platform="cpu"))
  c = small_config(data_dir)
  c.model.remat = "auto"
  with pytest.raises(memory.DoesNotFit, match="^no layout of the train step fits 0.00098 GiB"):
    loop.run(c, str(tmp_path), devices=jax.devices()[:1])
  assert not {"config.json", "model_config.json", "metrics.jsonl"} & set(os.listdir(tmp_path))


@pytest.mark.parametrize("remat", ["Auto", "lean,full", ""])
def test_bad_remat_values_are_one_line(remat):
  c = small_config()
  c.model.remat = remat
  with pytest.raises(ConfigError, match=r"^model.remat=.* is unknown; use one of .*'auto'") as e:
    setup.validate(c)
  assert "\n" not in str(e.value)


class _FakeCompiled:
  """A compiled step whose memory analysis says `peak` bytes (1 GiB of it arguments)."""

  def __init__(self, peak):
    self.peak = int(peak)

  def memory_analysis(self):
    return types.SimpleNamespace(
        argument_size_in_bytes=memory.GIB, output_size_in_bytes=0, alias_size_in_bytes=0,
        temp_size_in_bytes=self.peak - memory.GIB, generated_code_size_in_bytes=0,
        peak_memory_in_bytes=0)


def test_auto_extrapolates_over_micro_batches_instead_of_compiling_each():
  """Peaks of 10 + 64 / grad_accum GiB, 15 GiB usable (a batch far too large for the card):
  after 1 and 2 micro-batches, 4 and 8 are predicted 26 and 18 GiB and not compiled; 16 fits."""
  calls = []

  def compile_step(layout, batch_size):
    calls.append(layout.grad_accum)
    return _FakeCompiled((10 + 64 / layout.grad_accum) * memory.GIB)
  p = memory.plan(compile_step, LU1, 256, 1, memory.Budget(15 * memory.GIB, 0.95, True, "gpu"),
                  auto=True)
  assert p.layout == memory.Layout("lean", True, 16) and calls == [1, 2, 16]


def test_what_fits_extrapolates_over_micro_batches_and_batch_sizes():
  """A fixed layout at batch 256 on one device, peaks 10 GiB + 0.25 GiB per micro-batch row
  (0.05 with full remat), 15 GiB usable: the loop and full remat miss; of 2..128 micro-batches
  only 2 and 16 are compiled (4 and 8 are predicted over), likewise batch sizes 128 and 16."""
  calls = []

  def compile_step(layout, batch_size):
    calls.append((layout, batch_size))
    per_row = 0.05 if layout.remat == "full" else 0.25
    return _FakeCompiled((10 + per_row * batch_size / layout.grad_accum) * memory.GIB)
  with pytest.raises(memory.DoesNotFit) as e:
    memory.plan(compile_step, LU1, 256, 1, memory.Budget(15 * memory.GIB, platform="cpu"))
  assert "these fit: train.grad_accum=16 (14.0 GiB); train.batch_size=16, 16 per device " \
         "(14.0 GiB); model.remat=auto" in str(e.value)
  assert calls == [(LU1, 256), (memory.Layout("lean", False, 1), 256),
                   (memory.Layout("full", False, 1), 256), (LU2, 256),
                   (memory.Layout("lean", True, 16), 256), (LU1, 128), (LU1, 16)]
