"""Real-model CPU benchmark: SmolLM2-135M-Instruct and Gemma 3 270M through ours, llama.cpp and transformers,
interleaved in one run.

    python3 benchmarks/bench_cpu_real.py                    # the whole run (fetches the models on first use)
    python3 benchmarks/bench_cpu_real.py --formats Q4_1 --repeats 2     # a quicker look
    python3 benchmarks/bench_cpu_real.py --render-only      # rewrite cpu_real.md / .png from cpu_real.json
    python3 -m pytest benchmarks/bench_cpu_real.py --runslow -s   # the same run as a slow test (defaults only)

Weights (tools/real_models.py): SmolLM2's shipped Q4_1 GGUF, llama.cpp's Q8_0 / Q4_0 / Q4_K_M requantized copies,
float32 (ours: the Hugging Face checkpoint through NormalLoader; llama.cpp: the F32 GGUF; transformers: the same
checkpoint), and Gemma 3 270M's shipped Q4_K_M GGUF (`gemma3-Q4_K_M`). Per row each engine decodes greedily from
the same prompt; ours, llama.cpp, transformers take turns, `--repeats` times, medians kept:
  - ours: QuantizedLoader / NormalLoader Runner, one streamed CompletionRequest(max_tokens=N), EOS banned by
    logit_bias so that it decodes all N tokens (checked against usage.completion_tokens)
  - llama.cpp: llama-cpp-python's Llama.generate (greedy, fresh KV each run), which never stops at EOS
  - transformers (float32 only): generate with min_new_tokens = max_new_tokens = N
Rows per weights: 1 thread, one per physical core, and each engine's default (ours: load()'s default, one per
physical core; llama-cpp-python: its n_threads default, half the logical CPUs; transformers: torch's).
TTFT is the time to the first token (prompt processing included); decode tok/s counts the tokens after the first;
CPU ms/token is the process's CPU time (all threads, user + system) over a run divided by its new tokens.
Weight bytes per token: every tensor of the file once (the tied token_embd is the head, read once per token; an
embedding row is noise). GB/s = bytes/token x tok/s, and its fraction of the copy bandwidth of a 1 GiB torch copy at
the same thread count, measured in this run (read + write bytes, as benchmarks/conftest.py counts them).
Also: a 512-token prompt's TTFT (Q4_1 and Gemma, one thread per core); 16 concurrent requests on Q4_1 (ours,
max_seqs=16) against our batch-1 rate; and the Q4_1 and Gemma default rows again with one CPU-bound process (a
`while True` loop) running beside both engines.

Writes benchmarks/results/<cpu-Ncores>/cpu_real.md (table and goals), cpu_real.json, cpu_real.png. Not part of the
quick run (`tools/bench.py` runs pytest without --runslow, so the slow test here is skipped).
"""
import argparse
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]  # run as a script: this checkout's package and tools
import mistralrs  # noqa: E402
from mistralrs import CompletionRequest  # noqa: E402

FORMATS = ("Q4_1", "Q8_0", "Q4_0", "Q4_K_M", "F32", "gemma3-Q4_K_M")
GEMMA = "gemma3-Q4_K_M"
LONG_PROMPT_TOKENS = 512
PROMPT = "Once upon a time, in a small village at the edge of a great forest, there lived"
CONCURRENT = 16


def real_models():
    import real_models
    return real_models


@dataclass
class Run:
    ttft_s: float
    decode_tok_s: float  # tokens after the first / time after the first
    tokens: int
    text: str
    cpu_ms_per_token: float = 0.0


def _run(start: float, stamps: list[float], text: str) -> Run:
    n = len(stamps)
    return Run(stamps[0] - start, (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else 0.0, n, text)


def cpu_seconds() -> float:
    """CPU time of this process so far, every thread, user + system."""
    t = os.times()
    return t.user + t.system


def ours_run(runner, n: int, ban: dict[int, float], prompt: str = PROMPT) -> Run:
    """One streamed completion; a chunk may hold several tokens, so the count comes from usage."""
    start, first, pieces, usage = time.perf_counter(), None, [], {}
    for chunk in runner.send_completion_request(CompletionRequest(
            prompt, "bench", max_tokens=n, temperature=0, logit_bias=ban, stream=True)):
        first = first or time.perf_counter()
        body = json.loads(chunk)
        pieces.append(body["choices"][0]["text"])
        usage = body.get("usage") or usage
    end, got = time.perf_counter(), usage.get("completion_tokens")
    if got != n:
        raise RuntimeError(f"ours decoded {got} tokens, asked for {n}")
    return Run(first - start, (n - 1) / (end - first) if n > 1 else 0.0, n, "".join(pieces))


def llama_run(llm, n: int, prompt: str = PROMPT) -> Run:
    llm.reset()  # no KV prefix reuse: every run processes the prompt
    start, stamps, ids = time.perf_counter(), [], []
    for token in llm.generate(llm.tokenize(prompt.encode()), temp=0.0, top_k=1, reset=True):
        stamps.append(time.perf_counter())
        ids.append(token)
        if len(ids) == n:
            break
    return _run(start, stamps, llm.detokenize(ids).decode(errors="replace"))


def hf_run(model, tok, n: int) -> Run:
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):  # the prompt first, then each new token
            self.times.append(time.perf_counter())

        def end(self):
            pass

    ids, clock = tok(PROMPT, return_tensors="pt").input_ids, Stamps()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock)
    return _run(start, clock.times[1:], tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


def timed(fn) -> Run:
    """fn()'s Run with the process's CPU time per new token."""
    cpu = cpu_seconds()
    run = fn()
    run.cpu_ms_per_token = (cpu_seconds() - cpu) * 1e3 / max(run.tokens, 1)
    return run


def interleaved(engines: dict, repeats: int) -> dict[str, dict]:
    """Each engine once in turn, `repeats` rounds; per engine the medians and the last run's text."""
    runs = {name: [] for name in engines}
    for _ in range(repeats):
        for name, fn in engines.items():
            runs[name].append(timed(fn))
    return {name: dict(ttft_ms=statistics.median(r.ttft_s for r in rs) * 1e3,
                       decode_tok_s=statistics.median(r.decode_tok_s for r in rs),
                       cpu_ms_per_token=statistics.median(r.cpu_ms_per_token for r in rs),
                       tokens=rs[-1].tokens, runs_tok_s=[round(r.decode_tok_s, 3) for r in rs], text=rs[-1].text)
            for name, rs in runs.items()}


def set_threads(threads: int, runner=None) -> None:
    """threads for torch on this thread (transformers, the copy) and for our engine (load's `threads`)."""
    torch.set_num_threads(threads)
    if runner is not None:
        runner.engine.call(lambda: mistralrs.kernels.set_cpu_threads(threads))


def copy_gbps(threads: int) -> float:
    """1 GiB float32 copy at `threads`: (read + write bytes) / median time of 5."""
    set_threads(threads)
    src = torch.ones(1 << 28, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.nbytes / statistics.median(times) / 1e9


def weight_bytes(gguf_path: Path) -> int:
    """Bytes of weights read per decoded token: every tensor once; token_embd only when it is also the head."""
    from gguf import GGUFReader
    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(gguf_path)).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight")  # a separate head: the embedding is one row per token
    return sum(tensors.values())


def physical_cores() -> int:
    from mistralrs.runner import physical_cores
    return physical_cores()


def llama_default_threads() -> int:
    """llama-cpp-python's n_threads when none is given (llama_cpp.Llama: half the logical CPUs, at least 1)."""
    import multiprocessing
    return max(multiprocessing.cpu_count() // 2, 1)


def model_files() -> dict[str, Path]:
    rm = real_models()
    return {"hf-f32": rm.smollm2_hf_f32(), "Q4_1": rm.smollm2_q4_1(), "F32": rm.smollm2_f32(),
            **{t: rm.smollm2_quantized(t) for t in rm.DERIVED_TYPES}, GEMMA: rm.gemma3_q4_k_m()}


def load_ours(files: dict, fmt: str):
    if fmt == "F32":
        loader = mistralrs.NormalLoader(mistralrs.LlamaLoader, model_id=str(files["hf-f32"]))
    else:
        arch = mistralrs.GemmaLoader if fmt == GEMMA else mistralrs.LlamaLoader
        loader = mistralrs.QuantizedLoader(arch, model_id=None, is_gguf=True, quantized_model_id="",
                                           quantized_filename=str(files[fmt]))
    return loader.load(token_source="none", max_seqs=CONCURRENT, kv_cache_tokens=CONCURRENT * 1024)


def eos_ban(runner) -> dict[int, float]:
    return {i: -100.0 for i in runner.pipeline.eos_token_ids}


def thread_settings(physical: int) -> list[tuple[str, int, int]]:
    """(label, ours, llama.cpp) thread counts of each row: 1, one per physical core, each engine's default."""
    settings = [("1", 1, 1), (str(physical), physical, physical), ("default", physical, llama_default_threads())]
    return list(dict.fromkeys(settings))  # one row where two settings coincide (a 1-core machine)


def measure_format(runner, files: dict, fmt: str, settings: list[tuple[str, int, int]], a) -> list[dict]:
    """One row per thread setting: ours (runner), llama.cpp on the same file, transformers for F32, interleaved."""
    import llama_cpp
    rows, ban, hf = [], eos_ban(runner), None
    torch_default = torch.get_num_threads()
    if fmt == "F32":
        from transformers import AutoModelForCausalLM, AutoTokenizer
        hf = (AutoModelForCausalLM.from_pretrained(files["hf-f32"], dtype=torch.float32).eval(),
              AutoTokenizer.from_pretrained(files["hf-f32"]))
    for label, ours_threads, llama_threads in settings:
        set_threads(ours_threads, runner)
        if label == "default":
            torch.set_num_threads(torch_default)
        llm = llama_cpp.Llama(model_path=str(files[fmt]), n_threads=llama_threads, n_threads_batch=llama_threads,
                              n_ctx=1024, verbose=False)
        engines = {"ours": lambda: ours_run(runner, a.ours_tokens, ban), "llama.cpp": lambda: llama_run(llm, a.tokens)}
        if hf is not None:
            engines["transformers"] = lambda: hf_run(*hf, a.tokens)
        for warm in engines.values():  # first-call allocations, caches, lazy imports
            warm()
        print(f"[cpu_real] {fmt} threads={label} ...", flush=True)
        rows.append(dict(weights=fmt, threads=label, ours_threads=ours_threads, llama_threads=llama_threads,
                         **interleaved(engines, a.repeats)))
    torch.set_num_threads(torch_default)
    return rows


def long_prompt(runner, salt: int) -> str:
    """A prompt of LONG_PROMPT_TOKENS tokens of running text (by our tokenizer; llama.cpp's is the same vocabulary),
    starting with `salt`: each run's differs from the first token, so our prefix cache holds none of it."""
    tok = runner.pipeline.tokenizer
    ids = tok.encode(f"Draft {salt}. " + " ".join([PROMPT] * 40), add_special_tokens=False).ids[:LONG_PROMPT_TOKENS]
    return tok.decode(ids)


def ttft_long(runner, files: dict, fmt: str, threads: int, a) -> dict:
    """Time to the first token of a LONG_PROMPT_TOKENS-token prompt, ours and llama.cpp interleaved (medians)."""
    import itertools

    import llama_cpp
    set_threads(threads, runner)
    ban, salts = eos_ban(runner), itertools.count()
    llm = llama_cpp.Llama(model_path=str(files[fmt]), n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                          verbose=False)
    engines = {"ours": lambda: ours_run(runner, 1, ban, long_prompt(runner, next(salts))),
               "llama.cpp": lambda: llama_run(llm, 1, long_prompt(runner, next(salts)))}
    for warm in engines.values():
        warm()
    got = interleaved(engines, a.repeats)
    return dict(weights=fmt, threads=threads, prompt_tokens=len(llm.tokenize(long_prompt(runner, 0).encode())),
                ours_ms=got["ours"]["ttft_ms"], llama_cpp_ms=got["llama.cpp"]["ttft_ms"])


def concurrent_throughput(runner, threads: int, a) -> dict:
    """Ours on Q4_1: 16 threads each send one CompletionRequest at once; total completion tokens / wall time."""
    set_threads(threads, runner)
    ban = eos_ban(runner)

    def serve(n):
        counts = [0] * CONCURRENT

        def one(i):
            r = json.loads(runner.send_completion_request(CompletionRequest(
                f"Story {i}: {PROMPT}", "bench", max_tokens=n, temperature=0, logit_bias=ban)))
            counts[i] = r["usage"]["completion_tokens"]
        workers = [threading.Thread(target=one, args=(i,)) for i in range(CONCURRENT)]
        t = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return sum(counts), time.perf_counter() - t

    serve(4)
    runs = [serve(a.ours_tokens) for _ in range(a.repeats)]
    if any(n != CONCURRENT * a.ours_tokens for n, _ in runs):
        raise RuntimeError(f"concurrent requests decoded {[n for n, _ in runs]} tokens in all, "
                           f"asked for {CONCURRENT} x {a.ours_tokens}")
    return dict(weights="Q4_1", threads=threads, requests=CONCURRENT, max_seqs=CONCURRENT,
                tokens_per_request=a.ours_tokens,
                throughput_tok_s=statistics.median(n / s for n, s in runs),
                runs_tok_s=[round(n / s, 3) for n, s in runs])


def _hog() -> None:
    while True:
        pass


def cpu_hog():
    """A process that keeps one core busy (a `while True` loop), as another user's job would."""
    import multiprocessing
    proc = multiprocessing.get_context("spawn").Process(target=_hog, daemon=True)
    proc.start()
    time.sleep(1.0)  # it is running before the engines are
    return proc


def derive(row: dict, bytes_per_token: int, copy: dict[int, float]) -> dict:
    """GB/s and fraction of copy bandwidth per engine (at its thread count), and ours / llama.cpp."""
    row["weight_bytes_per_token"] = bytes_per_token
    for name in ("ours", "llama.cpp", "transformers"):
        if name in row:
            e = row[name]
            threads = row["llama_threads"] if name == "llama.cpp" else row["ours_threads"]
            e["gbps"] = bytes_per_token * e["decode_tok_s"] / 1e9
            e["frac_of_copy_bw"] = e["gbps"] / copy[threads]
    row["ours_over_llama_cpp"] = row["ours"]["decode_tok_s"] / row["llama.cpp"]["decode_tok_s"]
    return row


def versions() -> dict:
    import llama_cpp
    import transformers
    from conftest import git_commit
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    return dict(cpu=cpu, logical_cpus=os.cpu_count(), physical_cores=physical_cores(), torch=torch.__version__,
                llama_cpp_python=llama_cpp.__version__, transformers=transformers.__version__, commit=git_commit(),
                kernels_backend=mistralrs.kernels.BACKEND)


def goals(meta: dict, rows: list[dict], loaded: list[dict], ttft: list[dict], conc: dict | None) -> list[str]:
    """The issue's goals, each met or not, with this run's numbers."""
    def mark(ok: bool) -> str:
        return "met" if ok else "**not met**"
    by = {(r["weights"], r["threads"]): r for r in rows}
    phys = str(meta["physical_cores"])
    lines = ["| goal | figures (this run) | |", "| --- | --- | --- |"]
    default = [r for r in rows if r["threads"] == "default"]
    if default:
        worst = min(r["ours_over_llama_cpp"] for r in default)
        lines.append("| default threads: ours >= 1.0x llama.cpp on every file | "
                     + ", ".join(f"{r['weights']} {r['ours_over_llama_cpp']:.2f}x" for r in default)
                     + f" | {mark(worst >= 1.0)} |")
    scale = [(f, by[f, phys]["ours"]["decode_tok_s"] / by[f, "1"]["ours"]["decode_tok_s"])
             for f in meta["formats"] if (f, phys) in by and (f, "1") in by and phys != "1"]
    if scale:
        lines.append(f"| {phys} threads >= 1.7x our 1-thread decode | "
                     + ", ".join(f"{f} {x:.2f}x" for f, x in scale) + f" | {mark(min(x for _, x in scale) >= 1.7)} |")
    for t in ttft:
        lines.append(f"| TTFT <= llama.cpp's, {t['prompt_tokens']}-token prompt ({t['weights']}, {t['threads']} "
                     f"threads) | ours {t['ours_ms']:.0f} ms, llama.cpp {t['llama_cpp_ms']:.0f} ms | "
                     f"{mark(t['ours_ms'] <= t['llama_cpp_ms'])} |")
    if conc and ("Q4_1", str(conc["threads"])) in by:
        one = by["Q4_1", str(conc["threads"])]["ours"]["decode_tok_s"]
        x = conc["throughput_tok_s"] / one
        lines.append(f"| {conc['requests']} concurrent requests >= 4x our batch-1 rate ({conc['threads']} threads) | "
                     f"{conc['throughput_tok_s']:.1f} / {one:.1f} tok/s = {x:.2f}x | {mark(x >= 4)} |")
    for r in loaded:
        quiet = by.get((r["weights"], r["threads"]))
        if quiet:
            x = r["ours_over_llama_cpp"] / quiet["ours_over_llama_cpp"]
            lines.append(f"| one-core load: ours / llama.cpp >= 0.8x of the quiet ratio ({r['weights']}) | "
                         f"{r['ours_over_llama_cpp']:.2f}x loaded / {quiet['ours_over_llama_cpp']:.2f}x quiet = "
                         f"{x:.2f} | {mark(x >= 0.8)} |")
    return lines


def table(rows: list[dict]) -> list[str]:
    lines = ["| weights | threads (ours / llama.cpp) | MB/token | ours tok/s | ours CPU ms/tok | ours TTFT | "
             "llama.cpp tok/s | llama.cpp CPU ms/tok | llama.cpp TTFT | transformers tok/s | transformers CPU ms/tok | "
             "ours GB/s (of copy) | llama.cpp GB/s (of copy) | ours / llama.cpp |", "| --- " * 14 + "|"]
    for r in rows:
        def cell(name, key, fmt):
            return fmt.format(r[name][key]) if name in r else ""

        def bw(name):
            return f"{r[name]['gbps']:.2f} ({r[name]['frac_of_copy_bw']:.0%})"
        lines.append(f"| {r['weights']} | {r['threads']} ({r['ours_threads']} / {r['llama_threads']}) | "
                     f"{r['weight_bytes_per_token'] / 1e6:.1f} | "
                     f"{cell('ours', 'decode_tok_s', '{:.2f}')} | {cell('ours', 'cpu_ms_per_token', '{:.1f}')} | "
                     f"{cell('ours', 'ttft_ms', '{:.0f} ms')} | {cell('llama.cpp', 'decode_tok_s', '{:.2f}')} | "
                     f"{cell('llama.cpp', 'cpu_ms_per_token', '{:.1f}')} | {cell('llama.cpp', 'ttft_ms', '{:.0f} ms')} | "
                     f"{cell('transformers', 'decode_tok_s', '{:.2f}')} | "
                     f"{cell('transformers', 'cpu_ms_per_token', '{:.1f}')} | {bw('ours')} | {bw('llama.cpp')} | "
                     f"{r['ours_over_llama_cpp']:.2f}x |")
    return lines


def write_table(out: Path, meta: dict, rows: list[dict], loaded: list[dict], ttft: list[dict],
                conc: dict | None) -> None:
    lines = [f"# Real-model CPU benchmark: SmolLM2-135M-Instruct and Gemma 3 270M ({meta['device']})", "",
             f"{meta['cpu']}, {meta['physical_cores']} physical cores; commit {meta['commit']}, torch {meta['torch']}, "
             f"llama-cpp-python {meta['llama_cpp_python']}, transformers {meta['transformers']}; "
             f"kernels backend {meta['kernels_backend']}.",
             f"Greedy decode of `{PROMPT}`: llama.cpp and transformers {meta['tokens']} new tokens, ours "
             f"{meta['ours_tokens']}; engines interleaved, {meta['repeats']} rounds, medians. "
             f"Copy bandwidth (1 GiB torch copy, read + write): "
             + ", ".join(f"{v:.1f} GB/s at {t} thread(s)" for t, v in meta["copy_gbps"].items())
             + f". Load average before / after: {meta['loadavg_before']} / {meta['loadavg_after']}; "
             f"run took {meta['wall_s']:.0f} s. Command: `python3 benchmarks/bench_cpu_real.py{meta['args']}`.", ""]
    if max(meta["loadavg_before"]) > meta["physical_cores"]:
        lines += ["**The machine was busy** (load average above its core count before the run): other processes "
                  "shared the cores, so every figure here is lower and noisier than on an idle machine.", ""]
    lines += ["## Goals", ""] + goals(meta, rows, loaded, ttft, conc) + ["", "## Batch-1 decode, quiet machine", ""]
    lines += table(rows)
    if loaded:
        lines += ["", "## With one CPU-bound process beside both engines (a `while True` loop in another process)",
                  ""] + table(loaded)
    if ttft:
        lines += ["", f"## Time to first token, {LONG_PROMPT_TOKENS}-token prompt", "",
                  "| weights | threads | prompt tokens | ours | llama.cpp | ours / llama.cpp |", "| --- " * 6 + "|"]
        lines += [f"| {t['weights']} | {t['threads']} | {t['prompt_tokens']} | {t['ours_ms']:.0f} ms | "
                  f"{t['llama_cpp_ms']:.0f} ms | {t['ours_ms'] / t['llama_cpp_ms']:.2f}x |" for t in ttft]
    if conc:
        lines += ["", f"Ours, {conc['requests']} concurrent requests (max_seqs={conc['max_seqs']}, "
                  f"{conc['tokens_per_request']} tokens each) on {conc['weights']} at {conc['threads']} threads: "
                  f"**{conc['throughput_tok_s']:.2f} tok/s** in all."]
    lines += ["", "F32 row: ours and transformers run the float32 Hugging Face checkpoint, llama.cpp the F32 GGUF of the "
              "same weights. Q8_0 / Q4_0 / Q4_K_M are llama.cpp's requantizations of SmolLM2's Q4_1 weights (via F32); "
              f"{GEMMA} is the Gemma 3 270M file as shipped. CPU ms/tok counts every thread of the process, prompt "
              "included: above 1000 / tok/s, the threads overlap; equal, one thread did the work.", "",
              "![cpu_real](cpu_real.png)", ""]
    (out / "cpu_real.md").write_text("\n".join(lines))


def plot(path: Path, rows: list[dict], conc: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [f"{r['weights']}\n{r['threads']}" for r in rows]
    engines = ("ours", "llama.cpp", "transformers")
    fig, ax = plt.subplots(figsize=(0.9 * len(rows) + 2, 4.5))
    width = 0.27
    for k, name in enumerate(engines):
        values = [r[name]["decode_tok_s"] if name in r else 0 for r in rows]
        bars = ax.bar([i + (k - 1) * width for i in range(len(rows))], values, width, label=name)
        ax.bar_label(bars, labels=[f"{v:.0f}" if v else "" for v in values], fontsize=6)
    ax.set_xticks(range(len(rows)), names, fontsize=7)
    ax.set_ylabel("batch-1 decode tok/s")
    title = "SmolLM2-135M-Instruct and Gemma 3 270M on CPU, batch-1 greedy decode (threads: 1, per core, default)"
    if conc:
        title += f"\nours x{conc['requests']} concurrent (Q4_1): {conc['throughput_tok_s']:.1f} tok/s in all"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per run (llama.cpp, transformers)")
    ap.add_argument("--ours-tokens", type=int, default=128, help="new tokens per run for ours (default 128)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds per row (medians)")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated subset of {','.join(FORMATS)}")
    ap.add_argument("--no-load-run", action="store_true", help="skip the rows with a CPU-bound process beside")
    ap.add_argument("--out", type=Path, help="default: benchmarks/results/cpu-<N>cores")
    ap.add_argument("--render-only", action="store_true", help="rewrite the table and plot from the cpu_real.json")
    a = ap.parse_args(argv)
    a.formats = a.formats.split(",")
    if bad := [f for f in a.formats if f not in FORMATS]:
        ap.error(f"unknown formats {bad}; allowed: {', '.join(FORMATS)}")
    return a


def main(argv=None) -> Path:
    a = parse(argv)
    from conftest import device_name
    if a.render_only:
        out = a.out or ROOT / "benchmarks" / "results" / device_name(torch.device("cpu"))
        data = json.loads((out / "cpu_real.json").read_text())
        return render(out, data["meta"], data["rows"], data["loaded"], data["ttft"], data["concurrent"])
    started, load_before = time.perf_counter(), os.getloadavg()
    files, physical = model_files(), physical_cores()
    settings = thread_settings(physical)
    copy = {t: copy_gbps(t) for t in sorted({t for _, o, ll in settings for t in (o, ll)})}
    rows, loaded, ttft, conc = [], [], [], None
    for fmt in a.formats:
        with load_ours(files, fmt) as runner:
            for row in measure_format(runner, files, fmt, settings, a):
                rows.append(derive(row, weight_bytes(files[fmt]), copy))
            if fmt in ("Q4_1", GEMMA):
                ttft.append(ttft_long(runner, files, fmt, physical, a))
            if fmt == "Q4_1":
                conc = concurrent_throughput(runner, physical, a)
            if fmt in ("Q4_1", GEMMA) and not a.no_load_run:
                hog = cpu_hog()
                try:
                    for row in measure_format(runner, files, fmt, [s for s in settings if s[0] == "default"], a):
                        loaded.append(derive(row, weight_bytes(files[fmt]), copy))
                finally:
                    hog.kill()
    meta = dict(device=device_name(torch.device("cpu")), **versions(), tokens=a.tokens, ours_tokens=a.ours_tokens,
                repeats=a.repeats, prompt=PROMPT, copy_gbps=copy, formats=a.formats,
                loadavg_before=[round(x, 2) for x in load_before],
                loadavg_after=[round(x, 2) for x in os.getloadavg()], wall_s=time.perf_counter() - started,
                args="".join(f" {x}" for x in (argv if argv is not None else sys.argv[1:])))
    out = a.out or ROOT / "benchmarks" / "results" / meta["device"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_real.json").write_text(json.dumps(dict(meta=meta, rows=rows, loaded=loaded, ttft=ttft,
                                                       concurrent=conc), indent=1))
    return render(out, meta, rows, loaded, ttft, conc)


def render(out: Path, meta: dict, rows: list[dict], loaded: list[dict], ttft: list[dict], conc: dict | None) -> Path:
    write_table(out, meta, rows, loaded, ttft, conc)
    plot(out / "cpu_real.png", rows, conc)
    print((out / "cpu_real.md").read_text())
    return out


@pytest.mark.slow
def test_cpu_real():
    try:
        real_models().smollm2_q4_1()
    except RuntimeError as e:
        pytest.skip(f"real models cannot be fetched: {e}")
    out = main([])
    assert (out / "cpu_real.json").is_file()


if __name__ == "__main__":
    main()
