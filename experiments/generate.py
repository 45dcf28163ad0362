"""Prints greedy (or sampled) completions of a finished run, for the base and the adapted model.

    python -m experiments.generate --workdir=runs/lora --prompt="reverse: abc=" --prompt="add: 2+3="
    python -m experiments.generate --workdir=runs/lora --prompt="sort: cab=" --temperature=0.8
    python -m experiments.generate --workdir=runs/lora --eval  # exact match: forced vs decoded

The run is rebuilt from its ``run.json``: the tokenizer, the model, the frozen base (loaded from
the cache the trainer wrote, or from the HF checkpoint; quantised as in training) and the export
(``adapter/`` for adapter methods, ``params/`` for full fine-tuning). Prompts follow the
training format: ``[BOS] prompt``; generation stops at EOS. Per-task methods (MTL-LoRA, per-task
LoRA) need task ids and are not supported here.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import lora_jax as lj
from lora_jax import data as D
from lora_jax import io
from lora_jax.generate import left_pad
from lora_jax.train import Experiment, from_dict
from lora_jax.train import trainer

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished run's directory (has run.json).")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text (repeat for a batch).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 16, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_EVAL = flags.DEFINE_bool("eval", False, "Print the eval split's exact match, teacher-forced and "
                          "by greedy decoding (task data only).")
flags.mark_flags_as_required(["workdir"])


def load_run(workdir: Path):
    """``(cfg, tokenizer, model, base_params, adapted)``: ``adapted`` is ``(params, adapters)``."""
    run = workdir / "run.json"
    if not run.is_file():
        raise FileNotFoundError(f"{run} is missing: is {workdir} a run's workdir?")
    identity = json.loads(run.read_text())
    identity.pop("recorded", None)  # environment and data digests, not config fields
    cfg = from_dict(Experiment, identity, str(run))
    tokenizer = D.get_tokenizer(cfg.data.tokenizer)
    model, _, hf_params = trainer.build_model(cfg.model, tokenizer.vocab_size)
    example = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
    params = trainer.base_params(cfg, model, hf_params, example)
    params = trainer.quantize_base(cfg, model, params, example)
    if cfg.full_finetune:
        return cfg, tokenizer, model, params, (io.load_params(workdir / "params"), None)
    adapters, _ = io.load_adapters(workdir / "adapter", params)
    routing = [m.name for m in lj.methods.methods_of(adapters)
               if type(m).merge_task is not lj.Method.merge_task]
    if routing:
        raise ValueError(f"method {routing[0]!r} routes by task id; generation here supports "
                         "methods without routing (merge one task: lj.merge(..., task=t))")
    return cfg, tokenizer, model, params, (params, adapters)


def complete(model, params, adapters, tokenizer, prompts, **kw) -> list[str]:
    """Decoded completions of ``prompts`` (text), each prefixed with BOS."""
    tokens, mask = left_pad([[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts],
                            tokenizer.pad_id)
    out = lj.generate(model, params, adapters, tokens, prompt_mask=mask,
                      eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, **kw)
    return [tokenizer.decode([t for t in row if t != tokenizer.eos_id]) for row in out.tolist()]


def exact_match_both(cfg, tokenizer, model, params, adapters, batch_size: int = 64) -> dict:
    """Per-task exact match on the run's eval split, teacher-forced and by greedy decoding."""
    _, arrays, tasks = trainer.load_data(cfg.data, tokenizer)
    forward = jax.jit(lambda p, a, x: jnp.argmax(lj.apply(model, p, a or {}, x), -1))
    inputs = arrays["inputs"]
    pred = np.concatenate([np.asarray(forward(params, adapters, inputs[i: i + batch_size]))
                           for i in range(0, len(inputs), batch_size)])
    teacher = D.exact_match(pred, arrays["targets"], arrays["loss_mask"])
    decoded = lj.greedy_exact_match(model, params, adapters, arrays, batch_size, tokenizer.pad_id)
    return {"teacher_forced": D.per_task_accuracy(teacher, arrays["task_ids"], tasks),
            "greedy_decoding": D.per_task_accuracy(decoded, arrays["task_ids"], tasks),
            "rows_that_disagree": int((teacher != decoded).sum())}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _PROMPT.value and not _EVAL.value:
        raise app.UsageError("pass --prompt=TEXT (repeatable) and/or --eval")
    cfg, tokenizer, model, base, (params, adapters) = load_run(Path(_WORKDIR.value))
    if _EVAL.value:
        for name, (p, a) in {"base": (base, None), "adapted": (params, adapters)}.items():
            print(name, json.dumps(exact_match_both(cfg, tokenizer, model, p, a), indent=1))
    if not _PROMPT.value:
        return
    kw = dict(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
              top_p=_TOP_P.value, rng=jax.random.key(_SEED.value))
    prompts = _PROMPT.value
    base_out = complete(model, base, None, tokenizer, prompts, **kw)
    adapted_out = complete(model, params, adapters, tokenizer, prompts, **kw)
    for prompt, b, a in zip(prompts, base_out, adapted_out):
        print(f"prompt:  {prompt!r}\n  base:    {b!r}\n  adapted: {a!r}")


if __name__ == "__main__":
    app.run(main)
