"""Where does an int4 verify pass part from single steps? Op by op, on one builder graph.

    python benchmarks/int4_consistency.py ops GRAPH_DIR [--width 5] [--min-width 1] [--threads 2]
    python benchmarks/int4_consistency.py widths GRAPH_DIR [--min-width 1 2] [--threads 1 2]
    python benchmarks/int4_consistency.py gemv [--threads 1 2]
    python benchmarks/int4_consistency.py speed FP32_DIR INT4_DIR:2 ... [--threads 2] [--rounds 2] [--prompt-len 100]
    python benchmarks/int4_consistency.py distance INT4_DIR FP32_DIR [--prompts 8]
    python benchmarks/int4_consistency.py profile DIR:MIN_WIDTH [--prompt-len 64 550 800] [--steps 64]
    python benchmarks/int4_consistency.py attention DIR [--prompt-len 64 512 800 1500]

`ops`: every float intermediate of GRAPH_DIR/model.onnx becomes a graph output; one w-token pass after a prefix
and w single steps over the same tokens run through a plain session (KV buffers of the full length, as the runtime
binds them); the script prints, in graph order, each op whose rows differ between the two paths (bitwise) and by
how much, so the first line is where they part. `widths`: export.quantize.step_consistency at each width 1..33 per
minimum step width and thread count. `gemv`: one MatMulNBits node alone, rows of X[:w] across widths.
`profile`: onnxruntime's profiler over plain decoding steps after each prompt length, time per step by op type.
`attention`: the graph's attention alone (one GroupQueryAttention node per layer, each with its own cache, as cold as
in the model), milliseconds per step by context length, rows per step (1, 2) and cache type (float32, float16).
Results go to benchmarks/results/int4-consistency-*.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from specedge.export.quantize import graph_spec, step_consistency

RESULTS = Path(__file__).parent / "results"
MAX_LENGTH = 256


def prompt_ids(graph_dir: Path, n: int) -> list[int]:
    """n ids of real text when the graph folder's tokenizer is at hand (a bundle's root, or the HF folder beside
    the export), else seeded random ids."""
    for tok in (graph_dir / "tokenizer.json", graph_dir.parent / "tokenizer.json"):
        if tok.is_file():
            from tokenizers import Tokenizer

            from specedge.export.parity import long_prompt

            return long_prompt(Tokenizer.from_file(str(tok)), n)
    vocab = graph_spec(graph_dir / "model.onnx").vocab_size
    return np.random.default_rng(0).integers(3, vocab, n).tolist()


# -- ops: every intermediate as an output ---------------------------------------------------------------------------

def dump_model(path: Path) -> tuple[Path, list[str]]:
    """PATH's graph with every float node output added as a graph output, saved beside it (same external data)."""
    m = onnx.load(str(path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(m)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    have = {o.name for o in m.graph.output}
    added = []
    for node in m.graph.node:
        if node.op_type in ("Constant", "Shape", "Cast", "ReduceSum", "Sub"):   # the mask's integer bookkeeping
            continue
        for o in node.output:
            if o and o not in have and types.get(o, TensorProto.FLOAT) == TensorProto.FLOAT:
                m.graph.output.append(helper.make_tensor_value_info(o, TensorProto.FLOAT, None))
                added.append(o)
    out = path.with_name("dump." + path.name)
    onnx.save(m, str(out))
    return out, added


class Runner:
    """A plain session over a builder graph: full-length KV arrays carried from step to step, mask = ones up to
    pos + n (what runtime.kv.InplaceKV binds, without IOBinding so that extra outputs come back)."""

    def __init__(self, path: Path, threads: int):
        spec = graph_spec(path, MAX_LENGTH)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        self.s, self.spec = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]), spec
        self.names = [o.name for o in self.s.get_outputs()]
        shape = (1, spec.num_kv_heads, MAX_LENGTH, spec.head_dim)
        self.kv = {n.format(i=i): np.zeros(shape, np.float32) for i in range(spec.num_layers)
                   for n in (spec.past_key, spec.past_value)}

    def run(self, ids: list[int], pos: int) -> dict[str, np.ndarray]:
        mask = np.zeros((1, MAX_LENGTH), np.int64)
        mask[0, : pos + len(ids)] = 1
        out = dict(zip(self.names, self.s.run(None, {"input_ids": np.array([ids], np.int64), "attention_mask": mask,
                                                      **self.kv})))
        for i in range(self.spec.num_layers):
            for past, present in ((self.spec.past_key, self.spec.present_key),
                                  (self.spec.past_value, self.spec.present_value)):
                self.kv[past.format(i=i)] = out[present.format(i=i)]
        return out


def ops(graph_dir: Path, width: int, min_width: int, threads: int, prefix: int) -> dict:
    path, _ = dump_model(graph_dir / "model.onnx")
    r = Runner(path, threads)
    kv_names = {t.format(i=i) for i in range(r.spec.num_layers) for t in (r.spec.present_key, r.spec.present_value)}
    ids = prompt_ids(graph_dir, prefix + width)
    pad = lambda x: x + [0] * max(0, min_width - len(x))   # noqa: E731
    wide, one = max(width, min_width), min_width   # rows of the verify pass, rows of a single step
    r.run(ids[:prefix], 0)
    kv0 = {k: v.copy() for k, v in r.kv.items()}
    multi = r.run(pad(ids[prefix:]), prefix)
    r.kv = {k: v.copy() for k, v in kv0.items()}
    singles = [r.run(pad(ids[prefix + i : prefix + i + 1]), prefix + i) for i in range(width)]
    order = [o for n in onnx.load(str(path), load_external_data=False).graph.node for o in n.output if o in multi]
    parted, compared = [], 0
    for name in order:
        m, s0 = multi[name], singles[0][name]
        if name in kv_names:     # (1, kv_heads, max_length, head_dim): the rows each path wrote
            m = m[:, :, prefix : prefix + width]
            s = np.concatenate([singles[i][name][:, :, prefix + i : prefix + i + 1] for i in range(width)], axis=2)
            m, s = m.transpose(2, 0, 1, 3), s.transpose(2, 0, 1, 3)
        elif m.ndim >= 2 and m.shape[:2] == (1, wide) and s0.shape[:2] == (1, one):   # (1, n, ...): by token
            m = m[0, :width]
            s = np.concatenate([singles[i][name][0, :1] for i in range(width)])
        else:
            continue             # not laid out by token (weights, reshaped heads): its consumers are compared
        compared += 1
        if not np.array_equal(m, s):
            per_row = np.abs(m - s).reshape(width, -1).max(-1)
            parted.append({"output": name, "max_abs_diff": float(per_row.max()),
                           "rows_differing": [int(i) for i in np.nonzero(per_row > 0)[0]]})
    path.unlink()
    return {"graph": str(graph_dir), "width": width, "min_width": min_width, "threads": threads, "prefix": prefix,
            "outputs_compared": compared, "parted": parted}


# -- widths ----------------------------------------------------------------------------------------------------------

def widths(graph_dir: Path, min_widths: list[int], threads: list[int], n_prompts: int) -> dict:
    from specedge.export.quantize import open_graph

    base = prompt_ids(graph_dir, 40 + 33 * n_prompts)
    prompts = [base[: 40 + 33 * (i + 1)] for i in range(n_prompts)]   # prefixes of different lengths
    out = []
    for t in threads:
        for m in min_widths:
            rep = step_consistency(graph_dir / "model.onnx", prompts, min_width=m, threads=t, max_length=MAX_LENGTH + 64)
            print(f"threads {t}: {rep.summary()}", flush=True)
            out.append({"threads": t, **rep.to_dict()})
    return {"graph": str(graph_dir), "runs": out}


# -- gemv: one MatMulNBits node ----------------------------------------------------------------------------------------

def gemv(threads: list[int], shapes=((640, 2048), (2048, 640), (640, 32768))) -> dict:
    """Y = X[:w] @ W through one MatMulNBits node; which rows of which widths equal the rows of the widest pass."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.disable(logging.INFO)
    res = []
    for K, N in shapes:
        rng = np.random.default_rng(0)
        w = numpy_helper.from_array((rng.standard_normal((K, N)) * 0.05).astype(np.float32), "W")
        g = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, "M", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, "M", N])], [w])
        x = rng.standard_normal((1, 80, K)).astype(np.float32)
        for acc in (0, 4):
            q = MatMulNBitsQuantizer(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]),
                                     block_size=32, is_symmetric=True, accuracy_level=acc)
            q.process()
            for t in threads:
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = t
                s = ort.InferenceSession(q.model.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
                ref = s.run(None, {"X": x})[0][0]
                bad = {}
                for n in range(1, 81):
                    y = s.run(None, {"X": x[:, :n]})[0][0]
                    diff = [i for i in range(n) if not np.array_equal(y[i], ref[i])]
                    if diff:
                        bad[n] = diff
                print(f"K={K} N={N} accuracy_level={acc} threads={t}: widths with rows unlike the 80-row pass: "
                      f"{ {k: v for k, v in bad.items()} }", flush=True)
                res.append({"K": K, "N": N, "accuracy_level": acc, "threads": t,
                            "differing_rows_by_width": {str(k): v for k, v in bad.items()}})
    return {"runs": res}


# -- distance: a quantized graph against its fp32 source on held-out text --------------------------------------------

def distance_run(quantized: Path, fp32: Path, n_prompts: int, new_tokens: int = 32, max_prompt: int = 200) -> dict:
    """benchmarks/heldout.jsonl's first n prompts (cut to their last max_prompt tokens), fp32 greedy continuations."""
    from tokenizers import Tokenizer

    from specedge.export.quantize import distance

    tok = Tokenizer.from_file(str(fp32.parent / "tokenizer.json"))
    lines = [json.loads(x) for x in (Path(__file__).parent / "heldout.jsonl").read_text().splitlines() if x.strip()]
    prompts = [tok.encode(d["prompt"]).ids[-max_prompt:] for d in lines[:n_prompts]]
    d = distance(quantized / "model.onnx", fp32 / "model.onnx", prompts, new_tokens)
    print(f"{quantized.name} vs {fp32.name}: top-1 agreement {d.top1_agreement:.3f}, mean KL {d.mean_kl:.4f} "
          f"over {d.positions} positions ({len(prompts)} prompts)")
    return {"quantized": str(quantized), "fp32": str(fp32), "prompts": len(prompts), **d.to_dict()}


# -- speed: plain decoding, one (padded) step per token ------------------------------------------------------------

def decode_rate(model, prompt: list[int], steps: int, min_width: int) -> float:
    """Greedy tokens/s of plain decoding after the prompt: one forward per token, padded to min_width tokens (the
    pad rows' argmax is ignored; their KV rows lie past the position and the next step overwrites them)."""
    import time

    model.reset()
    tok = int(model.forward(prompt, "argmax")[-1])
    pad = [0] * (min_width - 1)
    t = time.perf_counter()
    for _ in range(steps):
        p = model.pos
        tok = int(model.forward([tok] + pad, "argmax")[0])
        model.rewind(p + 1)
    return steps / (time.perf_counter() - t)


def speed(graphs: list[str], threads: int, steps: int, rounds: int, prompt_len: int) -> dict:
    """`graphs`: DIR or DIR:MIN_WIDTH. Runs are interleaved (round-robin), so a shared machine's load hits each
    graph alike; the median per graph and its ratio to the first graph are reported."""
    from specedge.export.quantize import open_graph

    specs = [(Path(g.split(":")[0]), int(g.split(":")[1]) if ":" in g else 1) for g in graphs]
    models = [open_graph(d / "model.onnx", 1024, threads) for d, _ in specs]
    prompt = prompt_ids(specs[0][0], prompt_len)
    rates: list[list[float]] = [[] for _ in specs]
    for model, (_, m) in zip(models, specs):   # warm up: page the weights in, build each step size's binding
        decode_rate(model, prompt, 8, m)
    for _ in range(rounds):
        for i, (model, (d, m)) in enumerate(zip(models, specs)):
            rates[i].append(decode_rate(model, prompt, steps, m))
            print(f"{d.name} min_width {m}: {rates[i][-1]:.1f} tok/s", flush=True)
    med = [float(np.median(r)) for r in rates]
    out = [{"graph": str(d), "min_width": m, "tok_s": r, "median": md, "ratio_to_first": md / med[0]}
           for (d, m), r, md in zip(specs, rates, med)]
    for o in out:
        print(f"{Path(o['graph']).name} min_width {o['min_width']}: median {o['median']:.1f} tok/s, "
              f"{o['ratio_to_first']:.2f}x {Path(out[0]['graph']).name}")
    return {"threads": threads, "steps": steps, "rounds": rounds, "prompt_tokens": prompt_len, "runs": out}


def profile(graph: str, threads: int, steps: int, prompt_lens: list[int]) -> dict:
    """Milliseconds per plain decoding step by op type (onnxruntime's profiler, which itself adds about 2 ms a
    step), after each prompt length: where a step's time goes as the context grows."""
    from collections import Counter

    from specedge.export.quantize import graph_spec
    from specedge.runtime import providers
    from specedge.runtime.kv import open_model

    import tempfile

    d, m = Path(graph.split(":")[0]), int(graph.split(":")[1]) if ":" in graph else 1
    out = []
    traces = tempfile.TemporaryDirectory()   # every session opened meanwhile profiles (the attention probe's too)
    for n in prompt_lens:
        options = providers.ort.SessionOptions

        class Profiled(options):   # make_session's options, with the profiler on
            def __init__(self):
                super().__init__()
                self.enable_profiling = True
                self.profile_file_prefix = str(Path(traces.name) / "ort")

        providers.ort.SessionOptions = Profiled
        try:
            model = open_model(d, graph_spec(d / "model.onnx", n + steps + m, 1, ()), "cpu", threads)
        finally:
            providers.ort.SessionOptions = options
        decode_rate(model, prompt_ids(d, n), 8, m)                 # warm up: the bindings, the pages
        rate = decode_rate(model, prompt_ids(d, n), steps, m)
        events = json.loads(Path(model.session.end_profiling()).read_text())
        runs = [e for e in events if e.get("name") == "model_run"][-steps:]
        start = runs[0]["ts"]
        by_op: Counter = Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
                by_op[e["args"]["op_name"]] += e["dur"] / 1000 / steps
        step = sum(r["dur"] for r in runs) / 1000 / steps
        print(f"prompt {n}: {rate:.1f} tok/s profiled, {step:.2f} ms per step; " +
              ", ".join(f"{op} {ms:.2f}" for op, ms in by_op.most_common(6)), flush=True)
        out.append({"prompt_tokens": n, "tok_s_profiled": rate, "ms_per_step": step,
                    "ms_per_step_by_op": dict(by_op.most_common())})
    traces.cleanup()
    return {"graph": graph, "threads": threads, "steps": steps, "runs": out}


def attention(graph_dir: Path, threads: int, contexts: list[int], repeats: int = 20) -> dict:
    """Time every layer's attention for one step of 1 or 2 rows, with a float32 and a float16 cache."""
    import time

    cfg = json.loads((graph_dir / "genai_config.json").read_text())["model"]["decoder"]
    layers, heads, kvh, d = (cfg[k] for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                              "head_size"))
    length = max(contexts)
    out = []
    for dtype, proto in ((np.float32, TensorProto.FLOAT), (np.float16, TensorProto.FLOAT16)):
        nodes, inputs, outputs = [], [], []
        for i in range(layers):
            io = [helper.make_tensor_value_info(f"{n}.{i}", proto, ["b", "s", h * d])
                  for n, h in (("q", heads), ("k", kvh), ("v", kvh))]
            io += [helper.make_tensor_value_info(f"past_{n}.{i}", proto, ["b", kvh, "p", d]) for n in ("k", "v")]
            outs = [helper.make_tensor_value_info(f"out.{i}", proto, ["b", "s", heads * d]),
                    *(helper.make_tensor_value_info(f"present_{n}.{i}", proto, ["b", kvh, "p", d]) for n in "kv")]
            inputs += io
            outputs += outs
            nodes.append(helper.make_node("GroupQueryAttention", [v.name for v in io] + ["seqlens_k", "total"],
                                          [v.name for v in outs], domain="com.microsoft", num_heads=heads,
                                          kv_num_heads=kvh, scale=d ** -0.5))
        inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["b"]),
                   helper.make_tensor_value_info("total", TensorProto.INT32, [])]
        model = helper.make_model(helper.make_graph(nodes, "attention", inputs, outputs),
                                  opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        b = session.io_binding()
        for i in range(layers):
            for n in "kv":   # one in-place cache per layer and kind, as the runtime binds them
                kv = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, kvh, length + 2, d)).astype(dtype))
                b.bind_ortvalue_input(f"past_{n}.{i}", kv)
                b.bind_ortvalue_output(f"present_{n}.{i}", kv)
        for ctx in contexts:
            for rows in (1, 2):
                for i in range(layers):
                    for n, h in (("q", heads), ("k", kvh), ("v", kvh)):
                        b.bind_cpu_input(f"{n}.{i}", rng.standard_normal((1, rows, h * d)).astype(dtype))
                    b.bind_output(f"out.{i}", "cpu")
                b.bind_cpu_input("seqlens_k", np.array([ctx - 1], np.int32))
                b.bind_cpu_input("total", np.array(ctx, np.int32))
                for _ in range(3):
                    session.run_with_iobinding(b)
                t = time.perf_counter()
                for _ in range(repeats):
                    session.run_with_iobinding(b)
                ms = (time.perf_counter() - t) / repeats * 1000
                print(f"{np.dtype(dtype).name} cache, context {ctx}, {rows} row(s): {ms:.2f} ms for {layers} layers",
                      flush=True)
                out.append({"cache": np.dtype(dtype).name, "context": ctx, "rows": rows, "ms_all_layers": ms})
    return {"graph": str(graph_dir), "layers": layers, "heads": heads, "kv_heads": kvh, "head_size": d,
            "threads": threads, "runs": out}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["ops", "widths", "gemv", "speed", "distance", "profile", "attention"])
    ap.add_argument("graph", nargs="*")
    ap.add_argument("--width", type=int, default=5)
    ap.add_argument("--prefix", type=int, default=40)
    ap.add_argument("--min-width", type=int, nargs="+", default=[1])
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--tag", default="")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, nargs="+", default=[100],
                    help="speed: tokens of context before decoding (profile: one run per value)")
    a = ap.parse_args(argv)
    graph = Path(a.graph[0]) if a.graph else None
    if a.what == "ops":
        res = ops(graph, a.width, a.min_width[0], a.threads[0], a.prefix)
        for p in res["parted"]:
            print(f"{p['output']}: max |Δ| {p['max_abs_diff']:.3g}, rows {p['rows_differing']}")
        print(f"{len(res['parted'])} of {res['outputs_compared']} outputs differ")
    elif a.what == "widths":
        res = widths(graph, a.min_width, a.threads, a.prompts)
    elif a.what == "speed":
        res = speed(a.graph, a.threads[0], a.steps, a.rounds, a.prompt_len[0])
    elif a.what == "profile":
        res = profile(a.graph[0], a.threads[0], a.steps, a.prompt_len)
    elif a.what == "attention":
        res = attention(graph, a.threads[0], a.prompt_len)
    elif a.what == "distance":
        res = distance_run(Path(a.graph[0]), Path(a.graph[1]), a.prompts)
    else:
        res = gemv(a.threads)
    res |= {"onnxruntime": ort.__version__, "machine": platform.machine(), "argv": sys.argv[1:]}
    RESULTS.mkdir(exist_ok=True)
    name = f"int4-consistency-{a.what}{'-' + a.tag if a.tag else ''}.json"
    (RESULTS / name).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
