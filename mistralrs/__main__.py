"""python -m mistralrs: one streamed chat turn, then the speed it ran at; `python -m mistralrs serve ...`: the
OpenAI-compatible HTTP server (server/app.py; also the `mistralrs-server` command). The flags both take: cli.py.

With no model flag either runs the built-in demo model (a tiny Llama trained on Python's documentation, see
tools/train_demo_model.py). --model-id takes a local directory or a Hugging Face hub id.
"""
import argparse
import json
import sys
import time

import mistralrs

from .cli import add_model_args, load


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mistralrs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--prompt", default="The import statement")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from .server.app import main as serve  # FastAPI is imported only to serve
        return serve(argv[1:])
    a = parse_args(argv)
    t0 = time.perf_counter()
    runner = load(a)
    if runner is None:  # torchrun's rank > 0: it served rank 0, which has closed
        return
    print(f"loaded {a.gguf or a.model_id or 'the demo model'} in {time.perf_counter() - t0:.1f} s\n\n> {a.prompt}\n")
    request = mistralrs.ChatCompletionRequest([{"role": "user", "content": a.prompt}], "demo",
                                              max_tokens=a.max_tokens, temperature=a.temperature, stream=True,
                                              seed=a.seed)
    start, first, usage = time.perf_counter(), None, None
    for chunk in runner.send_chat_completion_request(request):
        body = json.loads(chunk)
        first = first or time.perf_counter()
        print(body["choices"][0]["delta"].get("content") or "", end="", flush=True)
        usage = body.get("usage", usage)
    elapsed = time.perf_counter() - start
    n = usage["completion_tokens"]
    print(f"\n\n[{n} tokens in {elapsed:.2f} s: {n / elapsed:.1f} tok/s; "
          f"time to first token {first - start:.3f} s; prompt {usage['prompt_tokens']} tokens]")
    runner.close()


if __name__ == "__main__":
    main()
