"""`spec-export serve`: an OpenAI-compatible local HTTP server over one Engine, for editors, desktop and voice apps.

- `scheduler.py`: the queue in front of the Engine (one worker thread, one generation at a time; a full queue is
  429 with Retry-After), cancellation and latest-wins: a request from the same `user` (or any request, with
  `latest_wins`) cancels the one still running or waiting. No HTTP in it.
- `http.py`: the HTTP layer: OpenAI's request models and error shape, the body reader (bounded in bytes and depth,
  text checked as encodable where it enters), errors, the API key, one log line per request, and streaming that
  cancels its generation within one round of the client disconnecting.
- `endpoints.py`: a request -> prompt ids and a GenerationConfig (the runtime's checks) -> a Job -> a response.
- `app.py`: the Starlette app, and start-up: the socket, the engine and its warm-up, uvicorn.
- `options.py`: ServeOptions.

Prefix reuse is the Engine's own: the next keystroke's prompt shares almost everything with the last, and only the new
tail is prefilled. Needs the `serve` extra (starlette, uvicorn, pydantic, jinja2); the lean runtime does not.
"""
from .app import is_loopback, make_app, run, warmup
from .endpoints import Server
from .http import ApiError, json_depth
from .options import ServeOptions
from .scheduler import Job, QueueFull, Scheduler, ShuttingDown

__all__ = ["ApiError", "Job", "QueueFull", "Scheduler", "Server", "ServeOptions", "ShuttingDown", "is_loopback",
           "json_depth", "make_app", "run", "warmup"]
