"""lm-evaluation-harness adapter: registers model "mmfree_jax" when `lm_eval` is installed.

    python -m mmfree_jax.evaluation.lm_eval_adapter --model mmfree_jax \
        --model_args checkpoint=DIR --tasks arc_easy     # lm_eval CLI, with the model registered

    import mmfree_jax.evaluation.lm_eval_adapter  # registers the model
    import lm_eval
    lm_eval.simple_evaluate(model="mmfree_jax", model_args="checkpoint=DIR,batch_size=16",
                            tasks=["arc_easy", "piqa"])

`MMFreeJaxLM` holds the logic and needs no lm_eval (requests are any objects with an
`.args` tuple, as lm_eval's `Instance`); `register()` builds the registered subclass of
`lm_eval.api.model.LM`. Note: lm-eval's own HF adapter adds no bos for causal LMs;
this one prepends bos by default (`add_bos=False` to match).
"""

from __future__ import annotations

from typing import Any, Sequence

from mmfree_jax.data.tokenizer import load_tokenizer
from mmfree_jax.evaluation.scoring import Scorer
from mmfree_jax.evaluation.tasks import encode_pair
from mmfree_jax.infer import generate as gen
from mmfree_jax.infer.sampling import Sampling
from mmfree_jax.interop.checkpoint import load_model, tokenizer_file

MODEL_NAME = "mmfree_jax"


class MMFreeJaxLM:
  """loglikelihood / loglikelihood_rolling / generate_until over one loaded model."""

  def __init__(self, checkpoint: str | None = None, tokenizer: Any = None, batch_size: Any = 8,
               max_length: int = 2048, dtype: str | None = None, add_bos: bool = True,
               cfg=None, params=None, **unused: Any):
    del unused  # lm-eval passes device, max_batch_size, ...
    if cfg is None:
      cfg, params = load_model(checkpoint, dtype=dtype)
    if tokenizer is None and checkpoint is not None:
      tokenizer = tokenizer_file(checkpoint)
    if tokenizer is None or isinstance(tokenizer, str):
      tokenizer = load_tokenizer(tokenizer)
    bs = 8 if str(batch_size).startswith("auto") else int(batch_size)
    self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
    self.scorer = Scorer(cfg, params, bs, int(max_length))
    self.add_bos = bool(add_bos)

  def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
    pairs = [encode_pair(self.tokenizer, *r.args[:2], add_bos=self.add_bos) for r in requests]
    return self.scorer.loglikelihood(pairs)

  def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
    out = []
    for r in requests:
      ids = [self.tokenizer.bos_id if self.add_bos else self.tokenizer.eos_id]
      out.append(-self.scorer.rolling_nll(ids + list(self.tokenizer.encode(r.args[0])))[0])
    return out

  def generate_until(self, requests: Sequence[Any]) -> list[str]:
    out = []
    for r in requests:
      context, kw = r.args[0], dict(r.args[1] if len(r.args) > 1 else {})
      until = kw.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(kw.get("max_gen_toks", 256))
      temp = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
      sampling = Sampling(temp, int(kw.get("top_k", 0) or 0), float(kw.get("top_p", 1.0) or 1.0))
      ids = ([self.tokenizer.bos_id] if self.add_bos else []) + list(
          self.tokenizer.encode(context))
      ids = ids[-max(self.scorer.max_length - max_new, 1):]
      res = gen.generate(self.cfg, self.params, [ids], max_new, sampling, self.tokenizer.eos_id)
      text = self.tokenizer.decode(res.row(0))
      for stop in until:
        if stop and stop in text:
          text = text[: text.index(stop)]
      out.append(text)
    return out


def register():
  """Registers "mmfree_jax" with lm_eval (ImportError if lm_eval is absent)."""
  from lm_eval.api.model import LM  # pylint: disable=import-outside-toplevel
  from lm_eval.api.registry import register_model  # pylint: disable=import-outside-toplevel

  @register_model(MODEL_NAME)
  class LmEvalMMFreeJax(MMFreeJaxLM, LM):  # pylint: disable=unused-variable
    def __init__(self, **kw):
      LM.__init__(self)
      MMFreeJaxLM.__init__(self, **kw)

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
      # The harness passes --batch_size/--device again in additional_config; model_args win.
      extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
      return cls(**{**extra, **arg_dict})

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
      from lm_eval.utils import simple_parse_args_string  # pylint: disable=import-outside-toplevel
      return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

  return LmEvalMMFreeJax


try:
  import lm_eval  # noqa: F401  pylint: disable=unused-import
except ImportError:
  pass
else:
  register()


def main():
  """`python -m mmfree_jax.evaluation.lm_eval_adapter <lm_eval CLI args>`.

  The harness has no plugin discovery for models, so this wrapper imports (registers) the
  adapter and then runs lm_eval's own CLI, e.g.
  `... --model mmfree_jax --model_args checkpoint=runs/tiny/model --tasks arc_easy`.
  """
  try:
    from lm_eval.__main__ import cli_evaluate  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise SystemExit("error: lm-eval is not installed; `pip install lm-eval` first") from None
  cli_evaluate()


if __name__ == "__main__":
  main()
