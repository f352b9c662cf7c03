"""The shared CLI wrapper: bad input is one `error:` line naming the culprit, exit 2."""

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib

import pytest
from safetensors.numpy import save_file

from mmfree_jax import cli, convert, generate
from mmfree_jax.interop import hf

HF_CONFIG = {"model_type": "hgrn_bit", "hidden_size": 32, "num_hidden_layers": 2,
             "vocab_size": 300, "intermediate_size": 64, "rms_norm_eps": 1e-6}


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_safetensors_is_one_line_naming_the_file(tmp_path, capsys, damage):
  src = tmp_path / "hf"
  src.mkdir()
  (src / "config.json").write_text(json.dumps(HF_CONFIG))
  path = src / "model.safetensors"
  save_file(hf.random_hf_tensors(hf.config_from_hf(HF_CONFIG), seed=0), str(path))
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"garbage!" * 64)
  for main in (lambda: convert.main([str(src), str(tmp_path / "out")]),
               lambda: generate.main(["--checkpoint", str(src), "--prompt", "hi"])):
    with pytest.raises(SystemExit) as e:
      cli.run(main)
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {path} is damaged (Error while deserializing header: ")
    assert err[0].endswith("re-download or re-export the checkpoint")
  assert not os.path.exists(tmp_path / "out")


def test_bad_input_is_one_line_unless_a_traceback_is_asked_for(capsys, monkeypatch):
  def main():
    raise ValueError("model.d_model=-1 must be positive")
  with pytest.raises(SystemExit) as e:
    cli.run(main)
  assert e.value.code == 2
  assert capsys.readouterr().err == "error: model.d_model=-1 must be positive\n"
  monkeypatch.setenv("MMFREE_TRACEBACK", "1")
  with pytest.raises(ValueError, match="d_model=-1"):
    cli.run(main)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_console_scripts_run_each_modules_main():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
  assert scripts == {f"mmfree-{n}": f"mmfree_jax.cli:{n}" for n in cli.ENTRY_POINTS}
  for name, (module, _) in cli.ENTRY_POINTS.items():
    assert callable(getattr(cli, name)), name
    with open(importlib.util.find_spec(module).origin) as f:
      tree = ast.parse(f.read())
    assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), module


def test_a_config_file_imports_its_siblings_from_any_directory(tmp_path):
  """`--config=/elsewhere/experiments/tiny.py` from another working directory: the config's
  `from experiments import base` finds the copy beside it (no checkout on sys.path)."""
  shutil.copytree(os.path.join(ROOT, "experiments"), tmp_path / "elsewhere" / "experiments")
  (tmp_path / "pkg").mkdir()
  os.symlink(os.path.join(ROOT, "mmfree_jax"), tmp_path / "pkg" / "mmfree_jax")  # as installed
  config = tmp_path / "elsewhere" / "experiments" / "tiny.py"
  code = ("import sys; from ml_collections import config_flags; from mmfree_jax import cli; "
          "h = config_flags.DEFINE_config_file('config'); "
          f"cli.parse_flags(['mmfree-train', '--config={config}:transformer']); "
          "print(h.value.model.arch, sys.modules['experiments'].__file__)")
  r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                     env={**os.environ, "PYTHONPATH": str(tmp_path / "pkg")})
  assert r.returncode == 0, r.stderr
  assert r.stdout.split() == ["transformer", str(config.parent / "__init__.py")]
