"""Autoregressive generation with a KV cache, adapters kept factored, one compiled decode step.

``generate`` prefills the (left-padded) prompt batch in one pass into a fixed-size cache, then
runs one jitted ``decode_step`` per new token: the step's inputs are arrays of fixed shape (the
slot to write is an int array, not a Python int), so it compiles once per (model, batch, cache
size, sampling settings) and never for a new position. Adapters go through ``lj.apply`` (the
'lora' collection), so a bank from ``lj.stack_adapters`` routes per example with
``adapter_ids``; ``adapters=None`` (or ``{}``) runs the base or a merged model. Greedy decoding
(``temperature=0``) and sampling (temperature, top-k, top-p); per-example EOS stop. Also here:
``greedy_exact_match``, exact match by real decoding on the task arrays of ``lora_jax.data``.
The models' cache plumbing lives in ``models/gpt2.py`` and ``models/llama.py``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import transform
from lora_jax.models import gpt2, llama


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Static sampling settings: ``temperature`` 0 is greedy; ``top_k`` 0, ``top_p`` 1 are off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"bad sampling settings {self}: need temperature >= 0, top_k >= 0 "
                             "and 0 < top_p <= 1")


def init_cache(model, batch: int, n_slots: int):
    """A zero KV cache for ``model`` (GPT2 or Llama): ``{'k', 'v'}`` (layers, batch, slots, ...)."""
    if isinstance(model, gpt2.GPT2):
        return gpt2.init_cache(model.cfg, batch, n_slots)
    if isinstance(model, llama.Llama):
        return llama.init_cache(model.cfg, batch, n_slots)
    raise TypeError(f"generation needs a lora_jax GPT2 or Llama model, got {type(model).__name__}")


def sample(logits, rng, sampling: Sampling):
    """Next tokens (batch,) int32 from logits (batch, vocab) float32."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        ranked = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ranked, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < sampling.top_p  # the top token always stays
        cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _forward(model, params, adapters, tokens, adapter_ids, **kw):
    return transform.apply(model, params, adapters or {}, tokens, adapter_ids=adapter_ids,
                           deterministic=True, **kw)


@functools.partial(jax.jit, static_argnames=("model",))
def prefill(model, params, adapters, prompt, prompt_mask, cache, adapter_ids=None):
    """Runs the whole prompt through the model in one pass, filling cache slots [0, P).

    Args:
      prompt: int32 (batch, P), left-padded; prompt_mask: bool (batch, P), False at pads.
      cache: from ``init_cache`` with n_slots >= P.
    Returns:
      ``(logits, cache, kv_mask, next_pos)``: the last prompt slot's logits (batch, vocab), the
      filled cache, the cache's valid-slot mask (batch, slots), each row's next position (batch,).
    """
    n_slots, p = cache["k"].shape[2], prompt.shape[1]
    kv_mask = jnp.concatenate([prompt_mask, jnp.ones((prompt.shape[0], n_slots - p), bool)], 1)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    logits, cache = _forward(model, params, adapters, prompt, adapter_ids, positions=positions,
                             kv_mask=kv_mask, cache=cache, cache_index=jnp.int32(0))
    return logits[:, -1], cache, kv_mask, positions[:, -1] + 1


@functools.partial(jax.jit, static_argnames=("model",))
def decode_step(model, params, adapters, tokens, positions, slot, kv_mask, cache,
                adapter_ids=None):
    """One token per example through the cached model.

    Args:
      tokens, positions: int32 (batch,); slot: int32 scalar, the cache slot to write.
      kv_mask: bool (batch, slots); cache: the cache so far.
    Returns:
      ``(logits (batch, vocab), cache)``.
    """
    logits, cache = _forward(model, params, adapters, tokens[:, None], adapter_ids,
                             positions=positions[:, None], kv_mask=kv_mask, cache=cache,
                             cache_index=slot)
    return logits[:, 0], cache


_sample = jax.jit(sample, static_argnames=("sampling",))


def generate(model, params, adapters, prompt_tokens, max_new_tokens: int, *, prompt_mask=None,
             adapter_ids=None, eos_id: int | None = None, pad_id: int = 0,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, rng=None,
             return_logits: bool = False):
    """Generates ``max_new_tokens`` tokens per prompt with a KV cache.

    Args:
      model: a lora_jax ``GPT2`` or ``Llama`` module; params: its base parameters.
      adapters: from ``lj.init_adapters`` (kept factored), a bank from ``lj.stack_adapters`` (with
        ``adapter_ids``), or None for the base (or a merged) model.
      prompt_tokens: int (batch, P), LEFT-padded: every row's last column is a real token.
      max_new_tokens: tokens to generate; the cache has P + max_new_tokens slots.
      prompt_mask: bool (batch, P), False at pad tokens (default: no padding).
      adapter_ids: int (batch,) bank slots, -1 = base only (banks only).
      eos_id: a row stops after it emits this token; later positions hold ``pad_id``.
      temperature, top_k, top_p: 0 = greedy; otherwise sampled with ``rng`` (a PRNG key).
      return_logits: also return the logits each token was chosen from.
    Returns:
      int32 (batch, max_new_tokens), and with ``return_logits`` float32 (batch, max_new_tokens,
      vocab) (rows that stopped keep computing; their logits are not meaningful).

    Example:
      >>> out = lj.generate(model, params, adapters, prompt, 16, eos_id=tok.eos_id)
    """
    sampling = Sampling(float(temperature), int(top_k), float(top_p))
    if sampling.temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs rng=jax.random.key(seed)")
    prompt = jnp.asarray(prompt_tokens, jnp.int32)
    if prompt.ndim != 2 or max_new_tokens < 1:
        raise ValueError(f"prompt_tokens must be (batch, P) and max_new_tokens >= 1; got shape "
                         f"{prompt.shape} and {max_new_tokens}")
    mask = jnp.ones(prompt.shape, bool) if prompt_mask is None else jnp.asarray(prompt_mask, bool)
    _check_left_padded(mask)
    batch, p = prompt.shape
    cache = init_cache(model, batch, p + max_new_tokens)
    logits, cache, kv_mask, pos = prefill(model, params, adapters, prompt, mask, cache,
                                          adapter_ids)
    done = jnp.zeros((batch,), bool)
    out, seen = [], []
    rng = jax.random.key(0) if rng is None else rng
    for t in range(max_new_tokens):
        token = _sample(logits, jax.random.fold_in(rng, t), sampling)
        token = jnp.where(done, pad_id, token)
        out.append(token)
        seen.append(logits)
        if eos_id is not None:
            done = done | (token == eos_id)
            if bool(done.all()):
                break
        if t + 1 < max_new_tokens:
            logits, cache = decode_step(model, params, adapters, token, pos + t,
                                        jnp.int32(p + t), kv_mask, cache, adapter_ids)
    tokens = jnp.stack(out, 1)
    tokens = jnp.pad(tokens, ((0, 0), (0, max_new_tokens - tokens.shape[1])),
                     constant_values=pad_id)
    if not return_logits:
        return tokens
    logits = jnp.stack(seen, 1)
    return tokens, jnp.pad(logits, ((0, 0), (0, max_new_tokens - logits.shape[1]), (0, 0)))


def _check_left_padded(mask) -> None:
    if isinstance(mask, jax.core.Tracer):
        return
    m = np.asarray(mask)
    if not m[:, -1].all() or (np.diff(m.astype(np.int8), axis=1) < 0).any():
        raise ValueError("prompts must be LEFT-padded: in each row of prompt_mask the pads (False) "
                         "come first and the last column is a real token; move the padding left")


def left_pad(rows, pad_id: int = 0, width: int | None = None):
    """Python token lists -> (tokens int32 (batch, P), mask bool (batch, P)), padded on the left
    to ``width`` (default: the longest row)."""
    width = max(len(r) for r in rows) if width is None else width
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        if r:
            tokens[i, width - len(r):], mask[i, width - len(r):] = r, True
    return tokens, mask


def _answer_span(loss_mask_row) -> tuple[int, int]:
    idx = np.flatnonzero(np.asarray(loss_mask_row) > 0)
    if idx.size == 0 or (np.diff(idx) != 1).any():
        raise ValueError("greedy_exact_match needs one contiguous answer span (loss_mask > 0) per "
                         "row, as lora_jax.data.make_task_dataset makes; packed rows have several")
    return int(idx[0]), int(idx[-1]) + 1


def greedy_exact_match(model, params, adapters, arrays, batch_size: int = 64,
                       pad_id: int = 0) -> np.ndarray:
    """Exact match by real greedy decoding on task arrays (``inputs``, ``targets``, ``loss_mask``).

    Row i's prompt is ``inputs[i, :s+1]`` and its answer ``targets[i, s:e]`` for its answer span
    [s, e) (the loss positions); it is correct when the first e - s generated tokens equal the
    answer. Returns bool (N,), comparable with ``lora_jax.data.exact_match`` (teacher-forced).
    """
    inputs, targets = np.asarray(arrays["inputs"]), np.asarray(arrays["targets"])
    spans = [_answer_span(m) for m in np.asarray(arrays["loss_mask"])]
    width, n = max(s for s, _ in spans) + 1, max(e - s for s, e in spans)  # one compile for all
    correct = []
    for lo in range(0, len(inputs), batch_size):
        rows = list(range(lo, min(lo + batch_size, len(inputs))))
        full = rows + [rows[-1]] * (min(batch_size, len(inputs)) - len(rows))  # same shapes
        prompt, mask = left_pad([inputs[i, : spans[i][0] + 1].tolist() for i in full], pad_id,
                                width)
        out = np.asarray(generate(model, params, adapters, prompt, n, prompt_mask=mask))
        for j, i in enumerate(rows):
            s, e = spans[i]
            correct.append(bool((out[j, : e - s] == targets[i, s:e]).all()))
    return np.array(correct, bool)
