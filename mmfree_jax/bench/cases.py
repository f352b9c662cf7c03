"""The benchmark cases by kind. Each returns a flat dict of numbers; run one per process for
clean peak-memory readings (`python -m mmfree_jax.bench` does that). Timing: compile, 2
warm-up calls, the median of repeated calls blocked on the result (`measure.median_time`);
synthetic random tokens, no data stack involved."""

from __future__ import annotations

from typing import Callable

from mmfree_jax.bench.kernels import (bitlinear_bwd_case, bitlinear_case, bitlinear_codes_case,
                                      gates_case, gemm_case, recurrence_case)
from mmfree_jax.bench.steps import decode_case, profile_case, train_case

CASES: dict[str, Callable[..., dict]] = {
    "bitlinear": bitlinear_case, "bitlinear_bwd": bitlinear_bwd_case,
    "bitlinear_codes": bitlinear_codes_case, "gemm": gemm_case,
    "recurrence": recurrence_case, "gates": gates_case, "train": train_case, "profile": profile_case,
    "decode": decode_case}
