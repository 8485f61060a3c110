"""Generation with a ReFT adapter, on mlx-lm's own generation machinery.

The interventions edit the prompt positions during prefill only. Later tokens see the edit through the
KV cache, which is exactly what recomputing the whole sequence with the edit on the prompt would give,
so decode steps run the plain model (ReftBlock skips calls past Locations.end).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import queue
import threading
import traceback
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from mlx_lm.generate import (
    GenerationBatch,
    GenerationResponse,
    PromptProcessingBatch,
    StopSequences,
    generation_stream,
)
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import apply_top_p, make_sampler

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

    Uses mlx-lm's batch classes (see start_decoding), with the edit at each prompt's own positions.
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
    stop = eos_stop(tokenizer)
    locations = reft.locations([len(p) for p in prompts]) if reft is not None and edit else None

    out: dict[int, list[int]] = {b: [] for b in range(B)}
    with editing(model, reft, locations), mx.stream(generation_stream):
        decoding = start_decoding(model, reft if edit else None, list(range(B)), prompts, [sampler] * B, limits, stop,
                                  prefill_step_size)
        while len(decoding):
            for r in decoding.next():
                if r.finish_reason != "stop":
                    out[r.uid].append(r.token)
    return [out[b] for b in range(B)]


def eos_stop(tokenizer) -> StopSequences:
    """Stop at any of the tokenizer's EOS tokens (finish_reason 'stop'; the EOS itself is not output)."""
    return StopSequences([[t] for t in tokenizer.eos_token_ids])


def start_decoding(model, reft, uids: list[int], prompts: list[list[int]], samplers: list, max_tokens: list[int],
                   stop: StopSequences, prefill_step_size: int = 2048) -> GenerationBatch:
    """Prefill these prompts with the edit on and return mlx-lm's GenerationBatch, ready to decode.

    reft's locations must be set for these prompts (None: the base model). Prompts are prefilled
    right-padded and the KV cache is then rolled to left padding (BatchKVCache), which keeps one offset
    per row counting that row's real tokens; the wrapper subtracts it, so the locations are each prompt's
    own (unpadded) positions. The last prompt token goes through the batch's first decode step, built
    here; the edit is switched off right after it, so every later step runs the plain model.
    """
    B = len(prompts)
    batch = PromptProcessingBatch(
        model, list(uids), [make_prompt_cache(model) for _ in range(B)], prefill_step_size=prefill_step_size,
        samplers=list(samplers), fallback_sampler=samplers[0], logits_processors=[[] for _ in range(B)],
        max_tokens=list(max_tokens), stop_sequences=[stop] * B,
    )
    if any(len(p) > 1 for p in prompts):
        batch.prompt([p[:-1] for p in prompts])
    decoding = batch.generate([p[-1:] for p in prompts])  # builds the step on the last prompt tokens
    if reft is not None:
        reft.set_locations(None)  # the edit is done by now
    return decoding


# ---------------------------------------------------------------------------------------------------
# Continuous batching: requests join and leave the decode batch between steps (loreft serve)


def request_sampler(temp: float, top_p: float = 1.0, seed: int | None = None):
    """A sampler for one request; a seed gives it its own random key, so its tokens do not depend on the batch.

    Requests without a seed share one sampler per (temp, top_p), so a batch of them samples in one call.
    """
    check_sampling(1, temp, top_p)
    if seed is None or temp == 0:
        return _shared_sampler(float(temp), float(top_p))
    key = mx.random.key(seed)

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, step_key = mx.random.split(key)
        if top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        return mx.random.categorical(logprobs * (1 / temp), key=step_key)

    return sample


@functools.lru_cache(maxsize=64)
def _shared_sampler(temp: float, top_p: float):
    return make_sampler(temp=temp, top_p=top_p)


@dataclass
class Request:
    """One generation request: prompt ids, its adapter (None: the base model), budget, sampling.

    emit(token, finish_reason) is called on the batcher's thread for each generated token (token None
    with finish_reason 'stop' at EOS, which is not output; 'length' comes with the last token; 'error'
    when generation failed). It must return quickly (hand the token to another thread).
    """

    ids: list[int]
    reft: Reft | None
    max_tokens: int
    emit: Callable[[int | None, str | None], None]
    temp: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    uid: int = -1


class ContinuousBatcher:
    """Generate for many requests at once on one thread: new requests join the decode batch between steps.

    New requests are prefilled in groups sharing an adapter, with that adapter's edit on (start_decoding),
    then merged into the running batch, whose steps run the plain model for every row. Finished and
    cancelled requests leave the batch at the next step. All MLX work runs on the batcher's own thread.
    """

    def __init__(self, model: nn.Module, tokenizer, max_batch: int = 32, prefill_batch: int = 8,
                 prefill_step_size: int = 2048):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError("max_batch", max_batch, "must be an integer >= 1")
        self.model, self.max_batch, self.prefill_step_size = model, max_batch, prefill_step_size
        self.prefill_batch = prefill_batch  # prompts admitted per step: running rows keep decoding meanwhile
        self.stop = eos_stop(tokenizer)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: list[Request] = []
        self._running: dict[int, Request] = {}
        self._decoding: GenerationBatch | None = None
        self._uids = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self.steps = 0  # decode steps run
        self.peak = 0  # most requests decoded together so far

    # -- called from any thread

    def submit(self, request: Request) -> int:
        """Queue a request; returns its uid (for cancel). Bad sampling settings raise ConfigError here."""
        check_sampling(request.max_tokens, request.temp, request.top_p)
        if not request.ids:
            raise ConfigError("prompt", request.ids, "must not be empty: interventions edit prompt tokens")
        request.uid = next(self._uids)
        self._inbox.put(("submit", request))
        return request.uid

    def cancel(self, uid: int) -> None:
        """Drop a request (a client went away): its slot is free from the next step on."""
        self._inbox.put(("cancel", uid))

    def call(self, fn: Callable) -> Future:
        """Run fn() on the batcher's thread between steps (e.g. attach an adapter); its result as a Future."""
        future: Future = Future()
        self._inbox.put(("call", (fn, future)))
        return future

    def active(self) -> tuple[int, int]:
        """(requests decoding, requests waiting); a snapshot, read without locking."""
        return len(self._running), len(self._waiting)

    def start(self) -> "ContinuousBatcher":
        """Start the batcher's thread."""
        self._thread = threading.Thread(target=self._loop, name="loreft-batcher", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop generating after the current step; unfinished requests are dropped."""
        if self._thread is not None:
            self._inbox.put(("close", None))
            self._closed.wait()
            self._thread = None

    # -- the batcher's thread

    def _loop(self) -> None:
        model_was_training = self.model.training
        self.model.eval()
        try:
            with mx.stream(mx.default_stream(mx.default_device())):  # this thread's own (MLX streams are per thread)
                while self._read_inbox(block=not (self._running or self._waiting)):
                    try:
                        self._admit()
                        self._step()
                    except Exception as e:  # a failed step ends the requests in it, never the server
                        self._fail_all(e)
        finally:
            self.model.train(model_was_training)
            self._closed.set()
        # Park rather than end: MLX aborts the process at exit when a thread that ran work on its own
        # stream has ended. The thread is a daemon, so it never holds the process open.
        threading.Event().wait()

    def _read_inbox(self, block: bool) -> bool:
        """Apply every queued message (waiting for one if block); False once closed."""
        while True:
            try:
                kind, item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == "close":
                return False
            if kind == "submit":
                self._waiting.append(item)
            elif kind == "cancel":
                self._drop(item)
            elif kind == "call":
                fn, future = item
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:
                        future.set_exception(e)

    def _drop(self, uid: int) -> None:
        self._waiting = [r for r in self._waiting if r.uid != uid]
        if uid in self._running:
            del self._running[uid]
            keep = [i for i, u in enumerate(self._decoding.uids) if u != uid]
            self._decoding.filter(keep)

    def _admit(self) -> None:
        """Prefill waiting requests (as many as fit) and merge them into the running batch."""
        room = min(self.max_batch - len(self._running), self.prefill_batch)
        if room <= 0 or not self._waiting:
            return
        admitted, self._waiting = self._waiting[:room], self._waiting[room:]
        groups: dict[int, list[Request]] = {}
        for r in admitted:
            groups.setdefault(id(r.reft), []).append(r)
        for group in groups.values():
            reft = group[0].reft
            prompts = [r.ids for r in group]
            locations = reft.locations([len(p) for p in prompts]) if reft is not None else None
            with editing(self.model, reft, locations):
                samplers = [request_sampler(r.temp, r.top_p, r.seed) for r in group]  # on this thread: its stream
                new = start_decoding(self.model, reft, [r.uid for r in group], prompts, samplers,
                                     [r.max_tokens for r in group], self.stop, self.prefill_step_size)
            self._running.update((r.uid, r) for r in group)
            self.peak = max(self.peak, len(self._running))
            if self._decoding is None:
                self._decoding = new
            else:
                self._decoding.extend(new)

    def _step(self) -> None:
        """One decode step for every running request; hand each its token."""
        if not self._running:
            return
        responses = self._decoding.next()
        self.steps += 1
        for r in responses:
            request = self._running.get(r.uid)
            if request is None:
                continue
            if r.finish_reason is not None:
                del self._running[r.uid]
            token = None if r.finish_reason == "stop" else r.token
            try:
                request.emit(token, r.finish_reason)
            except Exception:  # a broken consumer only loses its own request
                if r.finish_reason is None:
                    self._drop(r.uid)

    def _fail_all(self, error: Exception) -> None:
        traceback.print_exception(error)  # the operator sees why; each client gets finish_reason 'error'
        failed = list(self._running.values()) + self._waiting
        self._running, self._waiting, self._decoding = {}, [], None
        for request in failed:
            with contextlib.suppress(Exception):
                request.emit(None, "error")
