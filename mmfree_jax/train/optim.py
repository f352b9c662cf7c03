"""Learning-rate schedules of the paper (SPEC §3) and the AdamW optimizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("mmfree", "cosine", "constant")


def lr_schedule(peak: float, total_steps: int, warmup_steps: int, kind: str = "mmfree",
                min_ratio: float = 0.0) -> optax.Schedule:
  """Linear warmup, then

  - "mmfree": cosine from `peak` to 0, multiplied by 0.5 from the midpoint on (the
    paper's "halve the learning rate halfway" recipe);
  - "cosine": cosine from `peak` to `min_ratio * peak` (Transformer++: 0.1);
  - "constant".
  """
  if kind not in SCHEDULES:
    raise ValueError(f"optim.schedule={kind!r} is unknown; use one of {SCHEDULES}")
  total = max(int(total_steps), 1)
  warm = min(max(int(warmup_steps), 0), total - 1)

  def fn(step):
    step = jnp.asarray(step, jnp.float32)
    ramp = jnp.minimum((step + 1) / max(warm, 1), 1.0) if warm else 1.0
    frac = jnp.clip((step - warm) / max(total - warm, 1), 0.0, 1.0)
    cos = 0.5 * (1 + jnp.cos(jnp.pi * frac))
    if kind == "constant":
      lr = peak * jnp.ones_like(step)
    elif kind == "mmfree":
      lr = peak * cos * jnp.where(step >= total // 2, 0.5, 1.0)
    else:
      lr = peak * (min_ratio + (1 - min_ratio) * cos)
    return jnp.where(step < warm, peak * ramp, lr)

  return fn


def _decay_mask(params):
  """Decay matmul kernels and the embedding; not norms or lower bounds."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embed"), params)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW + global-norm clipping with the configured schedule.

  `optim.wd_off_at_midpoint` removes weight decay for the second half (BitNet recipe).
  """
  o = cfg.optim
  warm = int(round(o.warmup_frac * total_steps)) if o.warmup_steps < 0 else o.warmup_steps
  sched = lr_schedule(o.peak_lr, total_steps, warm, o.schedule, o.min_lr_ratio)
  half = total_steps // 2
  wd = (lambda step: jnp.where(step >= half, 0.0, o.weight_decay)) if o.wd_off_at_midpoint \
      else o.weight_decay
  tx = optax.chain(
      optax.clip_by_global_norm(o.clip) if o.clip > 0 else optax.identity(),
      optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
      optax.inject_hyperparams(optax.add_decayed_weights, static_args=("mask",))(
          weight_decay=wd, mask=_decay_mask),
      optax.scale_by_learning_rate(sched),
  )
  return tx, sched
