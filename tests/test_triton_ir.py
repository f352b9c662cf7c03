"""Every Pallas GPU kernel lowers, on this CPU machine, to a Triton module that passes
Triton's own verifier: the check the GPU runs first when it compiles the module (a wrong
operand type, for one, fails there). What the GPU does after that (register allocation,
the results) is tested on a GPU by the `*_on_gpu_*` tests."""

import collections

import jax
import jax.numpy as jnp
import pytest

from mmfree_jax.bench import triton_report
from mmfree_jax.config import preset
from mmfree_jax.layers import bitlinear as bl
from mmfree_jax.layers import bitlinear_pallas, scan_pallas
from mmfree_jax.layers.mlgru import mlgru_recurrence
from mmfree_jax.layers.scan import linear_recurrence

pytest.importorskip("jax._src.pallas.triton.pallas_call_registration")


@pytest.fixture
def verified():
  """(names, texts) of the Triton modules lowered so far, each verified as it is built."""
  seen, texts = [], {}

  def verify(name, _operand, _warps, module):
    with module.context:
      try:
        module.operation.verify()
      except Exception as e:  # noqa: BLE001 - the verifier's message is the test's
        pytest.fail(f"Triton module {name} fails verification: {str(e)[:2000]}")
    seen.append(name)
    texts[name] = str(module)

  with triton_report.capturing_modules(verify):
    yield seen, texts


def _lower_for_cuda(fn, *args):
  try:
    jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  except RuntimeError as e:  # jax 0.11 reads the GPU's model while lowering Triton kernels
    if "No supported GPU devices found" not in str(e):
      raise
    pytest.skip("this jax lowers Pallas Triton kernels only with a GPU present")


@pytest.mark.parametrize("t,names", [  # T/64 chunks: 1.5 (whole sequence), 2 (time chunks)
    (96, ["mlgru_scan_fwd", "mlgru_scan_bwd"]),
    (128, ["mlgru_scan_fwd_summary", "mlgru_scan_fwd_chunks", "mlgru_scan_bwd_summary",
           "mlgru_scan_bwd_chunks"])])
def test_recurrence_kernels_verify(verified, t, names):
  b, d = 2, 128
  f = jax.ShapeDtypeStruct((b, t, d), jnp.bfloat16)
  resets = jnp.zeros((b, t), bool)

  def loss(f, x):
    return jnp.sum(linear_recurrence(f, x, None, resets, "pallas")[0].astype(jnp.float32))

  _lower_for_cuda(jax.grad(loss, argnums=(0, 1)), f, f)
  assert verified[0] == names


def test_grouped_chunk_kernels_verify(verified):
  """Time chunks in two groups of batch rows: each group's launches, the second group's
  chunk kernel taking the first's outputs aliased (and skipping them)."""
  b, t, d = 4, 128, 128
  seq = jax.ShapeDtypeStruct((b, t, d), jnp.bfloat16)
  vec = jax.ShapeDtypeStruct((b, d), jnp.float32)
  kw = {"block_d": 64, "chunk_t": 64, "tile_t": 16, "groups": 2}
  _lower_for_cuda(lambda f, x, h0: scan_pallas.forward(f, x, h0, **kw), seq, seq, vec)
  _lower_for_cuda(lambda f, h, dh, h0, dlast: scan_pallas.backward(f, h, dh, h0, dlast, **kw),
                  seq, seq, seq, vec, vec)
  assert verified[0] == ["mlgru_scan_fwd_summary", "mlgru_scan_fwd_chunks"] * 2 + [
      "mlgru_scan_bwd_summary", "mlgru_scan_bwd_chunks"] * 2


@pytest.mark.parametrize("with_resets", [False, True])
def test_gate_kernels_verify(verified, with_resets):
  b, t, d = 2, 96, 128
  fp = jax.ShapeDtypeStruct((b, t, d), jnp.bfloat16)
  resets = jnp.zeros((b, t), bool) if with_resets else None

  def loss(fp, ip, lb):
    return jnp.sum(mlgru_recurrence(fp, ip, lb, None, resets, "pallas")[0].astype(jnp.float32))

  _lower_for_cuda(jax.grad(loss, argnums=(0, 1, 2)), fp, fp, jax.ShapeDtypeStruct((d,), jnp.float32))
  assert verified[0] == ["mlgru_gate_scan_fwd", "mlgru_gate_scan_bwd"]


@pytest.mark.parametrize("group", ["one", "shared", "glu", "gate"])
def test_bitlinear_kernels_verify(verified, group):
  k, n = 256, 128
  x = jax.ShapeDtypeStruct((bl.KERNEL_MIN_ROWS, k), jnp.float32)
  vec, mat = jax.ShapeDtypeStruct((k,), jnp.float32), jax.ShapeDtypeStruct((k, n), jnp.float32)
  fns = {"one": lambda x, nw, w: bl.bitlinear(x, nw, w, impl="pallas"),
         "shared": lambda x, nw, w: bl.bitlinear_shared(x, (nw, nw), (w, w), impl="pallas"),
         "glu": lambda x, nw, w: bl.glu_mlp(x, nw, w, nw[:64], w[:64], impl="pallas"),
         "gate": lambda x, nw, w: bl.gated_bitlinear(x, -x, nw, nw, w, impl="pallas")}

  def loss(x, nw, w):
    return sum(jnp.sum(o.astype(jnp.float32)) for o in jax.tree.leaves(fns[group](x, nw, w)))

  _lower_for_cuda(jax.value_and_grad(loss, argnums=(0, 1, 2)), x, vec, mat)
  assert sorted(set(verified[0])) == ["bitlinear_act_codes", "bitlinear_bwd"]


def test_triton_report_lowers_every_kernel_of_a_layer():
  """`bench.triton_report` finds each Pallas kernel of one layer's training step (and the
  head's), with its first operand and warps; with the `triton` package installed it also
  compiles one for sm_90 and reads ptxas's registers and the SASS."""
  cfg = preset("micro", "mmfree", n_layers=1)
  try:
    found = triton_report.triton_modules(cfg, 2, 128)  # 256 rows: the kernels run
  except SystemExit as e:
    pytest.skip(str(e))
  assert collections.Counter(name for name, *_ in found) == {
      "bitlinear_act_codes": 5, "bitlinear_bwd": 5,  # f/i/g, o (gated), gate/up, down, head
      "mlgru_gate_scan_fwd": 1, "mlgru_gate_scan_bwd": 1}
  # the GLU's down projection reads the gate/up product [rows, 2I] in both of its kernels
  glu = [name for name, operand, *_ in found if operand == f"bfloat16[256,{2 * cfg.ffn}]"]
  assert glu == ["bitlinear_act_codes", "bitlinear_bwd"]
  for name, _, warps, text in found:
    assert text.startswith(f"module @{name} ")
    if name.startswith("bitlinear"):  # all rows are narrower than 24 columns per thread
      assert warps == bitlinear_pallas.warps_for(cfg.ffn) == 4
  pytest.importorskip("triton")
  name, _, warps, text = found[-1]
  r = triton_report.resources(text, warps)
  assert 0 < r["registers"] <= 255 and r["spill_stores"] >= 0
  assert r["instructions"] == sum(r["opcodes"].values()) > 0
  assert 0 < r["loop_instructions"] < r["instructions"]  # the backward's row loop
  assert r["opcodes"]["LDG"] > 0 and r["opcodes"]["STG"] > 0


def test_triton_report_counts_the_largest_loop():
  """`_largest_loop` on nvdisasm's layout (`nvdisasm -c`): labels on their own lines,
  branches back to them; a branch forward and EXIT's trailing self-branch are no loops."""
  sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   BRA `(.L_x_2) ;
.L_x_0:
        /*0020*/                   FADD R2, R2, R3 ;
.L_x_1:
        /*0030*/                   FMUL R2, R2, R3 ;
        /*0040*/               @P0 BRA `(.L_x_1) ;
        /*0050*/                   ISETP.NE.AND P1, PT, R4, RZ, PT ;
        /*0060*/               @P1 BRA `(.L_x_0) ;
.L_x_2:
        /*0070*/                   EXIT ;
.L_x_3:
        /*0080*/                   BRA `(.L_x_3);
.L_x_4:
        /*0090*/                   NOP;
"""
  assert triton_report._largest_loop(sass) == 5  # .L_x_0 .. its branch back (nested loop inside)
  assert triton_report._largest_loop(sass.split(".L_x_0:")[0]) == 0
