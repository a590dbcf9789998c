"""Peers for the side-by-side benchmark: other runtimes doing the same job on the same models.

* `OrtGenAI`: onnxruntime-genai on the bundle's own graphs, plain or with its built-in draft-model speculative
  decoding (`model.draft` + `speculative.max_draft_tokens` in genai_config.json).
* `HFAssisted`: transformers `generate`, plain or assisted (`assistant_model=`), on the source PyTorch checkpoints.

Both return a `PeerRun` timed from the caller's side, token by token, the way a user of that runtime would see it.
onnxruntime_genai, torch and transformers are imported inside the classes, so this module imports without them.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class PeerRun:
    token_ids: list[int]          # generated tokens only (no prompt), stopping at EOS (excluded) or max_new_tokens
    ttft_ms: float                # request start to the first generated token
    token_ms: list[float] = field(default_factory=list)  # gaps between consecutive tokens as observed (n - 1)
    drafted: int | None = None    # from the peer's own speculative counters, where it has them
    accepted: int | None = None


class _Clock:
    """Timestamps tokens as the caller receives them; tokens that arrive together get gaps of 0."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.stamps: list[float] = []

    def tick(self, n: int = 1) -> None:
        self.stamps += [time.perf_counter()] * n

    def run(self, token_ids: list[int], **counters) -> PeerRun:
        s = self.stamps[:len(token_ids)]
        if not s:
            return PeerRun([], 0.0, [], **counters)
        return PeerRun(token_ids, 1e3 * (s[0] - self.t0), [1e3 * (b - a) for a, b in zip(s, s[1:])], **counters)


def _until_eos(ids: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return ids


class OrtGenAI:
    """onnxruntime-genai on a bundle. k: draft tokens per round (og's fixed-width speculative decoding, adaptive k
    off); None: plain decoding of the target alone.

    og reads a model folder with one genai_config.json, so this builds one in a temporary folder: symlinks to the
    bundle's graphs (each beside its external-data file, which ORT resolves next to the graph) and tokenizer files,
    and a config that is the target's with the draft's decoder block added as `model.draft`. The bundle is untouched.
    """

    def __init__(self, bundle: Path, k: int | None, threads: int = 0):
        import onnxruntime_genai as og

        self._og = og
        bundle = Path(bundle).resolve()
        manifest = json.loads((bundle / "manifest.json").read_text())
        self.k = k
        self.eos = set(manifest["tokenizer"]["eos_token_ids"])
        # Same context as specedge's Engine: what both KV buffers hold.
        self.max_length = min(manifest["target"]["max_length"], manifest["draft"]["max_length"])
        self.dir = Path(tempfile.mkdtemp(prefix="specedge-ortgenai-"))
        try:
            config = self._link(bundle, manifest, "target")
            model = config["model"]
            model["decoder"]["filename"] = "target/model.onnx"  # og wants paths relative to the folder, no ".."
            # EOS from the manifest, as specedge stops on it (the builder's genai_config should agree).
            model["eos_token_id"] = sorted(self.eos) if len(self.eos) > 1 else next(iter(self.eos))
            model["context_length"] = self.max_length
            self.vocab_size = int(model["vocab_size"])
            if k is not None:
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
        clock = _Clock()  # includes creating the generator: og allocates its KV buffers per request
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


class HFAssisted:
    """transformers generate on the source checkpoints (fp32, CPU): plain greedy (draft None), or assisted generation
    with the draft proposing a fixed k tokens per round."""

    def __init__(self, target_dir: Path, draft_dir: Path | None, k: int | None, threads: int = 0,
                 eos_token_ids: list[int] | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        if draft_dir is not None and not k:
            raise ValueError("assisted generation needs k, the draft tokens per round")
        if threads:
            torch.set_num_threads(threads)  # process-wide: torch has no per-model setting
        self._torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
        gc = self.model.generation_config
        eos = eos_token_ids if eos_token_ids is not None else gc.eos_token_id
        self.eos = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
        self.pad = gc.pad_token_id if gc.pad_token_id is not None else (self.eos[0] if self.eos else 0)
        self.draft = None
        self.k = k
        if draft_dir is not None:
            self.draft = AutoModelForCausalLM.from_pretrained(str(draft_dir), dtype=torch.float32).eval()
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

        clock = _Clock()

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
        from transformers import AutoModelForCausalLM

        if not k or k < 1:
            raise ValueError("prompt lookup needs k >= 1, the tokens copied per round")
        if threads:
            torch.set_num_threads(threads)  # process-wide: torch has no per-model setting
        self._torch, self.k, self.max_ngram = torch, k, max_ngram
        self.model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
        gc = self.model.generation_config
        eos = eos_token_ids if eos_token_ids is not None else gc.eos_token_id
        self.eos = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
        self.pad = gc.pad_token_id if gc.pad_token_id is not None else (self.eos[0] if self.eos else 0)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None) -> PeerRun:
        torch = self._torch
        from transformers.generation.streamers import BaseStreamer

        clock = _Clock()
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
