"""`spec-export serve`: an OpenAI-compatible local HTTP server over one Engine, for editors, desktop and voice apps.

One worker thread owns the Engine and runs one generation at a time (the Engine is one set of KV buffers); requests
wait in a bounded queue, and a full queue answers 429 with Retry-After. Autocomplete semantics: a request from the
same `user` (or any request, with `latest_wins`) cancels the one still running or waiting, and a client that
disconnects cancels its generation within one round. Prefix reuse is the Engine's own: the next keystroke's prompt
shares almost everything with the last, and only the new tail is prefilled.

Needs the `serve` extra (starlette, uvicorn, pydantic, jinja2); the lean runtime does not.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import math
import threading
import time
import traceback
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Union

from pydantic import BaseModel, ConfigDict, ValidationError

from ..runtime import Engine, GenerationConfig, Result, SpecError
from ..runtime.errors import InvalidArgument
from ..runtime.fim import fim_ids
from .prompting import ChatTemplate, chat_template

MAX_STOP = 16                     # stop strings per request
COMPLETION_DEFAULT_TOKENS = 16    # OpenAI's default max_tokens for /v1/completions
# OpenAI has no "cancelled": a stale request superseded by latest-wins (or a server shutting down) ends with it.
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context_full": "length", "cancelled": "cancelled"}


@dataclass(frozen=True)
class ServeOptions:
    api_key: str | None = None      # None: no authentication (loopback use)
    queue_size: int = 16            # requests waiting behind the running one; more get 429
    latest_wins: bool = False       # any new request cancels every older one (one editor, one user)
    max_body_bytes: int = 1 << 20   # larger request bodies get 413
    k: int | None = None            # draft tokens per round; None: the bundle's default
    speculative: bool | None = None  # False: plain decoding; None: the bundle's default
    drafter: str | None = None      # model | lookup | hybrid; None: the bundle's default
    adaptive: bool | None = None    # k per round from running estimates; None: the bundle's default
    model_id: str | None = None     # the name /v1/models lists; default: the bundle folder's name


class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        kind = {401: "authentication_error", 429: "rate_limit_error"}.get(self.status, "invalid_request_error")
        kind = "server_error" if self.status >= 500 else kind
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# -- requests: JSON types are checked strictly (422 naming the field); values are checked below (400) ------------------
class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)   # unknown fields are ignored, as OpenAI clients expect
    model: str | None = None        # any name: there is one model, and editors send their own default names
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None        # extension (llama.cpp, vLLM)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool | None = None
    user: str | None = None
    n: int | None = None


class CompletionRequest(_Request):
    prompt: Union[str, list[int], list[str]]
    suffix: str | None = None
    max_tokens: int | None = None
    echo: bool | None = None
    logprobs: int | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: str
    content: Union[str, list[ContentPart], None] = None


class ChatRequest(_Request):
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None


class InfillRequest(_Request):
    """llama.cpp's /infill: the text before and after the cursor."""
    input_prefix: str = ""
    input_suffix: str = ""
    n_predict: int | None = None    # -1 or absent: up to the context


# -- the worker: one thread owns the Engine ---------------------------------------------------------------------------
class Job:
    """One request as the worker sees it: prompt ids, a config, and a channel of events back to the event loop:
    ("delta", text) ..., then ("done", Result | None) or ("error", exception). None: cancelled while waiting."""

    def __init__(self, ids: list[int], config: GenerationConfig, user: str | None, stream: bool):
        self.id, self.ids, self.config, self.user, self.stream = uuid.uuid4().hex[:24], ids, config, user, stream
        self.loop = asyncio.get_running_loop()
        # Events from the worker wait in `inbox`; the event loop is woken once per batch, not once per token: the
        # tokens of one round arrive within microseconds, so a stream sends one event per round.
        self.inbox: list[tuple[str, Any]] = []
        self.inbox_lock = threading.Lock()
        self.wake_scheduled = False
        self.ready = asyncio.Event()
        self.lock = threading.Lock()   # orders cancel() against the worker creating the generator
        self.cancelled, self.gen = False, None
        self.t_submit, self.t_start = time.perf_counter(), None

    @property
    def queue_ms(self) -> float:
        return 1e3 * ((self.t_start or time.perf_counter()) - self.t_submit)

    def put(self, kind: str, value: Any) -> None:
        """Called from the worker thread."""
        with self.inbox_lock:
            self.inbox.append((kind, value))
            if self.wake_scheduled:
                return
            self.wake_scheduled = True
        with contextlib.suppress(RuntimeError):   # the event loop is gone: the server is shutting down
            self.loop.call_soon_threadsafe(self.ready.set)

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            if self.gen is not None:
                self.gen.cancel()    # seen by the generator at its next round

    def run(self, engine: Engine) -> Result | None:
        self.t_start = time.perf_counter()
        with self.lock:
            if self.cancelled:
                self.put("done", None)
                return None
            try:
                self.gen = engine.generator(self.ids, self.config)
            except SpecError as e:
                self.put("error", e)
                return None
        try:
            if self.stream:
                for delta in self.gen.text_deltas():
                    self.put("delta", delta)
            result = self.gen.result()
        except Exception as e:  # noqa: BLE001 - a SpecError is the request's fault (400), anything else ours (500)
            self.put("error", e)
            return None
        finally:
            close = getattr(self.gen, "close", None)   # releases the engine even when the generation failed
            if close is not None:
                close()
        self.put("done", result)
        return result

    async def outcome(self) -> AsyncIterator[tuple[str, Any]]:
        """The job's events, on the event loop: ("delta", the text that arrived since the last one) ..., then the end."""
        while True:
            await self.ready.wait()
            self.ready.clear()
            with self.inbox_lock:
                items, self.inbox, self.wake_scheduled = self.inbox, [], False
            text = "".join(v for k, v in items if k == "delta")
            if text:
                yield "delta", text
            end = next((it for it in items if it[0] != "delta"), None)
            if end is not None:
                yield end
                return


class Scheduler:
    """A bounded queue in front of one worker thread. The only place requests are ordered and cancelled."""

    def __init__(self, engine: Engine, queue_size: int, latest_wins: bool):
        self.engine, self.queue_size, self.latest_wins = engine, queue_size, latest_wins
        self.cv = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.running: Job | None = None
        self.stopping = False
        self.counts: Counter = Counter()
        self.recent: deque[dict] = deque(maxlen=16)   # the last requests, for /health
        self.thread = threading.Thread(target=self._work, name="specedge-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cv:
            if self.stopping:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            # Latest wins: the same client's (or with latest_wins, anyone's) older request is stale: cancel it.
            for old in [j for j in (self.running, *self.waiting) if j is not None and not j.cancelled]:
                if self.latest_wins or (job.user is not None and old.user == job.user):
                    self._cancel(old)
            if len(self.waiting) >= self.queue_size:
                raise ApiError(429, f"the server is busy: {len(self.waiting)} requests are waiting for the one "
                                    f"running; retry later", code="queue_full", headers={"Retry-After": "1"})
            self.waiting.append(job)
            self.cv.notify()

    def cancel(self, job: Job) -> None:
        with self.cv:
            self._cancel(job)

    def _cancel(self, job: Job) -> None:
        if job in self.waiting:        # never started: leave the queue now, freeing its place
            self.waiting.remove(job)
            job.cancelled = True
            job.put("done", None)
            self._record(job, None)
        else:
            job.cancel()

    def _work(self) -> None:
        while True:
            with self.cv:
                while not self.waiting and not self.stopping:
                    self.cv.wait()
                if self.stopping:
                    return
                job = self.running = self.waiting.popleft()
            result = job.run(self.engine)
            with self.cv:
                self.running = None
                self._record(job, result)

    def _record(self, job: Job, result: Result | None) -> None:
        reason = result.finish_reason if result else ("cancelled" if job.cancelled else "error")
        self.counts[reason] += 1
        self.recent.append({"id": job.id, "user": job.user, "finish_reason": reason, "prompt_tokens": len(job.ids),
                            "completion_tokens": len(result.token_ids) if result else 0,
                            "max_tokens": job.config.max_new_tokens, "queue_ms": round(job.queue_ms, 2)})

    def state(self) -> dict:
        with self.cv:
            return {"busy": self.running is not None, "waiting": len(self.waiting), "queue_size": self.queue_size,
                    "finished": dict(self.counts), "recent": list(self.recent)}

    def close(self) -> None:
        with self.cv:
            self.stopping = True
            for j in [*self.waiting, *([self.running] if self.running else [])]:
                self._cancel(j)
            self.cv.notify_all()
        self.thread.join(timeout=10)


def warmup(engine: Engine, k: int | None = None) -> None:
    """A short generation at every step size the loop uses (k+1 for k = 1..k_max, and the plain step), greedy and
    sampled: session start-up, allocation and CUDA graph capture happen now, not on the first request."""
    k_max = k or int(engine.manifest.defaults.get("k", 4))
    ids = engine.encode("def f(x):\n    return")[:8]
    for kk in range(1, k_max + 1):
        engine.generate(ids, max_new_tokens=kk + 2, k=kk)
    engine.generate(ids, max_new_tokens=4, speculative=False)
    engine.generate(ids, max_new_tokens=k_max + 2, k=k_max, temperature=0.8, seed=0)


# -- helpers ----------------------------------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def _usage(result: Result | None, n_prompt: int) -> dict:
    n = len(result.token_ids) if result else 0
    return {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}


def _vendor(result: Result | None, job: Job) -> dict:
    """The request's speculative statistics: the `specedge` field of every response."""
    if result is None:
        return {"finish": "cancelled", "queue_ms": round(job.queue_ms, 2)}
    s = result.stats
    r = lambda x: round(float(x), 3)  # noqa: E731
    return {"alpha": r(s.alpha), "tau": r(s.mean_accepted_length), "tokens_per_s": r(s.tokens_per_s),
            "ttft_ms": r(s.ttft_ms), "queue_ms": r(job.queue_ms), "prefill_ms": r(s.prefill_ms), "k": s.k,
            "rounds": s.rounds, "drafted": s.drafted, "accepted": s.accepted, "finish": result.finish_reason}


def _finish(result: Result | None) -> str:
    return FINISH[result.finish_reason] if result else "cancelled"


async def _read(request, model: type[BaseModel], limit: int) -> BaseModel:
    """The body as `model`: 413 over `limit` bytes, 400 for bytes that are not a JSON object, 422 for wrong types."""
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > limit:
        raise ApiError(413, f"the request body has {int(size)} bytes; this server accepts at most {limit} "
                            f"(start it with a larger --max-body-bytes)", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body exceeds {limit} bytes (start the server with a larger "
                                f"--max-body-bytes)", code="body_too_large")
    try:
        data = json.loads(body)
    except ValueError as e:  # includes bytes that are not UTF-8
        raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object with "
                            f"Content-Type: application/json", code="invalid_json") from e
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                       code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _type_error(e, data) from e


def _type_error(e: ValidationError, data: dict) -> ApiError:
    """422 naming the field: `prompt must be str or list[int] or list[str], got 5`."""
    is_tag = lambda x: isinstance(x, str) and ("[" in x or x in ("str", "int", "float", "bool"))  # noqa: E731
    errs = e.errors()
    loc = errs[0]["loc"]
    cut = next((i for i, x in enumerate(loc) if is_tag(x)), len(loc))   # a union member's tag ends the field path
    param = ".".join(str(x) for x in loc[:cut])
    if errs[0]["type"] == "missing":
        return ApiError(422, f"{param} is required", param=param, code="missing_field")
    tags = [x["loc"][cut] for x in errs if x["loc"][:cut] == loc[:cut] and len(x["loc"]) > cut and is_tag(x["loc"][cut])]
    want = " or ".join(dict.fromkeys(tags)) if tags else errs[0]["msg"].lower().removeprefix("input should be ")
    value = data
    for x in loc[:cut]:   # the field's own value (for a union, pydantic reports a member's inner input)
        value = value[x]
    return ApiError(422, f"{param} must be {want}, got {json.dumps(value, default=str)[:80]}", param=param,
                    code="invalid_type")


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise ApiError(400, message, param=param, code="invalid_value")


class Server:
    """The endpoints over one Engine and its Scheduler. `make_app` turns it into an ASGI app."""

    def __init__(self, engine: Engine, opts: ServeOptions, bundle: Path):
        self.engine, self.opts = engine, opts
        self.model_id = opts.model_id or Path(bundle).resolve().name
        m, tok = engine.manifest, engine.tokenizer
        self.vocab = tok.get_vocab_size(with_added_tokens=True)
        self.fim = fim_ids(tok, m.defaults.get("fim"))
        self.head = [m.tokenizer.bos_token_id] if m.tokenizer.add_bos and m.tokenizer.bos_token_id is not None else []
        source = chat_template(bundle)
        tokname = lambda i: (tok.id_to_token(i) or "") if i is not None else ""  # noqa: E731
        self.chat = ChatTemplate(source, tokname(m.tokenizer.bos_token_id),
                                 tokname(m.tokenizer.eos_token_ids[0] if m.tokenizer.eos_token_ids else None)) \
            if source else None
        self.scheduler = Scheduler(engine, opts.queue_size, opts.latest_wins)
        self.created = int(time.time())

    # -- request -> (ids, config) --------------------------------------------------------------------------------
    def _text(self, text: str) -> list[int]:
        return self.engine.tokenizer.encode(text, add_special_tokens=False).ids

    def _fim(self, prefix: str, suffix: str, param: str) -> list[int]:
        if self.fim is None:
            raise ApiError(400, f"this model has no fill-in-the-middle tokens (its tokenizer has none of "
                                f"<|fim_prefix|>, <fim_prefix>, <PRE>, ...): send the text before the cursor as a "
                                f"plain prompt without `{param}`", param=param, code="fim_unsupported")
        p, s, m = self.fim
        return [*self.head, p, *self._text(prefix), s, *self._text(suffix), m]

    def config(self, req: _Request, n_prompt: int, prompt_param: str, max_param: str, max_tokens: int | None,
               default_max: int | None) -> GenerationConfig:
        room = self.engine.max_length - n_prompt
        _check(room >= 1, prompt_param, f"the prompt has {n_prompt} tokens but the model's context holds "
                                        f"{self.engine.max_length} (prompt + completion): shorten it")
        _check(req.n in (None, 1), "n", f"n must be 1 (one completion per request), got {req.n}")
        max_new = default_max if max_tokens is None else max_tokens
        _check(max_new is None or max_new >= 1, max_param, f"{max_param} must be at least 1, got {max_tokens}")
        t = 0.0 if req.temperature is None else req.temperature
        _check(math.isfinite(t) and t >= 0, "temperature", f"temperature must be >= 0 (0 = greedy), got {t}")
        top_p = 1.0 if req.top_p is None else req.top_p
        _check(math.isfinite(top_p) and 0 < top_p <= 1, "top_p", f"top_p must be in (0, 1], got {top_p}")
        top_k = req.top_k or 0
        _check(top_k >= 0, "top_k", f"top_k must be >= 0 (0 = off), got {top_k}")
        _check(req.seed is None or 0 <= req.seed < 2 ** 63, "seed", f"seed must be in [0, 2^63), got {req.seed}")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        _check(len(stop) <= MAX_STOP, "stop", f"at most {MAX_STOP} stop strings, got {len(stop)}")
        _check(all(stop), "stop", "a stop string is empty: every stop string needs at least one character")
        # Past the context the generation ends by itself ("length"): the request is met as far as it can be.
        return GenerationConfig(max_new_tokens=min(max_new or room, room), k=self.opts.k, temperature=t,
                                top_k=top_k, top_p=top_p, seed=req.seed, stop=stop, speculative=self.opts.speculative,
                                drafter=self.opts.drafter, adaptive=self.opts.adaptive)

    def completion_ids(self, req: CompletionRequest) -> list[int]:
        p = req.prompt
        _check(not req.echo, "echo", "echo is not supported: the response holds the completion only")
        _check(not req.logprobs, "logprobs", "logprobs are not supported by this server")
        if isinstance(p, list) and p and isinstance(p[0], str):
            _check(len(p) == 1, "prompt", f"one prompt per request, got a batch of {len(p)}")
            p = p[0]
        if isinstance(p, list):
            _check(len(p) > 0, "prompt", "the prompt is empty: give text or at least one token id")
            _check(req.suffix is None, "suffix", "suffix needs a text prompt (the prefix), not token ids")
            bad = next((i for i in p if not 0 <= i < self.vocab), None)
            _check(bad is None, "prompt", f"token id {bad} is outside the vocabulary (0..{self.vocab - 1})")
            return list(p)
        if req.suffix:   # an empty suffix (some editors always send one) is a plain completion
            return self._fim(p, req.suffix, "suffix")
        _check(len(p) > 0, "prompt", "the prompt is empty: give at least one character of text")
        return self.engine.encode(p)

    def chat_ids(self, req: ChatRequest) -> list[int]:
        if self.chat is None:
            raise ApiError(400, "this model has no chat template (its tokenizer_config.json has no chat_template): "
                                "use /v1/completions with a plain prompt, or export a chat model",
                           param="messages", code="no_chat_template")
        _check(len(req.messages) > 0, "messages", "messages is empty: give at least one message")
        _check(not req.logprobs, "logprobs", "logprobs are not supported by this server")
        msgs = []
        for i, m in enumerate(req.messages):
            c = m.content
            if isinstance(c, list):
                _check(all(p.type == "text" and p.text is not None for p in c), f"messages.{i}.content",
                       "only text content parts are supported")
                c = "".join(p.text for p in c)
            msgs.append({"role": m.role, "content": c or ""})
        try:
            text = self.chat.render(msgs)
        except InvalidArgument as e:
            raise ApiError(400, str(e), param="messages", code="invalid_value") from e
        ids = self._text(text)
        _check(len(ids) > 0, "messages", "the chat template rendered an empty prompt")
        return ids

    # -- endpoints -----------------------------------------------------------------------------------------------
    async def health(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok", "model": self.model_id, **self.scheduler.state()})

    async def models(self, request):
        from starlette.responses import JSONResponse

        m = self.engine.manifest
        spec = lambda s: {"architecture": s.architecture, "parameters": s.parameters,  # noqa: E731
                          "precision": s.precision, "provider": s.provider}
        return JSONResponse({"object": "list", "data": [{
            "id": self.model_id, "object": "model", "created": self.created, "owned_by": "specedge",
            "specedge": {"target": spec(m.target), "draft": spec(m.draft) if m.draft else None, "defaults": m.defaults,
                         "context_length": self.engine.max_length, "fim": self.fim is not None,
                         "chat_template": self.chat is not None, "provider": self.engine.provider}}]})

    async def completions(self, request):
        req = await _read(request, CompletionRequest, self.opts.max_body_bytes)
        ids = self.completion_ids(req)
        cfg = self.config(req, len(ids), "prompt", "max_tokens", req.max_tokens, COMPLETION_DEFAULT_TOKENS)
        return await self._respond(request, req, ids, cfg, "text_completion", self._completion_body)

    async def chat_completions(self, request):
        req = await _read(request, ChatRequest, self.opts.max_body_bytes)
        ids = self.chat_ids(req)
        field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        cfg = self.config(req, len(ids), "messages", field, getattr(req, field), None)
        return await self._respond(request, req, ids, cfg, "chat.completion", self._chat_body)

    async def infill(self, request):
        req = await _read(request, InfillRequest, self.opts.max_body_bytes)
        ids = self._fim(req.input_prefix, req.input_suffix, "input_suffix")
        n = req.n_predict
        _check(n is None or n == -1 or n >= 1, "n_predict", f"n_predict must be -1 (up to the context) or >= 1, got {n}")
        cfg = self.config(req, len(ids), "input_prefix", "n_predict", None if n in (None, -1) else n, None)
        return await self._respond(request, req, ids, cfg, "infill", self._infill_body)

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
        from starlette.responses import JSONResponse

        job = Job(ids, cfg, req.user, bool(req.stream))
        self.scheduler.submit(job)
        rid = {"text_completion": "cmpl-", "chat.completion": "chatcmpl-", "infill": "infill-"}[kind] + job.id
        on_gone = lambda: self.scheduler.cancel(job)  # noqa: E731
        if job.stream:
            return EventStream(self._stream(rid, job, shape, kind), on_gone)
        async with _watch_disconnect(request.receive, on_gone):
            async for event, value in job.outcome():
                if event == "error":
                    raise _as_api_error(value)
                if event == "done":
                    text = value.text if value else ""
                    return JSONResponse(shape(rid, text, True, value, job))

    async def _stream(self, rid, job, shape, kind) -> AsyncIterator[bytes]:
        if kind == "chat.completion":   # OpenAI's first chat chunk carries the role
            yield _sse({"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                        "model": self.model_id,
                        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": None}]})
        async for event, value in job.outcome():
            if event == "delta":
                yield _sse(shape(rid, value, False, None, job))
            elif event == "done":
                yield _sse(shape(rid, "", True, value, job))
            else:  # the stream has started (200): the error travels as an event, as OpenAI's do
                yield _sse(_as_api_error(value).body())
        if kind != "infill":   # llama.cpp's native endpoints end with "stop": true, not [DONE]
            yield _sse("[DONE]")


def _as_api_error(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, SpecError):
        return ApiError(400, str(e), code="invalid_value")
    traceback.print_exception(e)
    return ApiError(500, f"the engine failed: {type(e).__name__}: {e}", code="engine_error")


@contextlib.asynccontextmanager
async def _watch_disconnect(receive, on_gone: Callable[[], None]):
    """Call on_gone as soon as the client disconnects (the body has been read: the next message is the disconnect)."""
    async def watch():
        while (await receive())["type"] != "http.disconnect":
            pass
        on_gone()

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()


class EventStream:
    """A server-sent-events response that cancels its job when the client goes away, whether that is noticed while
    waiting for the next round (the disconnect message) or while sending (the send fails)."""

    def __init__(self, chunks: AsyncIterator[bytes], on_gone: Callable[[], None]):
        self.chunks, self.on_gone = chunks, on_gone

    async def __call__(self, scope, receive, send):
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]
        async with _watch_disconnect(receive, self.on_gone):
            try:
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                async for chunk in self.chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                pass
            finally:
                self.on_gone()   # a no-op after a finished job; otherwise it frees the engine


def make_app(engine: Engine, opts: ServeOptions, bundle: Path):
    """The ASGI app: routes, OpenAI-shaped errors for every failure, and the API key check in front of everything."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    server = Server(engine, opts, bundle)

    def answer(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def on_api_error(request, e: ApiError):
        return answer(e)

    async def on_http_error(request, e: HTTPException):
        what = {404: f"no such endpoint: {request.method} {request.url.path} (see GET /v1/models, "
                     f"POST /v1/completions, POST /v1/chat/completions, POST /infill, GET /health)",
                405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return answer(ApiError(e.status_code, what, code={404: "unknown_url"}.get(e.status_code)))

    async def on_crash(request, e: Exception):
        return answer(_as_api_error(e))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        server.scheduler.close()

    app = Starlette(routes=[
        Route("/health", server.health, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/infill", server.infill, methods=["POST"]),
    ], exception_handlers={ApiError: on_api_error, HTTPException: on_http_error, Exception: on_crash},
        lifespan=lifespan)
    app.state.server = server
    return _require_key(app, opts.api_key) if opts.api_key else app


def _require_key(app, key: str):
    """Every request needs `Authorization: Bearer KEY` (compared in constant time)."""
    from starlette.responses import JSONResponse

    want = f"Bearer {key}".encode()

    async def guarded(scope, receive, send):
        if scope["type"] == "http":
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, want):
                why = "a wrong API key" if got else "no API key"
                e = ApiError(401, f"the request has {why}: send the header `Authorization: Bearer KEY` with the key "
                                  f"the server was started with (--api-key)", code="invalid_api_key")
                await JSONResponse(e.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})(
                    scope, receive, send)
                return
        await app(scope, receive, send)

    guarded.state = app.state
    return guarded
