"""Tensor parallelism on the CPU (gloo): N ranks give the logits of one rank, within fp32 rounding, on every
architecture (GQA, MQA with replicated KV heads, Mixtral's experts, Phi-2's biases and partial rotary, Gemma's soft
caps and sliding windows), from safetensors and from quantized GGUF files; greedy tokens through the Runner are the
same with concurrent requests; each rank holds ~1/N of the weights; a killed worker fails its requests and close()
still returns; bad sizes are refused before anything runs. The 4-rank cases are slow (each load spawns 3 processes)."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import mistralrs
from mistralrs import ChatCompletionRequest, QuantizedLoader
from mistralrs.model_args import ModelArgs
from mistralrs.tensor_parallel import TensorParallelError, workers
from mistralrs.tensor_parallel.shard import check_divisible

from helpers import ARCHS, KV, greedy, load, prompt_ids
from helpers import all_logits as logits

TOL = 1e-4  # fp32: the ranks' partial sums add up in another order than one rank's dot products


def load_gguf(arch, path, **kw):
    loader = QuantizedLoader(ARCHS[arch], model_id=None, is_gguf=True, quantized_model_id="",
                             quantized_filename=str(path))
    return loader.load(token_source="none", **KV, **kw)


def same_model(one, many):
    """The logits of a prompt (every position) and of 8 greedy decode steps agree; so do the greedy tokens."""
    ids = prompt_ids(one)
    torch.testing.assert_close(logits(many, ids), logits(one, ids), atol=TOL, rtol=0)
    assert greedy(many, ids, 8) == greedy(one, ids, 8)


@pytest.fixture(scope="module")
def one_rank(tiny_models):
    runners = {}

    def get(arch):
        if arch not in runners:
            runners[arch] = load(tiny_models[arch], arch, **KV)
        return runners[arch]
    yield get
    for r in runners.values():
        r.close()


@pytest.mark.parametrize("n", [2, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_one_rank(tiny_models, one_rank, arch, n):
    with load(tiny_models[arch], arch, tensor_parallel_size=n, **KV) as many:
        same_model(one_rank(arch), many)


@pytest.mark.parametrize("arch, qtype, n", [
    ("llama", "q8_0", 2), ("llama", "q4_0", 2), ("mixtral", "q8_0", 2),
    pytest.param("gemma", "q8_0", 4, marks=pytest.mark.slow), pytest.param("phi2", "q4_0", 2, marks=pytest.mark.slow)])
def test_gguf_logits_equal_one_rank(gguf_file, arch, qtype, n):
    path = gguf_file(arch, qtype)
    with load_gguf(arch, path) as one, load_gguf(arch, path, tensor_parallel_size=n) as many:
        same_model(one, many)
        # quantized weights stay quantized on every rank, cut along whole blocks: the bytes split N ways
        one_bytes, ranks = one.stats()["weight_bytes"][0], many.stats()["weight_bytes"]
        assert len(ranks) == n and all(abs(b - one_bytes / n) < 0.05 * one_bytes for b in ranks)


def test_each_rank_holds_its_share_of_the_weights(tiny_models, one_rank):
    """Llama, 2 ranks (2 KV heads: none replicated): each rank's bytes are half, plus the replicated norms."""
    one, cfg = one_rank("llama"), mistralrs.model_args.read_json(tiny_models["llama"] / "config.json")
    norms = (2 * cfg["num_hidden_layers"] + 1) * cfg["hidden_size"] * 4
    with load(tiny_models["llama"], "llama", tensor_parallel_size=2, **KV) as many:
        total, ranks = one.stats()["weight_bytes"][0], many.stats()["weight_bytes"]
    assert ranks == [ranks[0]] * 2 and (total - norms) / 2 + norms == ranks[0]


def chats(runner, n=6):
    """Greedy replies to n different prompts sent at once from n threads."""
    out = [None] * n

    def ask(i):
        out[i] = runner.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "user", "content": f"Tell me about fox number {i}."}], model="m", max_tokens=12,
            temperature=0.0))
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [json.loads(o)["choices"][0]["message"]["content"] for o in out]


def test_greedy_through_the_runner_with_concurrent_requests(tiny_models, one_rank):
    with load(tiny_models["mistral"], "mistral", tensor_parallel_size=2, **KV) as many:
        assert chats(many) == chats(one_rank("mistral"))


def test_a_killed_worker_fails_its_requests_and_close_returns(tiny_models):
    runner = load(tiny_models["llama"], "llama", tensor_parallel_size=2, **KV)
    stream = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": "hello"}], model="m", max_tokens=100000, temperature=0.0, stream=True))
    next(stream)
    os.kill(runner.pipeline.model_runner.tp.workers.procs[0].pid, signal.SIGKILL)
    with pytest.raises(TensorParallelError, match="rank 1 exited with code -9"):
        for _ in stream:
            pass
    with pytest.raises(TensorParallelError, match="close the Runner and load it again"):
        runner.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "user", "content": "again"}], model="m", max_tokens=4))
    start = time.monotonic()
    runner.close()
    assert time.monotonic() - start < 30
    assert not runner.pipeline.model_runner.tp.workers.procs[0].is_alive()


def args(heads, kv_heads, inter=128):
    return ModelArgs(vocab_size=100, hidden_size=64, intermediate_size=inter, num_hidden_layers=1,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16,
                     max_position_embeddings=64, norm_eps=1e-5)


@pytest.mark.parametrize("a, n, message", [
    (args(4, 2), 3, r"must divide num_attention_heads \(4\)"),
    (args(4, 4, inter=130), 4, r"must divide intermediate_size \(130\)"),
    (args(12, 3), 2, r"must divide num_key_value_heads \(3\) or be a multiple of it"),
    (args(4, 2), 0, "must be an int >= 1"),
])
def test_sizes_that_do_not_split(a, n, message):
    with pytest.raises(ValueError, match=message):
        check_divisible(a, n)


@pytest.mark.parametrize("heads, kv_heads, n", [(4, 2, 4), (8, 1, 8), (8, 8, 2), (4, 4, 4)])
def test_sizes_that_split(heads, kv_heads, n):
    check_divisible(args(heads, kv_heads), n)  # fewer KV heads than ranks: each rank holds a copy of one


def test_bad_sizes_fail_the_load_cleanly(tiny_models, gguf_file):
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 must divide num_attention_heads \(4\)"):
        load(tiny_models["llama"], "llama", tensor_parallel_size=3, **KV)
    with pytest.raises(ValueError, match="cannot be split into 4 parts of 16 columns along whole blocks"):
        load_gguf("llama", gguf_file("llama", "q8_0"), tensor_parallel_size=4)  # o_proj: K = 64 = 4 x 16
    assert time.monotonic() - start < 120  # no rank was left waiting for another
    for bad in (1.5, "2", True):
        with pytest.raises(ValueError, match="tensor_parallel_size must be an int >= 1"):
            load(tiny_models["llama"], "llama", tensor_parallel_size=bad, **KV)


def test_more_ranks_than_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 from cuda needs GPUs 0\.\.1; this machine has 1"):
        workers.devices(torch.device("cuda"), 2)


def test_xlora_is_refused(tiny_models):
    loader = mistralrs.XLoraLoader(mistralrs.LlamaLoader, model_id=str(tiny_models["llama"]), order_file="x.json",
                                   xlora_model_id="x")
    with pytest.raises(ValueError, match="not supported for X-LoRA"):
        loader.load(token_source="none", tensor_parallel_size=2)


TORCHRUN_SCRIPT = textwrap.dedent("""
    import json, sys
    import mistralrs
    runner = mistralrs.NormalLoader(mistralrs.LlamaLoader, model_id=sys.argv[1]).load(
        token_source="none", kv_cache_tokens=1024, tensor_parallel_size=2)
    if runner is None:  # rank 1: served rank 0 until it closed
        print("rank 1 done")
    else:
        out = runner.send_chat_completion_request(mistralrs.ChatCompletionRequest(
            messages=[{"role": "user", "content": "hello"}], model="m", max_tokens=8, temperature=0.0))
        print("rank 0:", json.loads(out)["choices"][0]["message"]["content"])
        runner.close()
""")


def test_torchrun_launch(tiny_models, one_rank, tmp_path):
    """Launched by torchrun, each rank's script calls load(); rank 1's returns None once rank 0 closes."""
    script = tmp_path / "tp.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script),
                           str(tiny_models["llama"])], capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = one_rank("llama").send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": "hello"}], model="m", max_tokens=8, temperature=0.0))
    assert f"rank 0: {json.loads(expected)['choices'][0]['message']['content']}\n" in done.stdout
    assert "rank 1 done" in done.stdout


def test_cli_flag():
    """python -m mistralrs --tensor-parallel-size 2 prints the tokens of one rank (greedy, the demo model)."""
    def run(*flags):
        done = subprocess.run([sys.executable, "-m", "mistralrs", "--max-tokens", "12", "--temperature", "0", *flags],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.split("\n\n")[2]  # the completion, between the prompt and the timing line
    assert run("--tensor-parallel-size", "2") == run()
