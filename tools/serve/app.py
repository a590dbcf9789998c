"""The app and its start-up: routes and middleware around the endpoints; bind the socket, load and warm the engine,
then serve with uvicorn until Ctrl+C."""
from __future__ import annotations

import contextlib
import ipaddress
import socket
import sys
from pathlib import Path

from ...runtime import Engine
from ...runtime.errors import InvalidArgument
from .endpoints import Server
from .http import exception_handlers, log_requests, require_key
from .options import ServeOptions

PATHS = "GET /v1/models, POST /v1/completions, POST /v1/chat/completions, POST /infill, GET /health"


def make_app(engine: Engine, opts: ServeOptions, bundle: Path):
    """The ASGI app: the routes, OpenAI-shaped errors for every failure, the API key check in front of them and one
    log line per request in front of that. `app.state.server` is the Server."""
    from starlette.applications import Starlette
    from starlette.routing import Route

    server = Server(engine, opts, bundle)

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
    ], exception_handlers=exception_handlers(PATHS), lifespan=lifespan)
    app.state.server = server
    outer = log_requests(require_key(app, opts.api_key) if opts.api_key else app)
    outer.state = app.state
    return outer


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warmup(engine: Engine, k: int | None = None) -> None:
    """A short generation at every step size the loop uses (k+1 for k = 1..k_max, and the plain step), greedy and
    sampled: session start-up, allocation and CUDA graph capture happen now, not on the first request."""
    k_max = k or engine.defaults.k
    ids = engine.encode("def f(x):\n    return")[:8]
    for kk in range(1, k_max + 1):
        engine.generate(ids, max_new_tokens=kk + 2, k=kk)
    engine.generate(ids, max_new_tokens=4, speculative=False)
    engine.generate(ids, max_new_tokens=k_max + 2, k=k_max, temperature=0.8, seed=0)


def bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound now (a taken port fails before the model loads); it listens once the engine is
    warm. IPPROTO_TCP named explicitly: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say they are TCP,
    and with Nagle on, a response body written after its headers waits 40 ms for the client's delayed ACK."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InvalidArgument(f"cannot bind {host}:{port} ({e.strerror}): pick another --port or --host") from e
    return sock


def run(bundle: str | Path, opts: ServeOptions, host: str = "127.0.0.1", port: int = 8080, provider: str | None = None,
        threads: int = 0, warm: bool = True) -> None:
    """`spec-export serve`: bind, load, warm, print `serving MODEL at http://HOST:PORT/v1`, serve until Ctrl+C."""
    try:
        import uvicorn
    except ImportError as e:
        raise InvalidArgument(f"the server needs the serve extra ({e.name} is missing): "
                              f"pip install 'specedge[serve]'") from e
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    sock = bind(host, port)
    if not is_loopback(host) and not opts.api_key:
        say(f"warning: serving on {host}, reachable from other machines, without an API key: anyone who can reach "
            f"this port can use the model. Set --api-key (or SPECEDGE_API_KEY).")
    engine = Engine(bundle, provider, threads)
    app = make_app(engine, opts, Path(bundle))
    if warm:
        say("warming up (every step size)...")
        warmup(engine, opts.k)
    sock.listen(128)   # before saying so: a client that connects as soon as it reads the line waits in the backlog
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    say(f"serving {app.state.server.model_id} at http://{shown}:{bound_port}/v1 "
        f"({'API key required' if opts.api_key else 'no API key'}; Ctrl+C stops)")
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])
