"""Voice-style responder against `spec-export serve`.

Streams a reply and hands it on sentence by sentence, as a text-to-speech stage would consume it, and reports the
time to the first sentence (what a listener waits for). Chat messages when the model has a chat template, a plain
dialogue prompt otherwise.

    spec-export serve ./bundle --port 8080 &
    python examples/voice.py --base-url http://127.0.0.1:8080/v1 --say "How do I read a file in Python?"

Needs the `openai` package (pip install openai).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from typing import Callable, Iterator

from openai import OpenAI

SYSTEM = "You are a voice assistant. Answer in short spoken sentences."
# A sentence ends at . ! ? or a newline, followed by whitespace; the whitespace stays with it. A piece with no letter or
# digit (a leading newline, a lone "...") is nothing to say: it goes to the front of the next sentence.
END = re.compile(r"[.!?…]+[\"')\]]*\s+|\n+")


def speakable(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def sentences(deltas: Iterator[str], hand_on: Callable[[str], None]) -> None:
    """Hand on each complete sentence as soon as its end has arrived, the rest when the stream ends; each one holds a
    letter or digit. Their concatenation is the text, less a tail with neither."""
    buf, start = "", 0          # buf[:start] has no sentence end that closes a speakable sentence
    for d in deltas:
        buf += d
        while (m := END.search(buf, start)) is not None:
            if speakable(buf[: m.start()]):
                hand_on(buf[: m.end()])
                buf, start = buf[m.end():], 0
            else:
                start = m.end()
    if speakable(buf):
        hand_on(buf)


def reply_stream(client: OpenAI, model: str, chat: bool, say: str, max_tokens: int) -> Iterator[str]:
    if chat:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": say}],
            max_tokens=max_tokens, temperature=0, stream=True)
        return (c.choices[0].delta.content or "" for c in stream if c.choices)
    stream = client.completions.create(model=model, prompt=dialogue_prompt(say), max_tokens=max_tokens,
                                       temperature=0, stop=["\nUser:"], stream=True)
    return (c.choices[0].text or "" for c in stream if c.choices)


def dialogue_prompt(say: str) -> str:
    return f"{SYSTEM}\n\nUser: {say}\nAssistant:"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--api-key", default=os.environ.get("SPECEDGE_API_KEY", "none"))
    ap.add_argument("--say", default="How do I read a file line by line?")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true", help="print one JSON summary instead of the spoken sentences")
    a = ap.parse_args()

    client = OpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=0, timeout=120)
    m = client.models.list().data[0]
    chat = bool((m.model_extra or {}).get("specedge", {}).get("chat_template"))
    said: list[tuple[float, str]] = []
    t0 = time.perf_counter()

    def speak(sentence: str) -> None:   # a text-to-speech stage would synthesise this now
        said.append((1e3 * (time.perf_counter() - t0), sentence))
        if not a.json:
            print(f"[{said[-1][0]:7.0f} ms] {sentence.strip()}", flush=True)

    sentences(reply_stream(client, m.id, chat, a.say, a.max_tokens), speak)
    first = said[0][0] if said else None
    if a.json:
        print(json.dumps({"mode": "chat" if chat else "dialogue", "sentences": [s for _, s in said],
                          "text": "".join(s for _, s in said), "time_to_first_sentence_ms": first,
                          "total_ms": 1e3 * (time.perf_counter() - t0)}))
    else:
        when = f"{first:.0f} ms" if first is not None else "none (the reply had no letter or digit)"
        print(f"time to first sentence: {when} ({'chat' if chat else 'dialogue prompt'})")


if __name__ == "__main__":
    main()
