"""Editor-style autocomplete against `spec-export serve`.

On every simulated keystroke the "editor" sends the text around the cursor and shows the completion it gets back. It
does not wait for the previous request: the server's latest-wins (same `user`) cancels the stale one, which ends with
finish_reason "cancelled". Fill-in-the-middle (prefix + suffix) when the model has FIM tokens, else the prefix alone.

    spec-export serve ./bundle --port 8080 &
    python examples/autocomplete.py --base-url http://127.0.0.1:8080/v1

Needs the `openai` package (pip install openai).
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time

from openai import OpenAI

BEFORE = "import os\n\n\ndef read_lines(path):\n    \"\"\"Return the lines of a text file.\"\"\"\n    "
TYPED = "with open(path) as f:\n        return f."
AFTER = "\n\n\ndef main():\n    print(read_lines('setup.cfg'))\n"


def model_info(client: OpenAI) -> tuple[str, dict]:
    m = client.models.list().data[0]
    return m.id, (m.model_extra or {}).get("specedge", {})


def complete(client, model, user, prefix, suffix, max_tokens, fim, out: dict) -> None:
    """One keystroke's request, streamed; `out` receives the completion, its finish reason and the client's TTFT."""
    t0 = time.perf_counter()
    stream = client.completions.create(model=model, prompt=prefix, suffix=suffix if fim else None,
                                       max_tokens=max_tokens, temperature=0, stream=True, user=user)
    text, reason, ttft = [], None, None
    for chunk in stream:
        c = chunk.choices[0]
        if c.text and ttft is None:
            ttft = 1e3 * (time.perf_counter() - t0)
        text.append(c.text)
        reason = c.finish_reason or reason
    out.update(text="".join(text), finish_reason=reason, ttft_ms=ttft, total_ms=1e3 * (time.perf_counter() - t0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--api-key", default=os.environ.get("SPECEDGE_API_KEY", "none"))
    ap.add_argument("--chars-per-key", type=int, default=3, help="characters typed per simulated keystroke")
    ap.add_argument("--interval", type=float, default=0.03, help="seconds between keystrokes")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--json", action="store_true", help="print one JSON summary instead of the live view")
    a = ap.parse_args()

    client = OpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=0, timeout=60)
    model, info = model_info(client)
    fim = bool(info.get("fim"))
    user = f"editor-{os.getpid()}"   # one editor: the server cancels this user's stale request on every keystroke
    requests: list[tuple[threading.Thread, dict]] = []
    for i in range(a.chars_per_key, len(TYPED) + a.chars_per_key, a.chars_per_key):
        prefix, suffix = BEFORE + TYPED[:i], AFTER
        out = {"prefix": prefix, "suffix": suffix}
        t = threading.Thread(target=complete, args=(client, model, user, prefix, suffix, a.max_tokens, fim, out))
        t.start()
        requests.append((t, out))
        time.sleep(a.interval)
    for t, _ in requests:
        t.join(timeout=120)
    outs = [o for _, o in requests]
    final = outs[-1]
    summary = {"mode": "fim" if fim else "prefix", "keystrokes": len(outs),
               "completed": sum(o.get("finish_reason") not in (None, "cancelled") for o in outs),
               "cancelled": sum(o.get("finish_reason") == "cancelled" for o in outs), "final": final}
    if a.json:
        print(json.dumps(summary))
        return
    for o in outs:
        shown = "(cancelled: a newer keystroke)" if o.get("finish_reason") == "cancelled" else repr(o.get("text"))
        print(f"…{o['prefix'][-24:]!r:28} -> {shown}")
    print(f"\n{summary['mode']} completion at the cursor after {len(outs)} keystrokes "
          f"({summary['cancelled']} stale requests cancelled), first token after {final['ttft_ms'] or 0:.0f} ms:")
    print(final["prefix"] + "\033[7m" + final["text"] + "\033[0m" + final["suffix"])


if __name__ == "__main__":
    main()
