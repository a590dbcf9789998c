"""The HTTP layer: OpenAI's request and error shapes. A body is read once, bounded in bytes and in nesting depth,
checked for JSON types (422 naming the field) and for text UTF-8 can encode; the runtime's InvalidArgument becomes a
400 naming its param; every response, error or not, encodes; every request writes one log line; a client that leaves
is a disconnect (cancelled work, one log line), never a traceback."""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import sys
import time
import traceback
from typing import Any, AsyncIterator, Callable, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from ...runtime import GenerationConfig, SpecError
from ...runtime.errors import InvalidArgument
from ...runtime.prompt import check_text

MAX_DEPTH = 64                    # JSON nesting; a request needs 4 (messages -> message -> content -> part)


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


class ClientGone(Exception):
    """The client disconnected before its request was read: nobody is left to answer."""


# -- requests: JSON types are checked strictly (422 naming the field); values by the runtime (400) -----------------
class Request(BaseModel):
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


class CompletionRequest(Request):
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


class ChatRequest(Request):
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None


class InfillRequest(Request):
    """llama.cpp's /infill: the text before and after the cursor."""
    input_prefix: str = ""
    input_suffix: str = ""
    n_predict: int | None = None    # -1 or absent: up to the context


# -- JSON in and out ------------------------------------------------------------------------------------------------
def json_bytes(obj: Any) -> bytes:
    """`obj` as UTF-8 JSON that always encodes: a lone surrogate left in some string (none should be) becomes its
    JSON escape \\udXXX (backslashreplace writes exactly that), never a UnicodeEncodeError and a 500."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8",
                                                                                               "backslashreplace")


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None):
    from starlette.responses import Response

    return Response(json_bytes(obj), status_code=status, headers=headers, media_type="application/json")


def sse(obj: dict | str) -> bytes:
    return b"data: " + (obj.encode() if isinstance(obj, str) else json_bytes(obj)) + b"\n\n"


# A JSON string: a quote, then runs of plain characters or escapes, then a quote (unrolled: no backtracking).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def json_depth(text: str) -> int:
    """How deeply the arrays and objects of JSON `text` nest, counting brackets outside strings, without recursion
    (json.loads recurses and raises RecursionError near 1,000; pydantic after it). Approximate for text that is not
    JSON, which json.loads refuses anyway."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:   # the usual body: nothing to scan
        return 0
    code = np.frombuffer(_STRING.sub("", text).encode("utf-8", "surrogatepass"), np.uint8)   # (bytes,)
    step = (code == ord("[")).astype(np.int32) + (code == ord("{")) - (code == ord("]")) - (code == ord("}"))
    return int(np.cumsum(step).max(initial=0))   # (bytes,) running depth


def _texts(value: Any, name: str):
    """(param, text) for every string in a validated request, nested models and lists included."""
    if isinstance(value, str):
        yield name, value
    elif isinstance(value, BaseModel):
        for field in type(value).model_fields:
            yield from _texts(getattr(value, field), f"{name}.{field}" if name else field)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _texts(v, f"{name}.{i}")


async def read(request, model: type[BaseModel], limit: int) -> BaseModel:
    """The body as `model`: 413 over `limit` bytes; 400 for bytes that are not a JSON object, for nesting deeper than
    MAX_DEPTH and for text UTF-8 cannot encode; 422 for wrong types. ClientGone when the client leaves mid-body."""
    from starlette.requests import ClientDisconnect

    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > limit:
        raise ApiError(413, f"the request body has {int(size)} bytes; this server accepts at most {limit} "
                            f"(start it with a larger --max-body-bytes)", code="body_too_large")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"the request body exceeds {limit} bytes (start the server with a larger "
                                    f"--max-body-bytes)", code="body_too_large")
    except ClientDisconnect as e:
        raise ClientGone() from e
    try:   # decoded as json.loads decodes bytes (UTF-8/16/32, surrogates passed through: they are refused below)
        text = body.decode(json.detect_encoding(body), "surrogatepass")
        del body
        depth = json_depth(text)
        if depth > MAX_DEPTH:
            raise ApiError(400, f"the request body's arrays and objects are nested {depth} deep; this server "
                                f"accepts at most {MAX_DEPTH} levels", code="too_deep")
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # ValueError includes bytes that are not UTF-8
        raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object with "
                            f"Content-Type: application/json", code="invalid_json") from e
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                       code="invalid_json")
    try:
        req = model.model_validate(data)
    except ValidationError as e:
        raise _type_error(e, data) from e
    del data, text
    for param, value in _texts(req, ""):   # text enters here: a lone surrogate never reaches the tokenizer or a log
        try:
            check_text(param, value)
        except InvalidArgument as e:
            raise ApiError(400, str(e), param=param, code="invalid_text") from e
    return req


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
    # json.dumps escapes non-ASCII (surrogates included): the echo always encodes.
    return ApiError(422, f"{param} must be {want}, got {json.dumps(value, default=str)[:80]}", param=param,
                    code="invalid_type")


def check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise ApiError(400, message, param=param, code="invalid_value")


def refusal(e: InvalidArgument, names: dict[str, str] | None = None) -> ApiError:
    """The runtime's refusal as a 400 naming the request's field: GenerationConfig says max_new_tokens where the
    request said max_tokens (or max_completion_tokens, or n_predict)."""
    param, message = e.param, str(e)
    if param is not None:   # stop[1] -> stop.1: one spelling of a place, as in the 422s
        param = re.sub(r"\[(\d+)\]", r".\1", param)
    else:   # a message that begins with its field's name ("stop strings must not be empty")
        first = message.split(" ", 1)[0]
        param = first if first in GenerationConfig.__dataclass_fields__ else None
    if names and param in names:
        message = message.replace(param, names[param], 1)
        param = names[param]
    return ApiError(400, message, param=param, code="invalid_value")


def as_api_error(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, InvalidArgument):
        return refusal(e)
    if isinstance(e, SpecError):
        return ApiError(400, str(e), code="invalid_value")
    traceback.print_exception(e)
    return ApiError(500, f"the engine failed: {type(e).__name__}", code="engine_error")


@contextlib.asynccontextmanager
async def watch_disconnect(receive, on_gone: Callable[[], None]):
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
        async with watch_disconnect(receive, self.on_gone):
            try:
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                async for chunk in self.chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                pass
            finally:
                self.on_gone()   # a no-op after a finished job; otherwise it frees the engine


def exception_handlers(request_paths: str) -> dict:
    """Starlette's handlers: every failure answered in OpenAI's shape; a client gone mid-body answered with nothing."""
    from starlette.exceptions import HTTPException

    def answer(e: ApiError):
        return json_response(e.body(), e.status, e.headers)

    async def on_api_error(request, e: ApiError):
        return answer(e)

    async def on_refusal(request, e: InvalidArgument):
        return answer(refusal(e))

    async def on_gone(request, e: ClientGone):
        request.state.gone = True   # for the log line

        async def nothing(scope, receive, send):   # nobody is left to read an answer
            pass
        return nothing

    async def on_http_error(request, e: HTTPException):
        what = {404: f"no such endpoint: {request.method} {request.url.path} (see {request_paths})",
                405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return answer(ApiError(e.status_code, what, code={404: "unknown_url"}.get(e.status_code)))

    async def on_crash(request, e: Exception):
        return answer(as_api_error(e))

    return {ApiError: on_api_error, InvalidArgument: on_refusal, ClientGone: on_gone, HTTPException: on_http_error,
            Exception: on_crash}


def require_key(app, key: str):
    """Every request needs `Authorization: Bearer KEY`: the scheme in any case (RFC 7235), the key compared in
    constant time."""
    want = key.encode("utf-8", "surrogateescape")   # the bytes it was given as (os.environ's own decoding)

    async def guarded(scope, receive, send):
        if scope["type"] == "http":
            got = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = got.strip().partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), want)):
                why = "a wrong API key" if got else "no API key"
                e = ApiError(401, f"the request has {why}: send the header `Authorization: Bearer KEY` with the key "
                                  f"the server was started with (--api-key)", code="invalid_api_key")
                await json_response(e.body(), 401, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await app(scope, receive, send)

    return guarded


def log_requests(app):
    """One line per request on stderr: method, path, status, completion tokens, milliseconds. A client that left
    before its request was read is status 499 (nginx's "client closed request"): one line, no traceback."""
    async def logged(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        t0, status = time.perf_counter(), [None]

        async def sent(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        state = scope.setdefault("state", {})
        try:
            await app(scope, receive, sent)
        finally:
            job = state.get("job")
            tokens = len(job.result.token_ids) if job is not None and job.result is not None else 0
            code = 499 if state.get("gone") else status[0] or 500
            path = scope.get("path", "").encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
            print(f"{scope.get('method')} {path} {code} tokens={tokens} ms={1e3 * (time.perf_counter() - t0):.1f}",
                  file=sys.stderr, flush=True)

    return logged
