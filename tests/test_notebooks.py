"""The notebooks run top to bottom on the micro sweep's results (nbclient + ipykernel)."""

import os

import nbformat
from nbclient import NotebookClient
import pytest

from test_sweep import micro_dir  # noqa: F401  (the session's micro sweep, run once)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ("scaling_laws", "reproduce_paper", "explore_model")


def _read(name):
  return nbformat.read(os.path.join(ROOT, "notebooks", f"{name}.ipynb"), as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
  nb = _read(name)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, (name, cell.source[:60])


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, micro_dir, monkeypatch):  # noqa: F811
  monkeypatch.setenv("MMFREE_RESULTS", micro_dir)
  monkeypatch.setenv("XLA_FLAGS", "")  # the kernel: one CPU device
  nb = _read(name)
  NotebookClient(nb, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert f"results: {micro_dir}" in text
  if name == "scaling_laws":
    assert "per decade" in text and "bootstrap: median" in text
  elif name == "reproduce_paper":
    assert "374,108,160    374,108,160" in text
    assert "lines through the published points: 6.2e+22" in text
  else:
    assert "per-layer pass == model" in text and "lm_head" in text
