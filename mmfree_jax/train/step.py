"""Train state, loss, and the pure train / eval step functions (jitted by the loop).

Call the jitted steps under `jax.set_mesh(mesh)` so the model's logical activation
constraints bind to the mesh.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mmfree_jax import sharding
from mmfree_jax.config import ModelConfig
from mmfree_jax.models import LM, init_params
from mmfree_jax.sharding import RULES

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: batches consumed so far
  params: Any              # float32 master weights
  opt_state: Any
  skipped: jax.Array       # int32 scalar: non-finite steps whose update was dropped


def loss_sums(cfg: ModelConfig, params, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted token cross-entropies, sum of weights) for one batch."""
  with nn.logical_axis_rules(RULES):
    logits, _ = LM(cfg).apply({"params": params}, batch["inputs"], batch.get("segment_ids"))
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  w = batch["weights"].astype(jnp.float32)
  return jnp.sum(ce * w), jnp.sum(w)


def _microbatches(batch: Batch, n: int) -> Batch:
  """[B, ...] -> [n, B/n, ...], interleaved so every micro-batch spans all devices."""
  return jax.tree.map(lambda x: jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1),
                      batch)


def make_train_step(cfg: ModelConfig, tx: optax.GradientTransformation, grad_accum: int = 1,
                    schedule: optax.Schedule | None = None):
  """Returns `step(state, batch) -> (state, metrics)`.

  A non-finite loss or gradient norm leaves the state unchanged (and counts it in
  `state.skipped`), so a NaN can never reach the parameters or a checkpoint; the loop
  decides whether to abort or go on.
  """
  grad_fn = jax.value_and_grad(lambda p, b: loss_sums(cfg, p, b), has_aux=True)

  def step(state: TrainState, batch: Batch):
    if grad_accum == 1:
      (loss_sum, ntok), grads = grad_fn(state.params, batch)
    else:
      def body(carry, mb):
        (ls, nt), g = grad_fn(state.params, mb)
        acc_l, acc_n, acc_g = carry
        return (acc_l + ls, acc_n + nt, jax.tree.map(jnp.add, acc_g, g)), None
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (loss_sum, ntok, grads), _ = jax.lax.scan(
          body, (jnp.zeros(()), jnp.zeros(()), zeros), _microbatches(batch, grad_accum))
    denom = jnp.maximum(ntok, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = loss_sum / denom
    gnorm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        skipped=state.skipped + (~finite).astype(jnp.int32))
    metrics = {"loss": loss, "grad_norm": gnorm, "tokens": ntok, "finite": finite}
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    return new_state, metrics

  return step


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh, seed: int) -> TrainState:
  """Parameters and optimizer state created directly with their shardings."""
  key = jax.random.key(seed)
  boxed = jax.eval_shape(functools.partial(init_params, cfg), key)
  param_sh = sharding.logical_shardings(boxed, mesh)
  params = jax.jit(lambda k: nn.unbox(init_params(cfg, k)), out_shardings=param_sh)(key)
  opt_sh = sharding.opt_state_shardings(tx, params, param_sh, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
  rep = sharding.replicated(mesh)
  zero = lambda: jax.device_put(jnp.zeros((), jnp.int32), rep)
  return TrainState(step=zero(), params=params, opt_state=opt_state, skipped=zero())


def make_eval_step(cfg: ModelConfig):
  """Returns `eval_step(params, batch) -> (loss_sum, n_tokens)`."""
  return lambda params, batch: loss_sums(cfg, params, batch)
