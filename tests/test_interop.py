"""HF hgrn_bit interop: exact round trips, float64 NumPy reference logits, clear errors."""

import json
import os
import subprocess
import sys

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mmfree_jax import convert
from mmfree_jax.config import ModelConfig
from mmfree_jax.data.tokenizer import default_model_path
from mmfree_jax.interop import CheckpointError, checkpoint, hf, reference_numpy
from mmfree_jax.models import LM, init_params

# intermediate_size given explicitly (not the 256-rule) so the config path is exercised.
HF_CONFIG = {"model_type": "hgrn_bit", "architectures": ["HGRNBitForCausalLM"],
             "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 300,
             "intermediate_size": 64, "hidden_ratio": 4, "rms_norm_eps": 1e-6,
             "use_lower_bound": True, "num_heads": 1, "expand_ratio": 1,
             "use_short_conv": False, "tie_word_embeddings": False}
CFG = hf.config_from_hf(HF_CONFIG, dtype="float32")
TENSORS = hf.random_hf_tensors(CFG, seed=0)
TOKENS = np.random.default_rng(1).integers(0, 300, (2, 16))
logits_fn = jax.jit(lambda p, t: LM(CFG).apply({"params": p}, t)[0])


def _write_hf(path, tensors, shards=1):
  """An HF directory written by hand (safetensors.numpy; sharded with an index)."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(HF_CONFIG, f)
  if shards == 1:
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return
  names = sorted(tensors)
  weight_map = {}
  for s in range(shards):
    fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = {k: tensors[k] for k in names[s::shards]}
    save_file(part, os.path.join(path, fname), metadata={"format": "pt"})
    weight_map.update({k: fname for k in part})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def _assert_same_tensors(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    np.testing.assert_array_equal(a[k].view(np.uint16), b[k].view(np.uint16), err_msg=k)


def test_config_mapping():
  assert (CFG.d_model, CFG.n_layers, CFG.vocab_size, CFG.ffn) == (32, 2, 300, 64)
  assert CFG.arch == "mmfree" and CFG.gate == "code" and CFG.lower_bound
  assert CFG.norm_eps == 1e-6 and CFG.bitlinear_eps == 1e-6
  # null intermediate_size -> the 256-rounding rule with hidden_ratio
  rule = hf.config_from_hf({**HF_CONFIG, "hidden_size": 1024, "intermediate_size": None})
  assert rule.ffn == 2816 and rule.d_ff is None
  back = hf.config_to_hf(CFG)
  for k in ("hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
            "rms_norm_eps", "use_lower_bound", "model_type"):
    assert back[k] == HF_CONFIG[k], k


@pytest.mark.parametrize("shards", [1, 3])
def test_hf_to_ours_to_hf_is_exact(tmp_path, shards):
  src = tmp_path / "hf"
  _write_hf(src, TENSORS, shards)
  cfg, params = hf.load_hf(src, dtype="float32")
  assert cfg == CFG
  lm_head = params["lm_head"]["kernel"]
  assert lm_head.dtype == np.float32 and lm_head.shape == (32, 300)
  np.testing.assert_array_equal(lm_head, TENSORS["lm_head.weight"].astype(np.float32).T)
  np.testing.assert_array_equal(params["layers"]["mlp"]["down_proj"]["kernel"][1],
                                TENSORS["model.layers.1.mlp.down_proj.weight"].astype(np.float32).T)
  files = hf.save_hf(tmp_path / "back", cfg, params, "bfloat16", max_shard_bytes=40_000)
  assert len(files) > 3  # sharded export with an index
  _assert_same_tensors(hf.read_hf_tensors(tmp_path / "back"), TENSORS)


def test_cli_roundtrip_through_orbax_and_float32(tmp_path, capsys):
  _write_hf(tmp_path / "hf", TENSORS)
  assert convert.main([str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
  assert checkpoint.detect_format(tmp_path / "ours") == "ours"
  assert convert.main([str(tmp_path / "ours"), str(tmp_path / "hf32"), "--to", "hf",
                       "--dtype", "float32"]) == 0
  assert convert.main([str(tmp_path / "hf32"), str(tmp_path / "hf16"), "--to", "hf",
                       "--dtype", "bfloat16"]) == 0
  assert "wrote hf checkpoint" in capsys.readouterr().out
  f32 = hf.read_hf_tensors(tmp_path / "hf32")
  for k, v in TENSORS.items():
    assert f32[k].dtype == np.float32
    np.testing.assert_array_equal(f32[k], v.astype(np.float32))
  _assert_same_tensors(load_file(tmp_path / "hf16" / "model.safetensors"), TENSORS)
  cfg, params = checkpoint.load_model(tmp_path / "ours")
  assert cfg.d_model == 32 and cfg.ffn == 64
  np.testing.assert_array_equal(params["embed"],
                                TENSORS["model.embeddings.weight"].astype(np.float32))


def test_logits_match_float64_numpy_reference(tmp_path):
  """Ours (float32) vs the float64 reference on the raw HF tensors: rtol 1e-4 plus atol
  1e-5 x max|logit|. Codes are integers, so this needs every quantization code equal;
  float32 may legitimately flip a code whose scaled activation lies within float32 error
  of a rounding boundary (k + 0.5), so seeds where the reference saw one closer than 1e-6
  are skipped (weights are checked too) and 4 of 5 seeds must qualify."""
  compared = 0
  for seed in range(5):
    tensors = TENSORS if seed == 0 else hf.random_hf_tensors(CFG, seed=seed)
    _write_hf(tmp_path / f"hf{seed}", tensors)
    cfg, params = checkpoint.load_model(tmp_path / f"hf{seed}", dtype="float32")
    assert cfg == CFG
    stats = {}
    ref = reference_numpy.forward(hf.read_hf_tensors(tmp_path / f"hf{seed}"), HF_CONFIG, TOKENS,
                                  stats)
    scale = np.abs(ref).max()
    w_margin = min(np.abs(np.abs(w.astype(np.float64)) / np.mean(np.abs(w.astype(np.float64)))
                          - 0.5).min()
                   for name, w in tensors.items() if name.endswith("proj.weight")
                   or name == "lm_head.weight")
    if min(stats["act_margin"], w_margin) < 1e-6:
      continue
    compared += 1
    ours = np.asarray(logits_fn(params, jnp.asarray(TOKENS)), np.float64)
    assert 0.05 < scale < 100 and ref.shape == (2, 16, 300)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * scale, err_msg=f"seed {seed}")
  assert compared >= 4, compared
  # the comparison is sensitive: a transposed projection is far off
  bad = jax.tree.map(lambda x: x, params)
  k = bad["layers"]["attn"]["o_proj"]["kernel"]
  bad["layers"]["attn"]["o_proj"]["kernel"] = jnp.swapaxes(k, 1, 2)
  assert np.abs(np.asarray(logits_fn(bad, jnp.asarray(TOKENS))) - ref).max() > 100 * 1e-5 * scale


def test_missing_unexpected_and_misshaped_keys_in_one_error(tmp_path):
  t = dict(TENSORS)
  del t["model.norm.weight"]
  t["model.layers.0.attn.k_proj.weight"] = np.zeros((32, 32), ml_dtypes.bfloat16)
  t["lm_head.weight"] = np.zeros((301, 32), ml_dtypes.bfloat16)
  _write_hf(tmp_path / "hf", t)
  with pytest.raises(CheckpointError) as e:
    checkpoint.load_model(tmp_path / "hf")
  msg = str(e.value)
  assert "\n" not in msg
  assert "1 missing: model.norm.weight" in msg
  assert "1 unexpected: model.layers.0.attn.k_proj.weight" in msg
  assert "lm_head.weight (301, 32) != expected (300, 32)" in msg


def test_bad_inputs_are_clear_errors(tmp_path):
  with pytest.raises(CheckpointError, match="num_heads=4"):
    hf.config_from_hf({**HF_CONFIG, "num_heads": 4})
  with pytest.raises(CheckpointError, match="model_type='llama'"):
    hf.config_from_hf({**HF_CONFIG, "model_type": "llama"})
  with pytest.raises(CheckpointError, match="does not exist"):
    checkpoint.load_model(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "config.json").write_text(json.dumps(HF_CONFIG))
  with pytest.raises(CheckpointError, match="no model.safetensors"):
    checkpoint.load_model(tmp_path / "empty")
  _write_hf(tmp_path / "sh", TENSORS, shards=2)
  os.remove(tmp_path / "sh" / "model-00002-of-00002.safetensors")
  with pytest.raises(CheckpointError, match="shard .* is missing"):
    hf.read_hf_tensors(tmp_path / "sh")
  with pytest.raises(CheckpointError, match="gate='paper'"):
    hf.config_to_hf(CFG.replace(gate="paper"))


def test_our_checkpoint_shape_mismatch_is_reported(tmp_path):
  _write_hf(tmp_path / "hf", TENSORS)
  _, params = hf.load_hf(tmp_path / "hf")
  checkpoint.save_model(tmp_path / "ours", CFG, params)
  cfg_file = tmp_path / "ours" / "config.json"
  d = json.loads(cfg_file.read_text())
  d["vocab_size"] = 320
  cfg_file.write_text(json.dumps(d))
  with pytest.raises(CheckpointError, match=r"embed \(300, 32\) != expected \(320, 32\)"):
    checkpoint.load_model(tmp_path / "ours")


def test_cli_error_is_one_line_without_traceback(tmp_path):
  r = subprocess.run([sys.executable, "-m", "mmfree_jax.convert", str(tmp_path / "nope"),
                      str(tmp_path / "out")], capture_output=True, text=True,
                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert r.returncode == 2
  assert r.stderr.strip().startswith("error: checkpoint directory") and "Traceback" not in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1


# Every field off its default where hgrn_bit allows (arch, gate and lower_bound are its layout).
EXACT = ModelConfig(arch="mmfree", vocab_size=300, d_model=32, n_layers=2, d_ff=64, head_dim=16,
                    gate="code", lower_bound=True, norm_eps=1e-5, bitlinear_eps=1e-7,
                    rope_theta=5000.0, dtype="float32", scan_impl="sequential", scan_chunk=4,
                    bitlinear_impl="xla", remat="lean", unroll_layers=True,
                    attention_impl="cudnn", init_std=0.03)


@functools.lru_cache(maxsize=1)
def _exact_params():
  params = nn.unbox(init_params(EXACT, jax.random.key(0)))
  params["lower_bounds"] = jax.random.normal(jax.random.key(1), params["lower_bounds"].shape)
  return jax.device_get(params)


def test_ours_to_hf_to_ours_keeps_every_config_field_and_the_logits_bitwise(tmp_path, capsys):
  default = ModelConfig()
  assert all(getattr(EXACT, f.name) != getattr(default, f.name)
             for f in dataclasses.fields(ModelConfig)
             if f.name not in ("arch", "gate", "lower_bound"))
  params = _exact_params()
  checkpoint.save_model(tmp_path / "ours", EXACT, params, {"step": 7}, default_model_path())
  assert convert.main([str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0  # float32 default
  assert convert.main([str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
  assert "warning" not in capsys.readouterr().out
  for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
    assert (tmp_path / "hf" / f).is_file(), f
  tok_cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
  assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["add_bos_token"]) == ("<s>", "</s>", True)
  cfg, back = checkpoint.load_model(tmp_path / "back")
  assert cfg == EXACT
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(back), params)
  run = jax.jit(lambda p, t: LM(EXACT).apply({"params": p}, t)[0])
  np.testing.assert_array_equal(run(back, jnp.asarray(TOKENS)), run(params, jnp.asarray(TOKENS)))
  assert checkpoint.tokenizer_file(tmp_path / "back") is not None
  info = checkpoint.export_info(tmp_path / "back")
  assert info == {"step": 7, "source": str(tmp_path / "hf")}


def test_hf_export_with_null_attention_impl_loads_with_the_default():
  """Exports written before attention_impl="auto" store null: the field's default."""
  stored = hf.config_to_hf(EXACT)
  stored[hf.CONFIG_KEY] = {**stored[hf.CONFIG_KEY], "attention_impl": None}
  assert hf.config_from_hf(stored) == dataclasses.replace(EXACT, attention_impl="auto")


def test_16bit_export_warns_when_it_flips_ternary_codes(tmp_path, capsys):
  checkpoint.save_model(tmp_path / "ours", EXACT, _exact_params())
  assert convert.main([str(tmp_path / "ours"), str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
  warn = [l for l in capsys.readouterr().out.splitlines() if l.startswith("warning:")]
  assert len(warn) == 1 and "the bfloat16 export changes" in warn[0], warn
  changed, total = hf.ternary_code_changes(EXACT, hf.params_to_hf(EXACT, _exact_params()),
                                           "bfloat16")
  assert 0 < changed < total and f"{changed:,} of {total:,} ternary weight codes" in warn[0]


def test_trainer_exports_are_versioned_and_never_replaced(tmp_path):
  wd = str(tmp_path / "run")
  params = _exact_params()
  other = jax.tree.map(lambda x: x + 1, params)
  tok = default_model_path()
  path, status = checkpoint.export_run(wd, EXACT, params, 4, tok)
  assert (path, status) == (os.path.join(wd, "model", "step_4"), "written")
  assert checkpoint.export_run(wd, EXACT, params, 4, tok)[1] == "unchanged"
  digest = checkpoint.export_info(path)["params_sha256"]
  assert checkpoint.export_run(wd, EXACT, other, 4, tok)[1] == "kept"
  assert checkpoint.export_info(path)["params_sha256"] == digest  # not replaced
  assert checkpoint.export_run(wd, EXACT, other, 8, tok)[1] == "written"
  assert os.readlink(os.path.join(wd, "model", "latest")) == "step_8"
  with open(os.path.join(wd, "config.json"), "w") as f:  # a run directory's training config
    json.dump({"train": {"steps": 8}}, f)
  for where in (wd, os.path.join(wd, "model")):  # a run directory, or its model/
    _, got = checkpoint.load_model(where)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), other)
    assert checkpoint.export_info(where) == {"step": 8, "run_dir": wd,
                                             "params_sha256": checkpoint.params_sha256(other)}
  _, first = checkpoint.load_model(path)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(first), params)
  assert checkpoint.tokenizer_file(wd) == os.path.join(wd, "model", "step_8", "tokenizer.model")
