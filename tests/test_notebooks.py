"""The notebooks run top to bottom (nbclient + ipykernel) and show their figures: on the micro
sweep's results, and on the committed study when the repository has one."""

import os

import nbformat
from nbclient import NotebookClient
import pytest

from mmfree_jax.scaling import results as res_lib
from test_sweep import micro_dir  # noqa: F401  (the session's micro sweep, run once)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ("scaling_laws", "reproduce_paper", "explore_model")
STUDY_NOTEBOOKS = ("scaling_laws", "reproduce_paper")  # explore_model needs a checkpoint
DRAWS = ("plots.plot_", "plt.subplots")
NO_LR_AXIS = "no LR axis in"


def _read(name):
  return nbformat.read(os.path.join(ROOT, "notebooks", f"{name}.ipynb"), as_version=4)


def _execute(name, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "")  # the kernel: one CPU device
  nb = _read(name)
  NotebookClient(nb, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
  return nb


def _text(nb) -> str:
  return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def _assert_figures_shown(nb, name):
  """Every cell that draws shows a PNG (an LR-sensitivity cell may say there is no LR axis)."""
  drawing = [c for c in nb.cells if c.cell_type == "code" and any(d in c.source for d in DRAWS)]
  assert drawing, name
  for c in drawing:
    pngs = [o for o in c.outputs if "image/png" in o.get("data", {})]
    said = "".join(o.get("text", "") for o in c.outputs)
    assert pngs or NO_LR_AXIS in said, (name, c.source[:80])


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
  nb = _read(name)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, (name, cell.source[:60])


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, micro_dir, monkeypatch):  # noqa: F811
  monkeypatch.setenv("MMFREE_RESULTS", micro_dir)
  nb = _execute(name, monkeypatch)
  text = _text(nb)
  assert f"results: {micro_dir}" in text
  _assert_figures_shown(nb, name)
  if name == "scaling_laws":
    assert "loglinear  slope_per_decade=" in text and "bootstrap: median" in text
    assert "nd         skipped: N and D must vary independently" in text  # one budget per size
  elif name == "reproduce_paper":
    assert "374,108,160    374,108,160" in text
    assert "lines through the published points: 6.2e+22" in text
  else:
    assert "per-layer pass == model" in text and "lm_head" in text


@pytest.mark.parametrize("name", STUDY_NOTEBOOKS)
def test_notebook_runs_on_the_committed_study(name, monkeypatch):
  """Without MMFREE_RESULTS a notebook reads results/mini; it shows every figure there."""
  study = os.path.join(ROOT, res_lib.STUDY)
  if not os.path.isfile(os.path.join(study, "results.csv")):
    pytest.skip(f"no committed study yet ({res_lib.STUDY}/results.csv)")
  monkeypatch.delenv("MMFREE_RESULTS", raising=False)
  nb = _execute(name, monkeypatch)
  assert f"results: {study}" in _text(nb)
  _assert_figures_shown(nb, name)
