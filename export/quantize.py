"""Weight-only int4/int8 targets that stay exact: quantize an fp32 builder graph's MatMuls to MatMulNBits, and check
that a w-token verify pass computes the same rows as w single steps.

Why a check and not a tolerance: MatMulNBits with int8 activations (accuracy_level 4, the fast CPU path) quantizes
each activation row to int8 before the product. A 1e-6 difference in an input row (float rounding of another kernel)
can move one activation across an int8 rounding boundary, which changes that row's product by a whole quantization
step, and the next layer amplifies it: logits then differ by whole units and greedy picks another token. With fp32
activations the same 1e-6 stays 1e-6. So a quantized target is exact only if every row is computed *bitwise* the
same whatever the step's width, and the check below measures exactly that (argmax at every position, logits and the
KV rows a verify pass writes).

On onnxruntime 1.32's CPU provider, a one-token step can take other kernels than a step of 2 or more tokens:
MLAS's M = 1 paths (MatMulNBits' single-row kernel, SGEMM's GEMV). In Gemma 3 270M's int4 builder graph (stop 26)
the paths parted at the first op, layer 0's qkv MatMulNBits (|Δ| 8e-5, float rounding); the next MatMulNBits turned
that into 4e-3 (int8 rounding flips) and the logits ended 2-5 apart. GroupQueryAttention's one-row step takes the
GEMV for P·V on every CPU measured. Every width from 2 up gives rows identical bit for bit. Hence two ways to make
every row alike: the graph runs its attention on at least MIN_WIDTH rows (graphs.pad_attention: the step's last
query/key/value row repeated, its output dropped), which is enough where MatMulNBits' one-row kernel gives the row
of a wider product bit for bit (8 bits at blocks 32 and 64 on the AMD EPYC and the tiny test models: plain decoding
then runs MatMulNBits on one row, 1.07-1.21x faster for Gemma 3 270M int8 after 64 to 800 tokens of context); else the
runtime pads every step to min_width tokens (KVModel._last). The check decides, per graph, trying the first and then
the second. The padded rows' KV rows lie past the position and the next step overwrites them. On a tiny model
(head_dim 16) GroupQueryAttention's SGEMM also gives the 33rd row of a 33-token step other bits, so no padding makes
width 33 exact and `choose_precision` falls back.

A second split, by context length (runtime/switches.py): GroupQueryAttention's SGEMMs round one way up to some
context lengths and another past them, and where depends on the CPU: past 64 (and 64 past each multiple of a sliding
window) on an AVX-512 Xeon, where a pass across position 63 parted from single steps (Gemma 3 270M int8: widths
17..33 after a 47-token prefix); also past 192, 320, ... (every 128) on an AMD EPYC. The runtime splits a pass at
each switch, those above and those the bundle's attention probe finds on the CPU it runs on. The check runs the
runtime's own KVModel, padding, probe and splitting included, over contexts across every switch the export's CPU has.

The KV cache of a quantized target is float16 (KV_DTYPE, graphs.half_kv, which has the numbers): attention reads
the whole cache every step. onnxruntime's CPU attention then converts the cache to float32 buffers of its own before
its products, which switch rounding at other context lengths (on the AMD EPYC only past 64: the probe is written in
the cache's type). A candidate is checked twice (choose_precision): with a float32 cache, where no float16 rounding
can hide a row computed another way, and as shipped.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..runtime.manifest import ModelSpec
from .osutil import save_graph

BLOCK_SIZE = 32        # weights per scale; 32 is MLAS's fastest int8-compute block on AVX2/AVX512
# The blocks each candidate is tried with, in order. int8 first at 64: half the scales' bytes (a step reads 9 bits
# per weight at block 32, 8.5 at 64), plain decoding 1.08-1.20x faster for Gemma 3 270M on the AMD EPYC (top-1
# agreement with fp32 0.979, mean KL 0.0037); the step check decides, as block 128 is not exact there.
BLOCKS = {"int4": (BLOCK_SIZE,), "int8": (64, BLOCK_SIZE)}
ACCURACY_LEVEL = 4     # 4: int8 activations (the fast CPU path); 0/1: fp32 activations (exact at width 1, 2x slower)
KV_DTYPE = "float16"   # a quantized CPU target's KV cache (export/graphs.half_kv says why); its probe's too
# Bump when what choose_precision writes changes (2: a float16 cache; 3: the attention padded in the graph; 4: int8
# at block 64 first): cached bundles recorded with another (tools/demo_real.py, tools/demo.py) are exported again.
QUANTIZE_VERSION = 4
WIDTHS = range(1, 34)  # 1 .. MAX_K + 1: every step size speculative decoding uses


def quantize_graph(src: Path, out: Path, bits: int = 4, block_size: int = BLOCK_SIZE,
                   accuracy_level: int = ACCURACY_LEVEL, symmetric: bool = True, head_bits: int | None = None,
                   exclude: tuple[str, ...] = ()) -> Path:
    """Write src/model.onnx (an fp32 graph) with every weight MatMul as MatMulNBits (`bits` 4 or 8) to out/model.onnx
    (+ model.onnx.data); the folder's other files (genai_config.json, ...) are copied. `head_bits`: other bits for
    the LM head (the MatMul that writes the logits; None: `bits`). `exclude`: MatMul node names to keep fp32.
    Returns out/model.onnx."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from .draft_vocab import lm_head
    from .graphs import untie_transposed_weights

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)   # a line per node otherwise

    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src / "model.onnx"))
    untie_transposed_weights(model)   # a tied head read through Transpose gets its own (quantizable) copy
    head = lm_head(model.graph, {o: n for n in model.graph.node for o in n.output})  # through softcapping too
    head = head.name if head is not None else ""
    passes = [(bits, [*exclude, head] if head_bits not in (None, bits) else list(exclude), None)]
    if head_bits not in (None, bits):
        passes.append((head_bits, list(exclude), [head]))   # second pass: the head alone
    for b, skip, only in passes:
        q = MatMulNBitsQuantizer(model, bits=b, block_size=block_size, is_symmetric=symmetric,
                                 accuracy_level=accuracy_level, nodes_to_exclude=skip, nodes_to_include=only)
        q.process()
        model = q.model.model
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model.onnx"):
            shutil.copyfile(f, out / f.name)
    save_graph(model, out / "model.onnx")
    return out / "model.onnx"


def graph_spec(path: Path, max_length: int = 256, min_step: int = 1, windows: tuple[int, ...] = ()) -> ModelSpec:
    """A ModelSpec for a builder graph outside a bundle (read off the graph and its genai_config.json), so
    runtime.kv.open_model can drive it; max_length is capped so that a padded step fits the graph's context length."""
    from .graphs import graph_io
    from .torch_export import PAST_KEY, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE

    path = Path(path)
    io = graph_io(path)
    model = json.loads((path.parent / "genai_config.json").read_text())["model"]
    cfg = model["decoder"]
    width = max(min_step, io["attention_rows"])   # the rows of room a padded step writes past max_length
    max_length = min(max_length, (model.get("context_length") or max_length) - width + 1)   # the rotary cache
    return ModelSpec(role="target", architecture="?", model_type="?", parameters=0, precision="?", provider="cpu",
                     graph=path.name, builder="onnxruntime-genai model builder", past_key=PAST_KEY,
                     past_value=PAST_VALUE, present_key=PRESENT_KEY, present_value=PRESENT_VALUE,
                     num_layers=cfg["num_hidden_layers"], num_kv_heads=cfg["num_key_value_heads"],
                     head_dim=cfg["head_size"], max_length=max_length, rewindable=True, min_step=min_step,
                     windows=tuple(windows), **io)


def open_graph(path: Path, max_length: int = 256, threads: int = 0, min_step: int = 1, windows: tuple[int, ...] = ()):
    """A runtime KVModel on a graph file outside a bundle; min_step: its steps' minimum width, windows: its layers'
    sliding windows (both shape how KVModel._last pads and splits steps)."""
    from ..runtime.kv import open_model

    path = Path(path)
    return open_model(path.parent, graph_spec(path, max_length, min_step, windows), "cpu", threads)


@dataclass(frozen=True)
class WidthCheck:
    """One verify width w against w single steps (both padded to min_width when narrower)."""
    width: int
    positions: int            # rows compared (over all prompts)
    argmax_agree: int         # rows whose argmax is the same
    max_logit_diff: float     # max |Δlogit| over those rows
    max_kv_diff: float        # max |Δ| over the KV rows the verify pass writes, every layer, keys and values
    bitwise: bool             # logits and KV rows identical bit for bit

    @property
    def argmax_ok(self) -> bool:
        return self.argmax_agree == self.positions


@dataclass(frozen=True)
class StepReport:
    min_width: int
    widths: tuple[WidthCheck, ...]

    @property
    def exact(self) -> bool:
        """Every width computes every row bit for bit as single steps do: exact whatever the schedule of widths."""
        return all(w.bitwise for w in self.widths)

    @property
    def argmax_ok(self) -> bool:
        return all(w.argmax_ok for w in self.widths)

    def summary(self) -> str:
        bad = [w.width for w in self.widths if not w.bitwise]
        worst = max(self.widths, key=lambda w: w.max_logit_diff)
        agree = sum(w.argmax_agree for w in self.widths), sum(w.positions for w in self.widths)
        return (f"min_width {self.min_width}: argmax {agree[0]}/{agree[1]}, max |Δlogit| {worst.max_logit_diff:.3g} "
                f"(width {worst.width}), bitwise at {len(self.widths) - len(bad)}/{len(self.widths)} widths"
                + (f" (not at {bad})" if bad else ""))

    def to_dict(self) -> dict:
        return {"min_width": self.min_width, "exact": self.exact, "argmax_ok": self.argmax_ok,
                "widths": [dict(w.__dict__) for w in self.widths]}


def _kv_rows(model, lo: int, hi: int) -> np.ndarray:
    """Cache rows lo..hi-1 of every layer, keys and values: (layers, 2, kv_heads, hi - lo, head_dim)."""
    out = []
    for i in range(model.spec.num_layers):
        k, v = model.kv(i)
        out.append(np.stack([k[:, lo:hi], v[:, lo:hi]]))
    return np.stack(out)


def step_consistency(graph, prompts: list[list[int]], widths=WIDTHS, min_width: int = 1, threads: int = 0,
                     max_length: int = 256, windows: tuple[int, ...] = ()) -> StepReport:
    """Per width w: after each prompt's prefix, one w-token verify pass against w single steps over the same tokens,
    both through the runtime's own KVModel, which pads and splits steps as it would at run time (KVModel._last).
    `graph`: the path of a builder graph file, opened with steps of at least `min_width` tokens, or a KVModel (its
    own min_step applies). Each prompt needs at least max(widths) + 1 tokens: its last max(widths) are stepped."""
    model = graph if hasattr(graph, "forward") else open_graph(Path(graph), max_length, threads, min_width, windows)
    widths = tuple(widths)
    n = max(widths)
    stats = {w: [0, 0, 0.0, 0.0, True] for w in widths}   # positions, agree, max logit diff, max kv diff, bitwise

    def step(ids: np.ndarray, p: int) -> np.ndarray:
        model.rewind(p)
        return model.forward(ids).copy()                                                # (len(ids), vocab)

    for prompt in prompts:
        ids = np.asarray(prompt, np.int64)
        if len(ids) < n + 1 or len(ids) + model.spec.min_step > model.spec.max_length:
            raise ValueError(f"a prompt of {len(ids)} tokens cannot check widths up to {n} in a cache of "
                             f"{model.spec.max_length}")
        cut = len(ids) - n
        model.reset()
        model.forward(ids[:cut])
        single = np.stack([step(ids[i : i + 1], i)[0] for i in range(cut, len(ids))])   # (n, vocab)
        single_kv = _kv_rows(model, cut, len(ids))                                        # (L, 2, h, n, d)
        for w in widths:
            multi = step(ids[cut : cut + w], cut)                                          # (w, vocab)
            kv = _kv_rows(model, cut, cut + w)
            s = stats[w]
            s[0] += w
            s[1] += int((multi.argmax(-1) == single[:w].argmax(-1)).sum())
            s[2] = max(s[2], float(np.abs(multi - single[:w]).max()))
            s[3] = max(s[3], float(np.abs(kv - single_kv[:, :, :, :w]).max()))
            s[4] = s[4] and np.array_equal(multi, single[:w]) and np.array_equal(kv, single_kv[:, :, :, :w])
    return StepReport(model.spec.min_step, tuple(WidthCheck(w, *stats[w]) for w in widths))


def min_exact_width(graph: Path, prompts: list[list[int]], widths=WIDTHS, candidates=(1, 2, 3, 4), threads: int = 0):
    """The smallest min_width at which every width of the graph file is bitwise exact, with its report; (None, last
    report) if none."""
    report = None
    for m in candidates:
        report = step_consistency(graph, prompts, widths, m, threads)
        if report.exact:
            return m, report
    return None, report


@dataclass(frozen=True)
class Distance:
    """A quantized graph against its fp32 source on the same tokens: the fp32 graph's greedy continuations of the
    prompts, both graphs teacher-forced over them."""
    positions: int
    top1_agreement: float     # share of positions where the quantized argmax is the fp32 greedy token
    mean_kl: float            # mean KL(p_fp32 || p_quantized), nats

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def distance(graph, reference, prompts: list[list[int]], new_tokens: int = 32) -> Distance:
    """How far `graph` (quantized) is from `reference` (the fp32 graph it came from): KVModels or graph paths."""
    q = graph if hasattr(graph, "forward") else open_graph(Path(graph), 1024)
    ref = reference if hasattr(reference, "forward") else open_graph(Path(reference), 1024)
    agree, kl, n = 0, 0.0, 0
    for prompt in prompts:
        ref.reset()
        tok = int(ref.forward(prompt, "argmax")[-1])
        cont = [tok]
        for _ in range(new_tokens - 1):
            cont.append(int(ref.forward([cont[-1]], "argmax")[0]))
        rows = []
        for model in (ref, q):   # logits at the last prompt position and at each continuation token but the last
            model.reset()
            last = model.forward(prompt)[-1:]                          # (1, vocab)
            rows.append(np.concatenate([last, model.forward(cont[:-1])]) if len(cont) > 1 else last)
        lp, lq = _log_softmax(rows[0].astype(np.float64)), _log_softmax(rows[1].astype(np.float64))
        agree += int((rows[1].argmax(-1) == np.array(cont)).sum())
        kl += float((np.exp(lp) * (lp - lq)).sum())
        n += len(cont)
    return Distance(n, agree / n, kl / n)


MIN_WIDTH = 2        # the fewest rows a quantized CPU target's attention (or, failing that, whole step) runs: see above
MIN_TOP1 = 0.95      # a quantized target's top-1 agreement with its fp32 source on held-out greedy continuations


@dataclass(frozen=True)
class Choice:
    """What `--target-precision auto` picked, and why (one line per precision tried)."""
    precision: str                 # int4 | int8 | fp32
    block_size: int                # weights per scale (0 for fp32)
    min_width: int                 # pad every step of the target to at least this many tokens (1: no padding)
    graph: Path                    # the chosen graph file
    reasons: tuple[str, ...]
    report: StepReport | None      # the chosen graph's step check (None for fp32: parity checks it as before)
    distance: Distance | None      # the chosen graph against fp32 (None for fp32)


def choose_precision(fp32_dir: Path, out_root: Path, prompts: list[list[int]], heldout: list[list[int]],
                     candidates=("int4", "int8"), min_width: int = MIN_WIDTH, min_top1: float = MIN_TOP1,
                     threads: int = 0, windows: tuple[int, ...] = ()) -> Choice:
    """`--target-precision auto`: quantize the fp32 builder graph in fp32_dir to each candidate in turn, at each
    of its BLOCKS (int8-compute MatMulNBits) into out_root/<precision>/, run its attention on at least min_width
    rows (graphs.pad_attention), then give it a KV_DTYPE cache (graphs.half_kv), and keep the first whose greedy top-1
    agreement with fp32 on `heldout` prompts is >= min_top1 and that is bitwise exact at every width 1..MAX_K+1,
    with a float32 cache and with its own: with unpadded steps if it can be, else with every step padded to
    min_width tokens; else the fp32 graph. `prompts`: token ids, each at least MAX_K + 2 long (the step check);
    `heldout`: held-out prompts (the distance); `windows`: the target's sliding windows, per layer.

    Why both caches: rows computed alike stay alike once rounded to float16, but the rounding can also hide rows
    computed another way (a last-bit difference that happens to round to the same float16 on the prompts checked,
    and not on the next). With a float32 cache the check sees whether the kernels compute every row alike, which
    does not depend on the values; with float16, that the graph shipped is exact."""
    from .graphs import half_kv, pad_attention

    reasons, reference = [], Path(fp32_dir) / "model.onnx"

    def check(path: Path, cache: str, width: int) -> tuple[StepReport, str]:
        report = step_consistency(path, prompts, min_width=width, threads=threads,
                                  max_length=max(map(len, prompts)) + min_width, windows=windows)
        return report, "" if report.exact else f"not exact with a {cache} cache, {report.summary()}"

    def far(d: Distance) -> str:
        return f"top-1 agreement with fp32 {d.top1_agreement:.3f} < {min_top1} (mean KL {d.mean_kl:.3g})" \
            if d.top1_agreement < min_top1 else ""

    for precision, block in ((p, b) for p in candidates for b in BLOCKS[p]):
        name = f"{precision} (block {block})"
        path = quantize_graph(fp32_dir, Path(out_root) / precision, bits={"int4": 4, "int8": 8}[precision],
                              block_size=block)
        d = distance(path, reference, heldout)   # first: the cheapest check
        why, width = far(d), 1
        if not why:
            _rewrite(path, lambda m: pad_attention(m, min_width))
            why = check(path, "float32", 1)[1]
            if why and min_width > 1:   # MatMulNBits' one-row kernel parts from its wider one (int4): pad it all
                width, why = min_width, check(path, "float32", min_width)[1]
        if not why:
            _rewrite(path, half_kv)
            d = distance(path, reference, heldout)
            report, why = check(path, KV_DTYPE, width)
            why = far(d) or why
        if why:
            reasons.append(f"{name}: {why}")
            continue
        steps = f"attention on >= {min_width} rows" if width == 1 else f"steps of >= {width} tokens"
        reasons.append(f"{name}: exact at every width 1..{max(WIDTHS)} ({steps}, a {KV_DTYPE} KV cache); "
                       f"top-1 agreement with fp32 {d.top1_agreement:.3f}, mean KL {d.mean_kl:.3g}")
        return Choice(precision, block, width, path, tuple(reasons), report, d)
    reasons.append("fp32: the exact fallback")
    return Choice("fp32", 0, 1, reference, tuple(reasons), None, None)


def _rewrite(path: Path, change) -> None:
    """change(model) on a graph file and its external weights, rewritten in place; an attention probe beside it is
    written again for the graph as changed (half_kv changes the attention's type)."""
    from ..runtime.switches import PROBE_FILE
    from .probe import write_attention_probe

    model = onnx.load(str(path))
    change(model)
    save_graph(model, path)
    if (path.parent / PROBE_FILE).is_file():
        write_attention_probe(path)
