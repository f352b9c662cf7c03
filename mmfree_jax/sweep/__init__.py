"""Scaling sweeps: a sweep file's points (`spec`), their plan (`plan`), running them
(`runner`) and the CLI (`python -m mmfree_jax.sweep`); the results table is
`mmfree_jax.scaling.results`."""

from mmfree_jax.sweep.plan import format_plan, plan
from mmfree_jax.sweep.runner import command, is_finished, run_sweep
from mmfree_jax.sweep.spec import Sweep, SweepError, load_sweep, parse_sets, point_config, select

__all__ = ["Sweep", "SweepError", "command", "format_plan", "is_finished", "load_sweep",
           "parse_sets", "plan", "point_config", "run_sweep", "select"]
