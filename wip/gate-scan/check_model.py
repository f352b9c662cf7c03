"""CPU: loss and grads of a micro MatMul-free LM, committed MLGRU vs the gate-scan variant
(run twice: PYTHONPATH=variant with GATE_SCAN_INTERPRET=1, and without; compare the .npz)."""
import sys, numpy as np, jax, jax.numpy as jnp
import mmfree_jax.layers.mlgru as m
from mmfree_jax.config import preset
from mmfree_jax.models import LM
print("mlgru from", m.__file__)
cfg = preset("micro", "mmfree", scan_impl="pallas", bitlinear_impl="xla")
model = LM(cfg)
tok = jax.random.randint(jax.random.key(0), (2, 32), 0, cfg.vocab_size)
params = model.init(jax.random.key(1), tok)["params"]
def loss(p):
  seg = jnp.asarray([[1] * 10 + [2] * 22, [1] * 32])
  logits, _ = model.apply({"params": p}, tok, seg if "seg" in sys.argv else None)
  return jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0].mean()
l, g = jax.value_and_grad(loss)(params)
flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(g)}
np.savez(sys.argv[1], loss=np.asarray(l), **flat)
print("loss", float(l))
