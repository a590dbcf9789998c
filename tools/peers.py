"""Peers for the side-by-side benchmark: other runtimes doing the same job on the same models.

* `OrtGenAI`: onnxruntime-genai on the bundle's own graphs, plain or with its built-in draft-model speculative
  decoding (`model.draft` + `speculative.max_draft_tokens` in genai_config.json).
  With `ngram`, its n-gram (prompt lookup) decoding instead: `ort-genai-ngram`, no draft model.
* `HFAssisted`: transformers `generate`, plain or assisted (`assistant_model=`), on the source PyTorch checkpoints.
* `llamacpp.LlamaCpp`: llama.cpp's `llama-server` on a GGUF of the same model, over HTTP (tools/llamacpp.py).
* `OpenAIStream`: an OpenAI-compatible server (`spec-export serve`) over HTTP; `Specedge`: specedge in-process.

All return a `PeerRun` timed by one harness, `Clock`, from the caller's side, token by token, the way a user of
that runtime would see it: time to first token, the decode rate after it, (n - 1) / (t_last - t_first), and
end-to-end tokens/s, n / wall time. HTTP peers read the server-sent events with `post_sse`.
onnxruntime_genai, torch and transformers are imported inside the classes, so this module imports without them.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .harness import Clock, PeerRun, post_sse


class OpenAIStream:
    """An OpenAI-compatible server's /v1/completions (specedge's `spec-export serve`), streamed: the harness's client
    for a server that sends text deltas, one chunk per round, and the token count in the last chunk's `usage`.
    The prompt goes as token ids, with `cache_prompt: false` (llama.cpp's name; a server that does not know it
    ignores it, and then reuses the prefix it cached)."""

    def __init__(self, url: str, api_key: str | None = None):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None) -> PeerRun:
        body = {"prompt": [int(t) for t in prompt_ids], "max_tokens": max_new_tokens, "stream": True,
                "temperature": temperature, "top_p": top_p, "cache_prompt": False,
                **({"top_k": top_k} if top_k else {}), **({"seed": seed} if seed is not None else {})}
        clock, text, final = Clock(), [], {}
        for _, event in post_sse(self.url + "/v1/completions", body, headers=self.headers):
            if "error" in event:
                raise RuntimeError(f"{self.url} failed mid-stream: {event['error']}")
            delta = event["choices"][0]["text"]
            if delta:
                text.append(delta)
                clock.tick()
            if event.get("usage"):
                final = event
        clock.done()
        if not final:
            raise RuntimeError(f"{self.url}'s stream ended without its last chunk (the one with `usage`)")
        vendor = final.get("specedge") or {}
        return clock.run([], new_tokens=final["usage"]["completion_tokens"], text="".join(text),
                         drafted=vendor.get("drafted"), accepted=vendor.get("accepted"), timings=vendor or None)

    def close(self) -> None:
        pass


class Specedge:
    """specedge in-process, timed by the same Clock as the peers: the Generator's tokens as a caller iterates them,
    from a cold prefill (the Engine's prefix reuse is dropped before each request, as prompt caching is off on the
    peers' side)."""

    def __init__(self, engine, config):
        self.engine, self.config = engine, config   # a specedge.runtime Engine and GenerationConfig

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None) -> PeerRun:
        import dataclasses

        self.engine.forget()
        c = dataclasses.replace(self.config, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, seed=seed)
        clock, ids = Clock(), []
        gen = self.engine.generator(prompt_ids, c)
        try:
            for t in gen:
                ids.append(t)
                clock.tick()
            clock.done()
            result = gen.result()
        finally:
            gen.close()
        s = result.stats
        return clock.run(ids, text=result.text, drafted=s.drafted, accepted=s.accepted)

    def close(self) -> None:
        pass


def _until_eos(ids: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return ids


def ort_genai_ngram_unsupported() -> str | None:
    """Why onnxruntime-genai's n-gram decoding cannot run here, or None: it came in 0.18 as the speculative option
    `ngram_size`, which older versions lack."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        return "onnxruntime-genai is not installed (pip install onnxruntime-genai)"
    version = tuple(int(x) for x in og.__version__.split(".")[:2] if x.isdigit())
    if version < (0, 18) or not hasattr(og.GeneratorParams, "set_speculative_options"):
        return f"onnxruntime-genai {og.__version__} has no n-gram decoding (it came in 0.18)"
    return None


class OrtGenAI:
    """onnxruntime-genai on a bundle. k: draft tokens per round (og's fixed-width speculative decoding, adaptive k
    off); None: plain decoding of the target alone. ngram: og's n-gram decoding instead of the draft model (0.18's
    `speculative.ngram_size`, the length of the suffix it looks up in the sequence so far; k tokens copied after a
    match), on the target's graph alone: `ort-genai-ngram`.

    og reads a model folder with one genai_config.json, so this builds one in a temporary folder: symlinks to the
    bundle's graphs (each beside its external-data file, which ORT resolves next to the graph) and tokenizer files,
    and a config that is the target's with the draft's decoder block added as `model.draft`. The bundle is untouched.
    """

    def __init__(self, bundle: Path, k: int | None, threads: int = 0, ngram: int | None = None):
        import onnxruntime_genai as og

        if ngram is not None and (k is None or ngram < 2):
            raise ValueError(f"og's n-gram decoding needs k (tokens per round) and an n-gram size >= 2, got k={k}, "
                             f"ngram={ngram}")
        why = ort_genai_ngram_unsupported() if ngram is not None else None
        if why:
            raise RuntimeError(why)

        self._og = og
        bundle = Path(bundle).resolve()
        manifest = json.loads((bundle / "manifest.json").read_text())
        self.k = k
        self.eos = set(manifest["tokenizer"]["eos_token_ids"])
        # Same context as specedge's Engine: what both KV buffers hold.
        self.max_length = min(manifest[r]["max_length"] for r in ("target", "draft") if manifest.get(r))
        self.dir = Path(tempfile.mkdtemp(prefix="specedge-ortgenai-"))
        try:
            config = self._link(bundle, manifest, "target")
            model = config["model"]
            model["decoder"]["filename"] = "target/model.onnx"  # og wants paths relative to the folder, no ".."
            # EOS from the manifest, as specedge stops on it (the builder's genai_config should agree).
            model["eos_token_id"] = sorted(self.eos) if len(self.eos) > 1 else next(iter(self.eos))
            model["context_length"] = self.max_length
            self.vocab_size = int(model["vocab_size"])
            if ngram is not None:   # og refuses n-gram decoding combined with a draft model: the target alone
                config["speculative"] = {"max_draft_tokens": k, "ngram_size": ngram, "min_adaptive_k": 0,
                                         "cooldown": False}
            elif k is not None:
                draft = self._link(bundle, manifest, "draft")["model"]["decoder"]
                draft["filename"] = "draft/model.onnx"
                model["draft"] = draft
                # min_adaptive_k 0: a fixed width, like specedge's k; cooldown off: always draft.
                config["speculative"] = {"max_draft_tokens": k, "min_adaptive_k": 0, "cooldown": False}
            if threads:
                for block in (model["decoder"], model.get("draft", {})):
                    block.setdefault("session_options", {})["intra_op_num_threads"] = threads
            for name in manifest["tokenizer"]["files"]:
                os.symlink(bundle / name, self.dir / name)
            (self.dir / "genai_config.json").write_text(json.dumps(config, indent=2))
            self.model = og.Model(str(self.dir))
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _link(self, bundle: Path, manifest: dict, role: str) -> dict:
        """Symlink one graph and its data into <tmp>/<role>/; return that role's genai_config.json."""
        graph = bundle / manifest[role]["graph"]
        (self.dir / role).mkdir()
        for f in graph.parent.iterdir():
            if f.name.startswith(graph.name):  # model.onnx, model.onnx.data
                os.symlink(f, self.dir / role / f.name)
        return json.loads((graph.parent / "genai_config.json").read_text())

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None) -> PeerRun:
        """Greedy by default; temperature > 0 samples (top_k 0 and top_p 1 mean off, as in specedge)."""
        og = self._og
        if len(prompt_ids) >= self.max_length:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit the context of {self.max_length}")
        params = og.GeneratorParams(self.model)
        # og's max_length counts the prompt; og stops there or at EOS (is_done).
        search = dict(max_length=min(len(prompt_ids) + max_new_tokens, self.max_length), min_length=0,
                      do_sample=temperature > 0, num_beams=1, repetition_penalty=1.0)
        if temperature > 0:
            # og's sampled speculation needs a positive top_k: "off" is the whole vocabulary.
            search.update(temperature=temperature, top_p=top_p,
                          top_k=top_k or self.vocab_size, random_seed=-1 if seed is None else seed)
        params.set_search_options(**search)
        clock = Clock()  # includes creating the generator: og allocates its KV buffers per request
        gen = og.Generator(self.model, params)
        gen.append_tokens(prompt_ids)  # prefill (target, and the draft when speculative)
        out: list[int] = []
        # One token per generate_next_token: og buffers a round's accepted tokens and hands them out one by one,
        # so the first call of a round pays for it and the rest come at once.
        while not gen.is_done() and len(out) < max_new_tokens:
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
            clock.tick()
        out = _until_eos(out, self.eos)
        counters = {}
        if self.k is not None:
            st = gen.get_speculative_stats()
            counters = dict(drafted=int(st["draft_tokens_proposed"]), accepted=int(st["draft_tokens_accepted"]))
        del gen
        return clock.run(out, **counters)

    def close(self) -> None:
        self.model = None  # release the sessions before their files go
        shutil.rmtree(self.dir, ignore_errors=True)  # removes the symlinks, never what they point to


def _load_hf(path: Path):
    """A transformers checkpoint in fp32, for evaluation, without its "Loading weights" bars (they would interleave
    with the bench's progress)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


class HFAssisted:
    """transformers generate on the source checkpoints (fp32, CPU): plain greedy (draft None), or assisted generation
    with the draft proposing a fixed k tokens per round."""

    def __init__(self, target_dir: Path, draft_dir: Path | None, k: int | None, threads: int = 0,
                 eos_token_ids: list[int] | None = None):
        import torch

        if draft_dir is not None and not k:
            raise ValueError("assisted generation needs k, the draft tokens per round")
        if threads:
            torch.set_num_threads(threads)  # process-wide: torch has no per-model setting
        self._torch = torch
        self.model = _load_hf(target_dir)
        gc = self.model.generation_config
        eos = eos_token_ids if eos_token_ids is not None else gc.eos_token_id
        self.eos = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
        self.pad = gc.pad_token_id if gc.pad_token_id is not None else (self.eos[0] if self.eos else 0)
        self.draft = None
        self.k = k
        if draft_dir is not None:
            self.draft = _load_hf(draft_dir)
            # HF's assisted candidate generator reads these from the *assistant's* generation_config, not from the
            # generate() kwargs: a constant k, and no confidence threshold (it would cut drafts short dynamically).
            dg = self.draft.generation_config
            dg.num_assistant_tokens = k
            dg.num_assistant_tokens_schedule = "constant"
            dg.assistant_confidence_threshold = 0.0

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None) -> PeerRun:
        torch = self._torch
        from transformers.generation.streamers import BaseStreamer

        clock = Clock()

        class Stamps(BaseStreamer):
            """generate() calls put() with the prompt first, then each step's new tokens (a round's accepted
            tokens at once in assisted generation)."""

            def __init__(self):
                self.prompt_seen = False
                self.ids: list[int] = []

            def put(self, value):
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                new = value.reshape(-1).tolist()
                self.ids += new
                clock.tick(len(new))

            def end(self):
                pass

        streamer = Stamps()
        sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or None, top_p=top_p) \
            if temperature > 0 else dict(do_sample=False, temperature=None, top_k=None, top_p=None)
        if seed is not None:
            torch.manual_seed(seed)
        assisted = dict(assistant_model=self.draft, num_assistant_tokens=self.k,
                        num_assistant_tokens_schedule="constant") if self.draft is not None else {}
        x = torch.tensor([prompt_ids], dtype=torch.long)
        clock.t0 = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, min_new_tokens=0,
                                eos_token_id=self.eos or None, pad_token_id=self.pad, streamer=streamer,
                                **sampling, **assisted)
        # HF has no drafted/accepted counters to hand back: drafted and accepted stay None.
        return clock.run(_until_eos(streamer.ids, set(self.eos)))

    def close(self) -> None:
        self.model = self.draft = None


class HFPromptLookup:
    """transformers prompt lookup decoding (`prompt_lookup_num_tokens`) on the source target checkpoint (fp32, CPU):
    up to k tokens copied after an earlier match of the last 1..max_ngram tokens, verified by the target. Its
    counterpart is specedge's LookupDrafter; transformers takes the *first* (leftmost) match, specedge the most
    recent one."""

    def __init__(self, target_dir: Path, k: int, threads: int = 0, eos_token_ids: list[int] | None = None,
                 max_ngram: int = 3):
        import torch

        if not k or k < 1:
            raise ValueError("prompt lookup needs k >= 1, the tokens copied per round")
        if threads:
            torch.set_num_threads(threads)  # process-wide: torch has no per-model setting
        self._torch, self.k, self.max_ngram = torch, k, max_ngram
        self.model = _load_hf(target_dir)
        gc = self.model.generation_config
        eos = eos_token_ids if eos_token_ids is not None else gc.eos_token_id
        self.eos = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
        self.pad = gc.pad_token_id if gc.pad_token_id is not None else (self.eos[0] if self.eos else 0)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None) -> PeerRun:
        torch = self._torch
        from transformers.generation.streamers import BaseStreamer

        clock = Clock()
        ids: list[int] = []

        class Stamps(BaseStreamer):
            """put() gets the prompt first, then each round's accepted tokens at once."""

            def __init__(self):
                self.prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                new = value.reshape(-1).tolist()
                ids.extend(new)
                clock.tick(len(new))

            def end(self):
                pass

        sampling = dict(do_sample=True, temperature=temperature, top_k=top_k or None, top_p=top_p) \
            if temperature > 0 else dict(do_sample=False, temperature=None, top_k=None, top_p=None)
        if seed is not None:
            torch.manual_seed(seed)
        x = torch.tensor([prompt_ids], dtype=torch.long)
        clock.t0 = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, min_new_tokens=0,
                                eos_token_id=self.eos or None, pad_token_id=self.pad, streamer=Stamps(),
                                prompt_lookup_num_tokens=self.k, max_matching_ngram_size=self.max_ngram, **sampling)
        return clock.run(_until_eos(ids, set(self.eos)))

    def close(self) -> None:
        self.model = None


# -- the registry `spec-export bench` iterates: one entry per --baselines name of another runtime ---------------------
@dataclass(frozen=True)
class PeerSetup:
    """What a peer may need: the engine on the bundle (its manifest, EOS ids, folder), bench's draft lengths and
    threads, and a GGUF of the same model (for peers that run one)."""
    engine: object                  # specedge.runtime.Engine
    ks: tuple[int, ...]
    threads: int = 0                # 0: the peer's default
    gguf: Path | None = None


@dataclass(frozen=True)
class PeerEntry:
    """One --baselines name. bench skips it with one line when `needs_draft` and the bundle has none, or when
    `unavailable` gives a reason; otherwise it runs each of `configs`: (configuration name, k or None for plain
    decoding, a function that starts the peer). A started peer has `generate(prompt_ids, max_new_tokens,
    temperature=, top_k=, top_p=, seed=) -> PeerRun` and `close()`."""
    name: str
    help: str
    needs_draft: bool
    unavailable: Callable[[PeerSetup], str | None]
    configs: Callable[[PeerSetup], list[tuple[str, int | None, Callable[[], object]]]]
    # False: the peer computes with its own kernels on its own weight format (llama.cpp: Q4_K_M blocks, int8
    # activations), so its greedy output may part from specedge's plain decoding without anything being wrong;
    # bench leaves it out of the exactness comparison.
    same_weights: bool = True
    # True: the peer runs the fp32 source checkpoints (transformers), the same weights only where the bundle's target
    # is fp32; against a quantized target its outputs are left out of the exactness comparison too.
    on_sources: bool = False

    def compared(self, s: PeerSetup) -> bool:
        """Whether its greedy outputs must equal specedge's plain decoding."""
        return self.same_weights and not (self.on_sources and s.engine.manifest.target.precision != "fp32")


def _importable(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def _genai_unavailable(s: PeerSetup) -> str | None:
    m, bundle = s.engine.manifest, s.engine.bundle
    missing = [r for r in ("target", "draft") if getattr(m, r) and not (bundle / getattr(m, r).graph)
               .with_name("genai_config.json").is_file()]
    if missing:
        return (f"{bundle} was exported through {getattr(m, missing[0]).builder}, which writes no "
                f"genai_config.json; onnxruntime-genai runs bundles built by its model builder only")
    if not _importable("onnxruntime_genai"):
        return "onnxruntime-genai is not installed (pip install onnxruntime-genai)"
    return None


def _sources(s: PeerSetup) -> tuple[Path, Path | None]:
    """The source checkpoints the bundle was exported from: (target, draft or None)."""
    comp = s.engine.manifest.compatibility
    draft = comp.get("draft")
    return Path(comp["target"]["path"]), Path(draft["path"]) if draft else None


def _hf_unavailable(s: PeerSetup, with_draft: bool) -> str | None:
    target, draft = _sources(s)
    sources = [target, draft] if with_draft and draft else [target]
    if not all(p.is_dir() for p in sources):
        return f"transformers needs the source checkpoints {' and '.join(map(str, sources))}, which are gone"
    if not _importable("torch", "transformers"):
        return "torch and transformers are not installed (pip install 'specedge[export]')"
    return None


def _eos(s: PeerSetup) -> list[int]:
    return list(s.engine.manifest.tokenizer.eos_token_ids)


def _llamacpp_unavailable(s: PeerSetup) -> str | None:
    from .llamacpp import find_binary

    if s.gguf is None:
        return "llama.cpp needs a GGUF of the same model: pass --gguf FILE"
    if not Path(s.gguf).is_file():
        return f"--gguf {s.gguf} does not exist"
    return find_binary()[1]


def _llamacpp(s: PeerSetup, spec):
    from .llamacpp import LlamaCpp

    return LlamaCpp(s.gguf, spec, s.threads, _eos(s))


def _llama_sweep():
    from .llamacpp import SWEEP

    return SWEEP


PEERS: tuple[PeerEntry, ...] = (
    PeerEntry("ort-genai", "onnxruntime-genai's draft-model speculation on the bundle's graphs, at each k", True,
              _genai_unavailable,
              lambda s: [(f"ort-genai-k{k}", k, lambda k=k: OrtGenAI(s.engine.bundle, k, s.threads)) for k in s.ks]),
    PeerEntry("ort-genai-plain", "onnxruntime-genai's plain decoding on the bundle's target graph", False,
              _genai_unavailable,
              lambda s: [("ort-genai-plain", None, lambda: OrtGenAI(s.engine.bundle, None, s.threads))]),
    PeerEntry("hf", "transformers assisted generation on the source checkpoints, at each k", True,
              lambda s: _hf_unavailable(s, True),
              lambda s: [(f"hf-k{k}", k, lambda k=k: HFAssisted(*_sources(s), k, s.threads, _eos(s)))
                         for k in s.ks], on_sources=True),
    PeerEntry("hf-plain", "transformers greedy/sampled generate on the source target checkpoint", False,
              lambda s: _hf_unavailable(s, False),
              lambda s: [("hf-plain", None, lambda: HFAssisted(_sources(s)[0], None, None, s.threads, _eos(s)))],
              on_sources=True),
    PeerEntry("hf-lookup", "transformers prompt lookup (prompt_lookup_num_tokens) on the source target, at each k",
              False, lambda s: _hf_unavailable(s, False),
              lambda s: [(f"hf-lookup-k{k}", k, lambda k=k: HFPromptLookup(_sources(s)[0], k, s.threads, _eos(s)))
                         for k in s.ks], on_sources=True),
    PeerEntry("ort-genai-ngram", "onnxruntime-genai 0.18's n-gram decoding on the bundle's target graph, at each k",
              False, lambda s: _genai_unavailable(s) or ort_genai_ngram_unsupported(),
              lambda s: [(f"ort-genai-ngram-k{k}", k, lambda k=k: OrtGenAI(s.engine.bundle, k, s.threads, ngram=3))
                         for k in s.ks]),
    PeerEntry("llama.cpp", "llama.cpp's llama-server on --gguf (the same model), plain decoding", False,
              _llamacpp_unavailable,
              lambda s: [("llama.cpp", None, lambda: _llamacpp(s, None))], same_weights=False),
    PeerEntry("llama.cpp-ngram", "llama.cpp's n-gram speculation (ngram-simple, ngram-mod, ngram-map-k) at draft "
              "lengths 4, 8, 16 and lookup lengths its default and 4, one server each", False, _llamacpp_unavailable,
              lambda s: [(spec.name, spec.draft, lambda spec=spec: _llamacpp(s, spec)) for spec in _llama_sweep()],
              same_weights=False),
)

