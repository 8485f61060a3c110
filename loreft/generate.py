"""Generation with a ReFT adapter, on mlx-lm's own generation machinery.

The interventions edit the prompt positions during prefill only. Later tokens see the edit through the
KV cache, which is exactly what recomputing the whole sequence with the edit on the prompt would give,
so decode steps run the plain model (ReftBlock skips calls past Locations.end).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from mlx_lm.generate import GenerationResponse, PromptProcessingBatch, StopSequences, generation_stream
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from .config import ConfigError, check_number
from .data import encode_prompt
from .model import Reft
from .positions import Locations

# Which template variable a user's prompt fills, in order of preference (else the template's first one).
PROMPT_VARIABLES = ("instruction", "prompt")


# ---------------------------------------------------------------------------------------------------
# Prompt formatting: the same template the adapter was trained with


def template_variables(template: str) -> list[str]:
    """The variables a jinja2 template reads, in order of first appearance."""
    from jinja2 import Environment, TemplateSyntaxError, nodes

    try:
        ast = Environment().parse(template)
    except TemplateSyntaxError as e:
        raise ConfigError("prompt_template", template, f"not a valid jinja2 template ({e})") from e
    assigned = {n.name for n in ast.find_all(nodes.Name) if n.ctx in ("store", "param")}
    names: list[str] = []
    for n in ast.find_all(nodes.Name):
        if n.ctx == "load" and n.name not in assigned and n.name not in names:
            names.append(n.name)
    return names


def render_prompt_template(template: str, text: str) -> str:
    """Render a row-level prompt template for a bare user prompt.

    The text fills 'instruction' or 'prompt' when the template reads one of them, else the template's
    first variable; every other variable is empty (so Alpaca's optional {% if input %} block drops out).
    """
    from .data import jinja_env  # the environment training rendered rows with

    names = template_variables(template)
    if not names:
        raise ConfigError("prompt_template", template, "has no variable for the prompt text (e.g. {{ instruction }})")
    target = next((v for v in PROMPT_VARIABLES if v in names), names[0])
    row = {name: "" for name in names}
    row[target] = text
    return jinja_env().from_string(template).render(row)


def format_prompt(tokenizer, text: str, formatting: dict | None = None) -> str:
    """The prompt as the adapter saw prompts in training: its prompt template or its chat template.

    formatting is reft_config.json's "formatting": {"prompt_template": str | None, "chat": bool}.
    None (or {}) means raw text. chat wins over a template, as in data.Formatter's chat mode: the text
    becomes the one user message of the tokenizer's chat template, with the generation prompt.
    """
    if not formatting:
        return text
    if not isinstance(formatting, dict):
        raise ConfigError("formatting", formatting, "expected a dict with keys 'prompt_template' and 'chat'")
    template, chat = formatting.get("prompt_template"), formatting.get("chat", False)
    if template is not None and not isinstance(template, str):
        raise ConfigError("formatting.prompt_template", template, "expected a jinja2 template string or null")
    if not isinstance(chat, bool):
        raise ConfigError("formatting.chat", chat, "expected true or false")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("formatting.chat", chat, "the adapter was trained with a chat template, but this tokenizer has none")
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return render_prompt_template(template, text) if template else text


# ---------------------------------------------------------------------------------------------------
# Generation


@contextlib.contextmanager
def editing(model: nn.Module, reft: Reft | None, locations: Locations | None):
    """Edit at these locations (None: the base model) in eval mode; always cleared afterwards."""
    was_training = model.training
    model.eval()  # no intervention dropout while generating
    if reft is not None:
        reft.set_locations(locations)
    try:
        yield
    finally:
        if reft is not None:
            reft.set_locations(None)
        model.train(was_training)


def check_sampling(max_tokens, temp: float, top_p: float) -> None:
    """Raise ConfigError unless max_tokens (one, or one per prompt), temp and top_p are usable."""
    for m in max_tokens if isinstance(max_tokens, (list, tuple)) else [max_tokens]:  # one, or one per prompt
        check_number("max_tokens", m, 1, integer=True)
    check_number("temp", temp, 0)  # 0: greedy
    check_number("top_p", top_p, None, 1, above=0)


def _prompt_ids(tokenizer, prompt: str | list[int]) -> list[int]:
    ids = encode_prompt(tokenizer, prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    if not ids:
        raise ConfigError("prompt", prompt, "must not be empty: interventions edit prompt tokens")
    return ids


def stream_responses(
    model: nn.Module,
    tokenizer,
    prompt: str | list[int],
    reft: Reft | None = None,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    prefill_step_size: int = 2048,
) -> Iterator[GenerationResponse]:
    """mlx-lm's GenerationResponse per token (text piece, token, speeds), with the adapter on the prompt.

    prompt: formatted text (see format_prompt) or token ids. reft=None leaves the model as it is.
    """
    check_sampling(max_tokens, temp, top_p)
    ids = _prompt_ids(tokenizer, prompt)
    locations = reft.locations([len(ids)]) if reft is not None else None
    sampler = make_sampler(temp=float(temp), top_p=float(top_p))

    def run():
        if seed is not None:
            mx.random.seed(seed)
        # Locations.end = len(ids): the wrapper edits prefill chunks (shifted by the cache offset) and
        # skips every decode step, whose cache offset is past the prompt.
        with editing(model, reft, locations):
            yield from mlx_lm.stream_generate(
                model, tokenizer, ids, max_tokens=max_tokens, sampler=sampler, prefill_step_size=prefill_step_size
            )

    return run()


def stream_generate(model: nn.Module, tokenizer, prompt: str | list[int], reft: Reft | None = None, **kwargs) -> Iterator[str]:
    """Text pieces as they are generated (same arguments as stream_responses)."""
    responses = stream_responses(model, tokenizer, prompt, reft, **kwargs)
    return (r.text for r in responses if r.text)


def generate(model: nn.Module, tokenizer, prompt: str | list[int], reft: Reft | None = None, **kwargs) -> str:
    """The whole completion of one prompt (greedy by default), EOS excluded; arguments as stream_responses."""
    return "".join(stream_generate(model, tokenizer, prompt, reft, **kwargs))


def batch_generate(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    reft: Reft | None = None,
    max_tokens: int | list[int] = 256,
    temp: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    prefill_step_size: int = 2048,
    edit: bool = True,
) -> list[list[int]]:
    """Generate for several tokenized prompts in one batch; the generated ids per prompt, EOS excluded.

    Uses mlx-lm's batch classes: prompts are prefilled right-padded and the KV cache is then rolled to
    left padding (BatchKVCache), which keeps one offset per row counting that row's real tokens. The
    wrapper subtracts that offset, so the locations are each prompt's own (unpadded) positions. The last
    prompt token goes through the first decode step; the edit is switched off right after it.
    edit=False runs the base model (reft's locations stay off) for side-by-side comparisons.
    """
    check_sampling(max_tokens, temp, top_p)
    prompts = [_prompt_ids(tokenizer, p) for p in prompts]
    if not prompts:
        return []
    B = len(prompts)
    limits = list(max_tokens) if isinstance(max_tokens, (list, tuple)) else [max_tokens] * B
    if len(limits) != B:
        raise ConfigError("max_tokens", max_tokens, f"a list needs one entry per prompt ({B})")
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp=float(temp), top_p=float(top_p))
    stop = StopSequences([[t] for t in tokenizer.eos_token_ids])
    locations = reft.locations([len(p) for p in prompts]) if reft is not None and edit else None

    out: dict[int, list[int]] = {b: [] for b in range(B)}
    with editing(model, reft, locations), mx.stream(generation_stream):
        batch = PromptProcessingBatch(
            model, list(range(B)), [make_prompt_cache(model) for _ in range(B)],
            prefill_step_size=prefill_step_size, samplers=[sampler] * B, fallback_sampler=sampler,
            logits_processors=[[] for _ in range(B)], max_tokens=limits, stop_sequences=[stop] * B,
        )
        if any(len(p) > 1 for p in prompts):
            batch.prompt([p[:-1] for p in prompts])
        decoding = batch.generate([p[-1:] for p in prompts])  # builds the step on the last prompt tokens
        if reft is not None:
            reft.set_locations(None)  # finished rows leave the batch later; the edit is done by now
        while len(decoding):
            for r in decoding.next():
                if r.finish_reason != "stop":
                    out[r.uid].append(r.token)
    return [out[b] for b in range(B)]
