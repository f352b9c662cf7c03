"""Learning-rate schedules of the paper (SPEC §3), the AdamW optimizer, and the LR plan a
resumed run follows.

The LR plan (stored in every checkpoint's `meta`) is the schedule of the config that started
the run (`steps` + the `optim` keys) plus any extensions `[start, lr, end]`. Resuming with
another `train.steps` or schedule (`train.on_schedule_change`):
  - "refuse" (default): one line naming the change and the LR jump it would cause;
  - "continue" (train.steps changed only): from the resume step the LR goes on from the value
    the old plan has there, along a cosine to the schedule's floor (0 for "mmfree",
    `min_lr_ratio * peak_lr` for "cosine"; "constant" stays) at the new `train.steps`; the
    midpoint events of the original schedule (LR halving, weight decay off) keep their step;
  - "restart": the new config's schedule from this step on (the LR may jump; a note says so).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mmfree_jax.config import ConfigError

SCHEDULES = ("mmfree", "cosine", "constant")
SCHEDULE_CHANGES = ("refuse", "continue", "restart")
_PLAN_OPTIM_KEYS = ("peak_lr", "schedule", "min_lr_ratio", "warmup_frac", "warmup_steps",
                    "wd_off_at_midpoint")


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


def _extended(base: optax.Schedule, extensions, kind: str, floor: float) -> optax.Schedule:
  """`base`, then from each extension's start a cosine from its LR to `floor` at its end."""
  if not extensions:
    return base

  def fn(step):
    lr = base(step)
    stepf = jnp.asarray(step, jnp.float32)
    for start, lr0, end in extensions:
      frac = jnp.clip((stepf - start) / max(end - start, 1), 0.0, 1.0)
      ext = lr0 if kind == "constant" else floor + (lr0 - floor) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
      lr = jnp.where(stepf >= start, ext, lr)
    return lr

  return fn


def _decay_mask(params):
  """Decay matmul kernels and the embedding; not norms or lower bounds."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embed"), params)


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int,
                   extensions: Any = ()) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW + global-norm clipping with the configured schedule over `total_steps`, extended
  by `extensions` ([start, lr, end] each, see the module docstring).

  `optim.wd_off_at_midpoint` removes weight decay for the second half (BitNet recipe).
  """
  o = cfg.optim
  warm = int(round(o.warmup_frac * total_steps)) if o.warmup_steps < 0 else o.warmup_steps
  floor = o.peak_lr * (o.min_lr_ratio if o.schedule == "cosine" else 0.0)
  sched = _extended(lr_schedule(o.peak_lr, total_steps, warm, o.schedule, o.min_lr_ratio),
                    extensions, o.schedule, floor)
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


def lr_plan(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The LR plan of a run started with `cfg`: its schedule over `train.steps`."""
  return {"steps": int(cfg.train.steps), "optim": {k: cfg.optim[k] for k in _PLAN_OPTIM_KEYS},
          "extensions": []}


def plan_optimizer(cfg: ml_collections.ConfigDict, plan: dict[str, Any]):
  """`make_optimizer` for an LR plan (its optim keys equal `cfg`'s)."""
  return make_optimizer(cfg, plan["steps"], [tuple(e) for e in plan["extensions"]])


def _plan_end(plan: dict[str, Any]) -> int:
  return plan["extensions"][-1][2] if plan["extensions"] else plan["steps"]


def resume_plan(cfg: ml_collections.ConfigDict, saved: dict[str, Any] | None,
                step: int) -> tuple[dict[str, Any], str | None]:
  """The LR plan to resume at `step` given the checkpoint's plan, and a note for the log when
  it changes; ConfigError (one line) when `train.on_schedule_change` does not allow the change."""
  new = lr_plan(cfg)
  if saved is None:
    note = (f"note: checkpoint step {step} stores no LR plan (an older checkpoint); following "
            "this config's schedule from there" if step else None)
    return new, note
  changed = [f"optim.{k}={saved['optim'][k]!r} -> {new['optim'][k]!r}" for k in _PLAN_OPTIM_KEYS
             if saved["optim"][k] != new["optim"][k]]
  if _plan_end(saved) != new["steps"]:
    changed.insert(0, f"train.steps={_plan_end(saved)} -> {new['steps']}")
  if not changed:
    return saved, None
  old_cfg = ml_collections.ConfigDict(cfg.to_dict())
  old_cfg.optim.update(saved["optim"])
  old_lr = float(plan_optimizer(old_cfg, saved)[1](step))
  new_lr = float(make_optimizer(cfg, new["steps"])[1](step))
  what = f"resuming at step {step} with {', '.join(changed)}"
  mode = cfg.train.on_schedule_change
  if mode == "restart":
    return new, f"note: {what}: the new schedule takes over; the LR goes {old_lr:.3g} -> {new_lr:.3g}"
  if mode == "continue" and len(changed) == 1 and changed[0].startswith("train.steps") \
      and new["steps"] > step:
    plan = {**saved, "extensions": [*saved["extensions"], [step, old_lr, new["steps"]]]}
    return plan, (f"note: {what}: the LR continues from {old_lr:.3g} along a cosine to the "
                  f"schedule's floor at step {new['steps']}")
  why = ("train.on_schedule_change=continue extends train.steps only (beyond the resume step)"
         if mode == "continue" else
         f"the LR would jump {old_lr:.3g} -> {new_lr:.3g}; set train.on_schedule_change=continue "
         "(keep the LR, decay to the new end) or =restart (take the new schedule)")
  raise ConfigError(f"{what}: {why}, or use a new --workdir")
