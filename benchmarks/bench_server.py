"""The HTTP server against the in-process Runner: 1, 8 and 32 concurrent streaming clients, each streaming one
completion; total throughput (completion tokens / wall time) and p50 / p99 time to first token and inter-token gap,
for the server (a real `mistralrs-server` process, httpx streaming clients) and for the same requests sent to a
Runner in this process from as many threads. Models: the built-in demo model and SmolLM2-135M-Instruct Q4_1
(tools/real_models.py; skipped with --demo-only).

    python3 benchmarks/bench_server.py                  # both models (fetches SmolLM2 on first use)
    python3 benchmarks/bench_server.py --demo-only
    python3 -m pytest benchmarks/bench_server.py --runslow -s

Writes benchmarks/results/<cpu-Ncores | GPU>/server.md and server.json. Goal: server throughput >= 0.9x the Runner's
at 32 clients.
"""
import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tools")]

import mistralrs  # noqa: E402
from mistralrs import CompletionRequest  # noqa: E402
from mistralrs.cli import DEMO_MODEL  # noqa: E402

CLIENTS = (1, 8, 32)
TOKENS = 48


def prompt(i: int) -> str:
    return f"Request {i}: the os module provides"


def summary(runs: list[tuple[float, list[float]]], tokens: int, wall: float) -> dict:
    """runs: per client (ttft seconds, token gaps in seconds)."""
    ttft = sorted(r[0] for r in runs)
    gaps = sorted(g for r in runs for g in r[1])

    def pct(xs, p):
        return xs[min(len(xs) - 1, int(p * len(xs)))] * 1e3 if xs else 0.0
    return dict(throughput_tok_s=tokens / wall, ttft_p50_ms=pct(ttft, 0.5), ttft_p99_ms=pct(ttft, 0.99),
                itl_p50_ms=pct(gaps, 0.5), itl_p99_ms=pct(gaps, 0.99))


def runner_round(runner, n: int, ban: dict) -> dict:
    runs, counts = [None] * n, [0] * n

    def one(i):
        start, stamps = time.perf_counter(), []
        for chunk in runner.send_completion_request(CompletionRequest(
                prompt(i), "bench", max_tokens=TOKENS, temperature=0, logit_bias=ban, stream=True)):
            stamps.append(time.perf_counter())
            counts[i] = json.loads(chunk).get("usage", {}).get("completion_tokens", counts[i])
        runs[i] = (stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:])])
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return summary(runs, sum(counts), time.perf_counter() - t)


def server_round(url: str, model: str, n: int, ban: dict) -> dict:
    import httpx

    async def one(client, i):
        body = {"model": model, "prompt": prompt(i), "max_tokens": TOKENS, "temperature": 0, "stream": True,
                "logit_bias": {str(k): v for k, v in ban.items()}, "stream_options": {"include_usage": True}}
        start, stamps, used = time.perf_counter(), [], 0
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    stamps.append(time.perf_counter())
                used = (chunk.get("usage") or {}).get("completion_tokens", used)
        return (stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:])]), used

    async def main():
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
            t = time.perf_counter()
            out = await asyncio.gather(*(one(client, i) for i in range(n)))
            return out, time.perf_counter() - t
    out, wall = asyncio.run(main())
    return summary([o[0] for o in out], sum(o[1] for o in out), wall)


def start_server(model_args: list[str], name: str) -> tuple[subprocess.Popen, str]:
    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "mistralrs", "serve", "--port", str(port), "--max-seqs", "32",
                             "--served-model-name", name, *model_args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start")


def bench_model(label: str, loader, model_args: list[str]) -> list[dict]:
    rows = []
    with loader.load(token_source="none", max_seqs=32) as runner:
        ban = {i: -100.0 for i in runner.pipeline.eos_token_ids}
        runner_round(runner, 2, ban)  # warm-up
        local = {n: runner_round(runner, n, ban) for n in CLIENTS}
    proc, url = start_server(model_args, "bench")
    try:
        server_round(url, "bench", 2, ban)
        for n in CLIENTS:
            remote = server_round(url, "bench", n, ban)
            rows.append(dict(model=label, clients=n, runner=local[n], server=remote,
                             server_over_runner=remote["throughput_tok_s"] / local[n]["throughput_tok_s"]))
            print(f"[server] {label} clients={n}: server {remote['throughput_tok_s']:.1f} tok/s, runner "
                  f"{local[n]['throughput_tok_s']:.1f} tok/s", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return rows


def write(rows: list[dict]) -> None:
    import torch
    from conftest import device_name, git_commit
    meta = dict(device=device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
                commit=git_commit(), tokens=TOKENS, load=os.getloadavg())
    out = HERE / "results" / meta["device"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "server.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"# Server vs in-process Runner ({meta['device']})", "",
             f"Commit {meta['commit']}. Each client streams one completion of {TOKENS} tokens (EOS banned); the Runner "
             f"gets the same requests from as many threads in one process; the server runs as its own process, the "
             f"clients are httpx streams. Load average at the end: {[round(x, 2) for x in meta['load']]}.", "",
             "| model | clients | server tok/s | runner tok/s | server / runner | server TTFT p50 / p99 ms | runner "
             "TTFT p50 / p99 ms | server ITL p50 / p99 ms | runner ITL p50 / p99 ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        s, u = r["server"], r["runner"]
        lines.append(f"| {r['model']} | {r['clients']} | {s['throughput_tok_s']:.1f} | {u['throughput_tok_s']:.1f} | "
                     f"{r['server_over_runner']:.2f}x | {s['ttft_p50_ms']:.0f} / {s['ttft_p99_ms']:.0f} | "
                     f"{u['ttft_p50_ms']:.0f} / {u['ttft_p99_ms']:.0f} | {s['itl_p50_ms']:.1f} / "
                     f"{s['itl_p99_ms']:.1f} | {u['itl_p50_ms']:.1f} / {u['itl_p99_ms']:.1f} |")
    (out / "server.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def run(demo_only: bool) -> None:
    rows = bench_model("demo", mistralrs.NormalLoader(mistralrs.LlamaLoader, model_id=str(DEMO_MODEL)), [])
    if not demo_only:
        import real_models
        q4_1 = real_models.smollm2_q4_1()
        loader = mistralrs.QuantizedLoader(mistralrs.LlamaLoader, model_id=None, is_gguf=True,
                                           quantized_model_id="", quantized_filename=str(q4_1))
        rows += bench_model("SmolLM2-135M Q4_1", loader, ["--gguf", str(q4_1)])
    write(rows)


@pytest.mark.slow
def test_server():
    run(demo_only=False)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-only", action="store_true")
    run(ap.parse_args().demo_only)
