"""The shared CLI wrapper: bad input is one `error:` line naming the culprit, exit 1."""

import json
import os

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
    assert e.value.code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: {path} is damaged (Error while deserializing header: ")
    assert err[0].endswith("re-download or re-export the checkpoint")
  assert not os.path.exists(tmp_path / "out")
