"""Shutdown: every request sent before, during or after close() gets an answer or an exception; close() returns
within a step whatever the backlog; a script that exits without close() exits cleanly (the engine thread is
stopped and joined at interpreter exit, not frozen inside a torch op); profiler calls after close raise. Cases that
could hang or abort run in subprocesses under a timeout."""
import json
import os
import subprocess
import sys
import time

import pytest

import mistralrs
from mistralrs import CompletionRequest

from helpers import ARCHS, PROMPT, ROOT, run_python


def load(tiny_models, **kw):
    loader = mistralrs.NormalLoader(ARCHS["llama"], model_id=str(tiny_models["llama"]))
    return loader.load(token_source="none", **kw)


RACE = """
import json, sys, threading, time
import mistralrs
from mistralrs import CompletionRequest
runner = mistralrs.NormalLoader(mistralrs.LlamaLoader, model_id=sys.argv[1]).load(token_source="none", max_seqs=4)
outcomes, stop = [], threading.Event()

def sender(k):
    while True:
        stream = k % 2 == 0
        req = CompletionRequest("The river " * (1 + k), "m", max_tokens=20 + 10 * k, stream=stream)
        try:
            r = runner.send_completion_request(req)
            if stream:
                r = list(r)
            outcomes.append("answer")
        except RuntimeError as e:
            outcomes.append("closed" if "closed" in str(e) else repr(e))
            if stop.is_set():
                return

threads = [threading.Thread(target=sender, args=(k,), daemon=True) for k in range(8)]
for t in threads:
    t.start()
time.sleep(0.5)
stop.set()
t0 = time.monotonic()
runner.close()
took = time.monotonic() - t0
for t in threads:
    t.join(20)
print(json.dumps({"stuck": sum(t.is_alive() for t in threads), "close": took,
                  "answers": outcomes.count("answer"), "closed": outcomes.count("closed"),
                  "other": [o for o in outcomes if o not in ("answer", "closed")]}))
"""


def test_requests_racing_close_all_get_an_answer_or_an_error(tiny_models):
    p = run_python(RACE, str(tiny_models["llama"]), timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.splitlines()[-1])
    assert out["stuck"] == 0 and not out["other"], out
    assert out["answers"] > 0 and out["closed"] >= 8, out
    assert out["close"] < 5, out


EXIT = """
import sys, threading
import mistralrs
from mistralrs import CompletionRequest

def serve_and_leave(path):
    runner = mistralrs.NormalLoader(mistralrs.LlamaLoader, model_id=path).load(token_source="none", max_seqs=4,
                                                                               kv_cache_tokens=2048)
    streams = [runner.send_completion_request(CompletionRequest("The river " * 20, "m", max_tokens=400,
                                                                stream=True)) for _ in range(4)]
    next(streams[0])
    threading.Thread(target=lambda: runner.send_completion_request(CompletionRequest("hi", "m", max_tokens=300)),
                     daemon=True).start()
    print("exiting without close()", flush=True)
    return streams  # still referenced at exit, as in a script's globals

if __name__ == "__main__":
    streams = serve_and_leave(sys.argv[1])
"""

FORKED = EXIT.split("if __name__")[0] + """
import os
import torch
path, n = sys.argv[1], int(sys.argv[2])
with torch.device("meta"):  # torch imports most of itself lazily on a first meta-device build: once, before forking
    torch.nn.Embedding(4, 4)
codes = []
for _ in range(n // 2):
    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # the child leaves through the normal interpreter exit, as a script does
            streams = serve_and_leave(path)
            sys.exit(0)
        children.append(pid)
    codes += [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
print("codes", codes)
"""


def test_exit_without_close_is_clean(tiny_models):
    """A script that exits with the engine mid-step and callers still waiting: no SIGABRT ("terminate called
    without an active exception"; before the exit join, 20 forked runs in 20 aborted), no hang. One fresh
    interpreter, then 20 forked children of an interpreter that has imported mistralrs (cheaper than 20
    interpreters, same exit)."""
    p = run_python(EXIT, str(tiny_models["llama"]), timeout=120)
    assert p.returncode == 0 and "exiting" in p.stdout and "terminate called" not in p.stderr, p.stderr[-2000:]
    p = run_python(FORKED, str(tiny_models["llama"]), "20", timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.splitlines()[-1] == "codes " + str([0] * 20), p.stdout[-500:] + p.stderr[-2000:]
    assert p.stdout.count("exiting") == 20 and "terminate called" not in p.stderr


@pytest.mark.slow
def test_exit_without_close_is_clean_in_20_fresh_interpreters(tiny_models, tmp_path):
    script = tmp_path / "exit_without_close.py"
    script.write_text(EXIT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results = []
    for _ in range(10):
        procs = [subprocess.Popen([sys.executable, str(script), str(tiny_models["llama"])], env=env, cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            results.append((proc.returncode, "exiting" in out, "terminate called" in err, err[-500:]))
    bad = [r for r in results if r[:3] != (0, True, False)]
    assert not bad, bad[:3]


def test_close_returns_within_a_step_with_a_huge_backlog(tiny_models):
    with load(tiny_models, max_seqs=4, kv_cache_tokens=512) as runner:
        streams = [runner.send_completion_request(CompletionRequest(PROMPT, "m", max_tokens=300, n_choices=16,
                                                                    stream=True)) for _ in range(300)]
        next(streams[0])
        t0 = time.monotonic()
        runner.close()
        took = time.monotonic() - t0
        ends = []
        for s in streams:
            try:
                for _ in s:
                    pass
                ends.append("done")
            except RuntimeError as e:
                ends.append("closed" if "closed" in str(e) else repr(e))
    assert took < 2, f"close() took {took:.2f} s with 4,800 sequences queued"
    assert set(ends) == {"closed"}, set(ends)


def test_after_close_everything_raises(tiny_models):
    runner = load(tiny_models, kv_cache_tokens=256)
    runner.close()
    runner.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        runner.send_completion_request(CompletionRequest(PROMPT, "m", max_tokens=2))
    with pytest.raises(RuntimeError, match="closed"):
        with runner.profiler():
            pass
    with pytest.raises(RuntimeError, match="closed"):
        runner.engine.call(lambda: None)
    runner.abort("anything")  # nothing to abort: ignored


def test_close_during_a_profile_raises_at_its_end(tiny_models):
    runner = load(tiny_models, kv_cache_tokens=256)
    with pytest.raises(RuntimeError, match="closed"):
        with runner.profiler():
            runner.send_completion_request(CompletionRequest(PROMPT, "m", max_tokens=2))
            runner.close()
