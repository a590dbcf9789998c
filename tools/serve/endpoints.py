"""The endpoints: an OpenAI (or llama.cpp /infill) request becomes prompt ids and a GenerationConfig through the
runtime's own checks (runtime/prompt.py, GenerationConfig), a Job on the Scheduler, and a response in the endpoint's
shape, whole or streamed."""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import AsyncIterator, Callable

from ...runtime import Engine, GenerationConfig, Result
from ...runtime.errors import InvalidArgument
from ...runtime.fim import fim_ids
from ...runtime.prompt import encode_prompt, encode_text, longest_token
from ..prompting import PLAIN_CHAT, PLAIN_STOP, ChatTemplate, chat_template, template_file
from .http import (ApiError, ChatRequest, CompletionRequest, EventStream, InfillRequest, Request, as_api_error, check,
                   json_response, read, refusal, sse, watch_disconnect)
from .options import ServeOptions
from .scheduler import Job, QueueFull, Scheduler, ShuttingDown

MAX_STOP = 16                     # stop strings per request
MAX_USER = 256                    # characters of `user`: an id, kept per request for latest-wins and /health
COMPLETION_DEFAULT_TOKENS = 16    # OpenAI's default max_tokens for /v1/completions
SEED_LIMIT = 2 ** 63              # OpenAI's seed is an int64
# OpenAI has no "cancelled": a stale request superseded by latest-wins (or a server shutting down) ends with it.
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context_full": "length", "cancelled": "cancelled"}
PREFIX = {"text_completion": "cmpl-", "chat.completion": "chatcmpl-", "infill": "infill-"}


# -- the endpoints --------------------------------------------------------------------------------------------------
class Server:
    """The endpoints over one Engine and its Scheduler. `make_app` turns it into an ASGI app."""

    def __init__(self, engine: Engine, opts: ServeOptions, bundle: Path):
        self.engine, self.opts = engine, opts
        self.model_id = opts.model_id or Path(bundle).resolve().name
        m, tok = engine.manifest, engine.tokenizer
        self.vocab = m.tokenizer.vocab_size
        self.longest = longest_token(tok)   # once: a prompt's length is bounded by it before it is tokenized
        self.fim = fim_ids(tok, m.defaults.get("fim"))
        self.head = [m.tokenizer.bos_token_id] if m.tokenizer.add_bos and m.tokenizer.bos_token_id is not None else []
        # The bundle's template unless the server was given one; "plain" is a dialogue for base models, which stops
        # where the model starts the user's next turn.
        plain = opts.chat_template == "plain"
        source = PLAIN_CHAT if plain else template_file(opts.chat_template) if opts.chat_template \
            else chat_template(bundle)
        if opts.chat_template and not source:
            raise InvalidArgument(f"{opts.chat_template} holds no chat template", "chat_template")
        self.chat_stop = PLAIN_STOP if plain else ()
        tokname = lambda i: (tok.id_to_token(i) or "") if i is not None else ""  # noqa: E731
        bos = m.tokenizer.bos_token_id if m.tokenizer.add_bos or not plain else None   # plain: as a plain prompt
        self.chat = ChatTemplate(source, tokname(bos),
                                 tokname(m.tokenizer.eos_token_ids[0] if m.tokenizer.eos_token_ids else None)) \
            if source else None
        self.scheduler = Scheduler(engine, opts.queue_size, opts.latest_wins)
        self.created = int(time.time())

    # -- request -> (ids, config): the runtime's checks, as 400s naming the field --------------------------------
    def _encode(self, param: str, text: str) -> list[int]:
        """Text without special tokens (a template or FIM tokens frame it), refused before tokenizing when it cannot
        fit the context."""
        return encode_text(param, text, self.engine.tokenizer, self.engine.max_length, self.longest,
                           add_special_tokens=False)

    def _fits(self, ids: list[int], param: str) -> list[int]:
        if len(ids) >= self.engine.max_length:
            raise InvalidArgument(f"the prompt has {len(ids)} tokens but the model's context holds "
                                  f"{self.engine.max_length} (prompt + completion): shorten it", param)
        return ids

    def _fim(self, prefix: str, suffix: str, prefix_param: str, suffix_param: str) -> list[int]:
        if self.fim is None:
            raise ApiError(400, f"this model has no fill-in-the-middle tokens (its tokenizer has none of "
                                f"<|fim_prefix|>, <fim_prefix>, <PRE>, ...): send the text before the cursor as a "
                                f"plain prompt without `{suffix_param}`", param=suffix_param, code="fim_unsupported")
        p, s, m = self.fim
        ids = [*self.head, p, *self._encode(prefix_param, prefix), s, *self._encode(suffix_param, suffix), m]
        return self._fits(ids, prefix_param)

    def config(self, req: Request, n_prompt: int, max_param: str, max_tokens: int | None,
               extra_stop: tuple[str, ...] = ()) -> GenerationConfig:
        """The request's GenerationConfig: the runtime validates it; the server adds what is OpenAI's (n, the int64
        seed, the number of stop strings) and caps the length at the room left in the context."""
        check(req.n in (None, 1), "n", f"n must be 1 (one completion per request), got {req.n}")
        check(req.seed is None or req.seed < SEED_LIMIT, "seed", f"seed must be in [0, 2^63), got {req.seed}")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        check(len(stop) <= MAX_STOP, "stop", f"at most {MAX_STOP} stop strings, got {len(stop)}")
        check(req.user is None or len(req.user) <= MAX_USER, "user",
              f"user has {len(req.user or '')} characters; at most {MAX_USER} (an id for the end user)")
        room = self.engine.max_length - n_prompt
        try:
            c = GenerationConfig(max_new_tokens=room if max_tokens is None else max_tokens, k=self.opts.k,
                                 temperature=0.0 if req.temperature is None else req.temperature,
                                 top_k=req.top_k or 0, top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed,
                                 stop=stop + extra_stop, speculative=self.opts.speculative, drafter=self.opts.drafter,
                                 adaptive=self.opts.adaptive)
        except InvalidArgument as e:
            err = refusal(e, {"max_new_tokens": max_param})
            if err.param == "n_predict":
                err.message += " (or -1: up to the context)"
            raise err from e
        # Past the context the generation ends by itself ("length"): the request is met as far as it can be.
        return dataclasses.replace(c, max_new_tokens=room) if c.max_new_tokens > room else c

    def completion_ids(self, req: CompletionRequest) -> list[int]:
        p = req.prompt
        check(not req.echo, "echo", "echo is not supported: the response holds the completion only")
        check(not req.logprobs, "logprobs", "logprobs are not supported by this server")
        if isinstance(p, list) and p and isinstance(p[0], str):
            check(len(p) == 1, "prompt", f"one prompt per request, got a batch of {len(p)}")
            p = p[0]
        if isinstance(p, list):
            check(req.suffix is None, "suffix", "suffix needs a text prompt (the prefix), not token ids")
        elif req.suffix:   # an empty suffix (some editors always send one) is a plain completion
            return self._fim(p, req.suffix, "prompt", "suffix")
        else:   # checked before tokenizing: "" would be the BOS token alone, which encode_prompt lets through
            check(p != "", "prompt", "the prompt is empty: give at least one character of text")
        return encode_prompt(p, self.engine.tokenizer, self.vocab, self.engine.max_length, self.longest)

    def chat_ids(self, req: ChatRequest) -> list[int]:
        if self.chat is None:
            raise ApiError(400, "this model has no chat template (its tokenizer_config.json has no chat_template): "
                                "use /v1/completions with a plain prompt, start the server with --chat-template "
                                "plain (a User:/Assistant: dialogue for base models), or export a chat model",
                           param="messages", code="no_chat_template")
        check(len(req.messages) > 0, "messages", "messages is empty: give at least one message")
        check(not req.logprobs, "logprobs", "logprobs are not supported by this server")
        msgs = []
        for i, m in enumerate(req.messages):
            c = m.content
            if isinstance(c, list):
                check(all(p.type == "text" and p.text is not None for p in c), f"messages.{i}.content",
                      "only text content parts are supported")
                c = "".join(p.text for p in c)
            msgs.append({"role": m.role, "content": c or ""})
        # Text that cannot fit the context is refused before the template copies it (with 2x slack: a template may
        # leave a message out, a system prompt say).
        chars = sum(len(m["content"]) + len(m["role"]) for m in msgs)
        check(chars <= 2 * self.engine.max_length * self.longest, "messages",
              f"the messages have {chars:,} characters, more than the model's context of {self.engine.max_length} "
               f"tokens can hold: shorten them")
        try:
            text = self.chat.render(msgs)
        except InvalidArgument as e:
            raise ApiError(400, str(e), param="messages", code="invalid_value") from e
        ids = self._fits(self._encode("messages", text), "messages")
        check(len(ids) > 0, "messages", "the chat template rendered an empty prompt")
        return ids

    async def health(self, request):
        return json_response({"status": "ok", "model": self.model_id, **self.scheduler.state()})

    async def models(self, request):
        m = self.engine.manifest
        spec = lambda s: {"architecture": s.architecture, "parameters": s.parameters,  # noqa: E731
                          "precision": s.precision, "provider": s.provider}
        return json_response({"object": "list", "data": [{
            "id": self.model_id, "object": "model", "created": self.created, "owned_by": "specedge",
            "specedge": {"target": spec(m.target), "draft": spec(m.draft) if m.draft else None, "defaults": m.defaults,
                         "context_length": self.engine.max_length, "fim": self.fim is not None,
                         "chat_template": self.chat is not None, "provider": self.engine.provider}}]})

    async def completions(self, request):
        req = await read(request, CompletionRequest, self.opts.max_body_bytes)
        ids = self.completion_ids(req)
        max_tokens = COMPLETION_DEFAULT_TOKENS if req.max_tokens is None else req.max_tokens
        return await self._respond(request, req, ids, self.config(req, len(ids), "max_tokens", max_tokens),
                                   "text_completion", self._completion_body)

    async def chat_completions(self, request):
        req = await read(request, ChatRequest, self.opts.max_body_bytes)
        ids = self.chat_ids(req)
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        cfg = self.config(req, len(ids), field, getattr(req, field), self.chat_stop)
        return await self._respond(request, req, ids, cfg, "chat.completion", self._chat_body)

    async def infill(self, request):
        req = await read(request, InfillRequest, self.opts.max_body_bytes)
        ids = self._fim(req.input_prefix, req.input_suffix, "input_prefix", "input_suffix")
        n = None if req.n_predict == -1 else req.n_predict   # llama.cpp's -1: up to the context
        return await self._respond(request, req, ids, self.config(req, len(ids), "n_predict", n), "infill",
                                   self._infill_body)

    # -- bodies: one function per response shape; `final` marks the last chunk, `text` is the delta or the whole -----
    def _completion_body(self, rid, text, final, result, job):
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish(result) if final else None}
        return self._envelope(rid, "text_completion", choice, final, result, job)

    def _chat_body(self, rid, text, final, result, job):
        if job.stream:
            choice = {"index": 0, "delta": {"content": text} if text or not final else {},
                      "finish_reason": _finish(result) if final else None}
            return self._envelope(rid, "chat.completion.chunk", choice, final, result, job)
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": _finish(result)}
        return self._envelope(rid, "chat.completion", choice, final, result, job)

    def _infill_body(self, rid, text, final, result, job):
        body = {"content": text, "stop": final, "id_slot": 0}
        if final:
            u = _usage(result, len(job.ids))
            body.update(model=self.model_id, tokens_predicted=u["completion_tokens"],
                        tokens_evaluated=u["prompt_tokens"], stop_type=_finish(result), usage=u,
                        specedge=_vendor(result, job))
        return body

    def _envelope(self, rid, obj, choice, final, result, job):
        body = {"id": rid, "object": obj, "created": int(time.time()), "model": self.model_id, "choices": [choice]}
        if final:
            body.update(usage=_usage(result, len(job.ids)), specedge=_vendor(result, job))
        return body

    async def _respond(self, request, req, ids, cfg, kind, shape: Callable):
        job = Job(ids, cfg, req.user, bool(req.stream))
        try:
            self.scheduler.submit(job)
        except QueueFull as e:
            raise ApiError(429, str(e), code="queue_full", headers={"Retry-After": "1"}) from e
        except ShuttingDown as e:
            raise ApiError(503, str(e), code="shutting_down") from e
        request.state.job = job   # for the log line
        rid = PREFIX[kind] + job.id
        on_gone = lambda: self.scheduler.cancel(job)  # noqa: E731
        if job.stream:
            return EventStream(self._stream(rid, job, shape, kind), on_gone)
        async with watch_disconnect(request.receive, on_gone):
            async for event, value in job.outcome():
                if event == "error":
                    raise as_api_error(value)
                if event == "done":
                    return json_response(shape(rid, value.text if value else "", True, value, job))

    async def _stream(self, rid, job, shape, kind) -> AsyncIterator[bytes]:
        if kind == "chat.completion":   # OpenAI's first chat chunk carries the role
            yield sse({"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                        "model": self.model_id,
                        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": None}]})
        async for event, value in job.outcome():
            if event == "delta":
                yield sse(shape(rid, value, False, None, job))
            elif event == "done":
                yield sse(shape(rid, "", True, value, job))
            else:  # the stream has started (200): the error travels as an event, as OpenAI's do
                yield sse(as_api_error(value).body())
        if kind != "infill":   # llama.cpp's native endpoints end with "stop": true, not [DONE]
            yield sse("[DONE]")

def _usage(result: Result | None, n_prompt: int) -> dict:
    n = len(result.token_ids) if result else 0
    return {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}


def _vendor(result: Result | None, job: Job) -> dict:
    """The request's speculative statistics: the `specedge` field of every response (JSON has no inf or NaN)."""
    if result is None:
        return {"finish": "cancelled", "queue_ms": round(job.queue_ms, 2)}
    s = result.stats
    r = lambda x: round(float(x), 3) if x is not None and math.isfinite(x) else None  # noqa: E731  (alpha: None)
    return {"alpha": r(s.alpha), "tau": r(s.mean_accepted_length), "tokens_per_s": r(s.tokens_per_s),
            "ttft_ms": r(s.ttft_ms), "queue_ms": r(job.queue_ms), "prefill_ms": r(s.prefill_ms), "k": s.k,
            "rounds": s.rounds, "drafted": s.drafted, "accepted": s.accepted, "finish": result.finish_reason}


def _finish(result: Result | None) -> str:
    return FINISH[result.finish_reason] if result else "cancelled"
