"""Packed 2-bit ternary weights: exact codes, same logits as the latent model, 8x fewer bytes."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmfree_jax import convert
from mmfree_jax.config import preset
from mmfree_jax.interop import CheckpointError, checkpoint
from mmfree_jax.interop import packed as pk
from mmfree_jax.layers import quant
from mmfree_jax.layers.quant import weight_codes, weight_quant
from mmfree_jax.models import LM, init_cache, init_params

CFG = preset("micro", "mmfree", vocab_size=300, dtype="float32", d_ff=72)
PARAMS = nn.unbox(init_params(CFG, jax.random.key(0)))
PARAMS["lower_bounds"] = jax.random.normal(jax.random.key(3), PARAMS["lower_bounds"].shape)
TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 0, 300)
latent_logits = jax.jit(lambda p, t: LM(CFG).apply({"params": p}, t)[0])
# The same model on packed params: each BitLinear runs on the stored ternary codes.
packed_logits = jax.jit(lambda cfg, p, t: LM(cfg).apply({"params": p}, t)[0], static_argnums=0)
packed_step = jax.jit(lambda p, t, c: LM(CFG).apply({"params": p}, t, cache=c))


def test_pack_layout_and_round_trip():
  t = np.array([[-1, 0, 1], [1, 1, -1], [0, -1, 0], [1, 0, 0], [-1, -1, 1]])  # K=5 (padded to 8)
  p = quant.pack_codes(t)
  assert p.dtype == np.uint8 and p.shape == (2, 3)
  # rows 0..3 of column 0: codes (t+1) = 0, 2, 1, 2 -> 0 | 2<<2 | 1<<4 | 2<<6
  assert p[0, 0] == 0 | 2 << 2 | 1 << 4 | 2 << 6
  assert p[1, 0] == 0 | 1 << 2 | 1 << 4 | 1 << 6  # row 4 then three zero pads (code 1)
  u = quant.unpack_codes(jnp.asarray(p), 5)
  assert u.dtype == jnp.int8
  np.testing.assert_array_equal(u, t)
  big = np.random.default_rng(0).integers(-1, 2, (3, 37, 11))
  np.testing.assert_array_equal(quant.unpack_codes(jnp.asarray(quant.pack_codes(big)), 37), big)
  with pytest.raises(ValueError, match="ternary codes"):
    quant.pack_codes(np.array([[2, 0, 0, 0]]))


def test_packed_codes_and_scales_are_those_of_the_latent_weights():
  packed = pk.pack_params(CFG, PARAMS)
  for name in ("gate_proj", "down_proj"):
    w = PARAMS["layers"]["mlp"][name]["kernel"]
    for layer in range(CFG.n_layers):
      t, g = weight_codes(w[layer])
      codes, scale = pk.ternary_of(jax.tree.map(lambda x: x[layer],
                                                packed["layers"]["mlp"][name]), w.shape[1])
      np.testing.assert_array_equal(codes, t)
      assert float(scale) == pytest.approx(float(g), rel=1e-6)
  np.testing.assert_array_equal(packed["embed"], PARAMS["embed"])
  assert packed["lm_head"]["scale"].shape == ()
  assert packed["layers"]["attn"]["i_proj"]["scale"].shape == (2,)


def test_packed_logits_equal_latent_logits_prefill_and_decode():
  """Tolerance rtol 1e-5 / atol 1e-6: the int8 x int8 -> int32 product equals the latent
  model's integer-valued float matmul exactly; only scale multiplies round."""
  packed = jax.tree.map(jnp.asarray, pk.pack_params(CFG, PARAMS))
  ref = latent_logits(PARAMS, TOKENS)
  np.testing.assert_allclose(packed_logits(CFG, packed, TOKENS), ref, rtol=1e-5, atol=1e-6)
  logits, cache = packed_step(packed, TOKENS[:, :10], init_cache(CFG, 2))
  outs = [logits]
  for t in range(10, 16):
    logits, cache = packed_step(packed, TOKENS[:, t:t + 1], cache)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), ref, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(ref).max()) > 0.05


def test_bytes_are_about_8x_smaller():
  b = pk.weight_bytes(PARAMS, pk.pack_params(CFG, PARAMS))
  n_kernel = sum(int(np.size(v)) for p, v in jax.tree_util.tree_leaves_with_path(PARAMS)
                 if "kernel" in jax.tree_util.keystr(p))
  n_other = sum(int(np.size(v)) for v in jax.tree.leaves(PARAMS)) - n_kernel
  assert b["kernel_bytes_bf16"] == 2 * n_kernel
  assert b["kernel_bytes_packed"] == n_kernel // 4 + 4 * (4 * 2 + 2 * 2 + 1)  # + f32 scales
  assert 7.9 < b["kernel_ratio"] <= 8.0
  assert b["other_bytes"] == 4 * n_other  # as stored: float32
  assert b["total_bytes_packed"] == b["kernel_bytes_packed"] + b["other_bytes"]


def test_refuses_already_ternary_weights():
  bad = jax.tree.map(lambda x: x, PARAMS)
  w = bad["layers"]["attn"]["o_proj"]["kernel"]
  bad["layers"]["attn"]["o_proj"]["kernel"] = jax.vmap(weight_quant)(w)
  with pytest.raises(CheckpointError, match="o_proj/kernel already holds ternary"):
    pk.pack_params(CFG, bad)


def test_pack_cli_and_load(tmp_path, capsys):
  checkpoint.save_model(tmp_path / "ours", CFG, PARAMS)
  assert convert.main([str(tmp_path / "ours"), str(tmp_path / "packed"), "--pack"]) == 0
  out = capsys.readouterr().out
  size = os.path.getsize(tmp_path / "packed" / "packed.safetensors")
  assert "smaller" in out and f"packed.safetensors: {size / 2**20:.2f} MiB" in out
  b = pk.weight_bytes(PARAMS, pk.pack_params(CFG, PARAMS))
  assert 0 < size - b["total_bytes_packed"] < 16_384  # the tensors plus a JSON header
  assert checkpoint.detect_format(tmp_path / "packed") == "packed"
  cfg, packed = checkpoint.load_model(tmp_path / "packed")
  assert cfg == CFG and pk.is_packed(packed)
  np.testing.assert_allclose(packed_logits(cfg, packed, TOKENS), latent_logits(PARAMS, TOKENS),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(CheckpointError, match="packed export"):
    convert.main([str(tmp_path / "packed"), str(tmp_path / "x")])


def test_bf16_embedding_option_halves_its_bytes(tmp_path, capsys):
  checkpoint.save_model(tmp_path / "ours", CFG, PARAMS)
  assert convert.main([str(tmp_path / "ours"), str(tmp_path / "p16"), "--pack",
                       "--embed_dtype", "bfloat16"]) == 0
  assert "embedding as bfloat16" in capsys.readouterr().out
  _, packed = checkpoint.load_model(tmp_path / "p16")
  assert packed["embed"].dtype == jnp.bfloat16
  b32 = pk.weight_bytes(PARAMS, pk.pack_params(CFG, PARAMS))
  b16 = pk.weight_bytes(PARAMS, pk.pack_params(CFG, PARAMS, "bfloat16"))
  assert b32["other_bytes"] - b16["other_bytes"] == 2 * PARAMS["embed"].size
  ref = latent_logits(PARAMS, TOKENS)  # the embedding's rounding moves logits, a little
  assert float(jnp.abs(packed_logits(CFG, packed, TOKENS) - ref).max()) < 0.1 * float(
      jnp.abs(ref).max())
