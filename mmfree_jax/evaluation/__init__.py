"""Zero-shot evaluation: multiple-choice tasks from local JSONL (`tasks`), perplexity
(`perplexity`), batched log-likelihoods (`scoring`) and an lm-evaluation-harness adapter
(`lm_eval_adapter`, optional). CLI: `python -m mmfree_jax.evaluation --help`.
"""
