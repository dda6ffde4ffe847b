"""Helpers shared by several test modules: the five architectures and a prompt, a driver that steps sequences
through the model runner as the engine does, greedy decoding (ours and transformers'), a fake offline hub cache,
and random GGUF blocks."""
import hashlib
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as Q
from transformers import AutoModelForCausalLM

import mistralrs
from mistralrs.engine.block_manager import BlockManager
from mistralrs.engine.scheduler import Scheduler
from mistralrs.engine.sequence import Sequence

# ---- models ----

ARCHS = {
    "llama": mistralrs.LlamaLoader,
    "mistral": mistralrs.MistralLoader,
    "gemma": mistralrs.GemmaLoader,
    "gemma2": mistralrs.GemmaLoader,
    "gemma3": mistralrs.GemmaLoader,
    "mixtral": mistralrs.MixtralLoader,
    "phi2": mistralrs.Phi2Loader,
}


PROMPT = ("The quick brown fox jumps over the lazy dog, and then it runs into the forest "
          "where the trees are tall and the river is cold.")


def load(path, arch, **kw):
    loader = mistralrs.NormalLoader(ARCHS[arch], model_id=str(path), no_kv_cache=kw.pop("no_kv_cache", False))
    return loader.load(token_source="none", **kw)


def hf_model(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


def prompt_ids(runner):
    ids = runner.pipeline.tokenizer.encode(PROMPT).ids
    assert len(ids) > 2 * 8, "the prompt must be longer than Mistral's sliding window"
    return ids


class Driver:
    """Steps sequences as the engine does, minus sampling: a scheduler of its own allocates their blocks (the
    Runner's engine thread keeps its own, idle while a test drives the model), the runner's model runner runs them."""

    def __init__(self, runner, max_seqs: int = 8):
        self.mr = runner.pipeline.model_runner
        # every step computes all of its sequences' uncached tokens: no cached prefixes, no chunks
        self.scheduler = Scheduler(BlockManager(self.mr.num_blocks, self.mr.block_size, prefix_caching=False),
                                   max_seqs, max_batched_tokens=1 << 30, no_kv_cache=self.mr.no_kv_cache)

    def step(self, seqs, all_logits=False):
        """One step of exactly these sequences (those not yet scheduled are added); their K/V are cached after it,
        and the caller appends the tokens it picks from the logits."""
        sched = self.scheduler
        for s in seqs:
            if s not in sched.running and s not in sched.waiting:
                sched.add(s)
        step = sched.schedule()
        assert step.seqs == seqs and not step.too_long, "the test's sequences must fit the KV cache together"
        logits = self.mr.step(step.seqs, sched.block_tables(step.seqs), step.num_tokens, all_logits=all_logits)
        sched.postprocess(step, [None] * len(step.sampled))
        return logits

    def finish(self, *seqs):
        for s in seqs:
            self.scheduler.remove(s)


def all_logits(runner, ids):
    """[T, V]: the logits of every prompt token, from one prefill."""
    d, seq = Driver(runner), Sequence(list(ids))
    out = d.step([seq], all_logits=True)
    d.finish(seq)
    return out


def greedy(runner, ids, n=32):
    d, seq = Driver(runner), Sequence(list(ids))
    for _ in range(n):
        seq.tokens.append(int(d.step([seq]).argmax(-1)))
    d.finish(seq)
    return seq.tokens[len(ids):]


def hf_greedy(model, ids, n):
    model.generation_config.eos_token_id = None  # compare 32 tokens, whatever they are
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


# ---- GGUF files ----

KV = dict(kv_cache_tokens=256)
TEXTS = [PROMPT, "Hello world!  Two  spaces,\ttabs\nand\n\nnewlines   ", " leading and trailing ", "",
         "ünïcödé, 日本語 and emoji 🙂 fall back to bytes", "<s>special</s> tokens <unk> in text", "x" * 300]


# ---- a fake hub cache ----

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".ggml", ".pt", ".pth", ".h5", ".msgpack")


HF_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
          "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def commit_hash(label: str) -> str:
    return hashlib.sha1(label.encode()).hexdigest()


def checkpoint_files(directory: Path) -> dict[str, Path]:
    """{repo filename: path} for every file under a checkpoint directory, as make_fake_hub_repo takes them."""
    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*")) if p.is_file()}


def _etag(src: Path, filename: str) -> str:
    if filename.endswith(LFS_SUFFIXES):
        with open(src, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    data = src.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def make_fake_hub_repo(hf_home: Path, repo_id: str, revisions: list[tuple[str, dict[str, Path]]],
                       refs: dict[str, str]) -> Path:
    """Lay out model repo `repo_id` under HF_HOME/hub exactly as huggingface_hub's cache does and return its folder:
    blobs/<etag>, snapshots/<commit>/<filename> as relative symlinks into blobs, refs/<ref> holding the commit hash.

    revisions: [(40-hex commit, {repo filename: source file})]; refs: {"main": commit, "v1": older commit, ...}.
    """
    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    for commit, files in revisions:
        assert re.fullmatch(r"[0-9a-f]{40}", commit), f"commit must be 40 hex digits, got {commit!r}"
        for filename, src in files.items():
            blob = repo / "blobs" / _etag(Path(src), filename)
            blob.parent.mkdir(parents=True, exist_ok=True)
            if not blob.exists():
                shutil.copyfile(src, blob)
            link = repo / "snapshots" / commit / filename
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    for ref, commit in refs.items():
        path = repo / "refs" / ref
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(commit)  # no newline: huggingface_hub reads the ref file verbatim
    return repo


# ---- GGUF blocks ----

FP16_FIELDS = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0], Q.Q2_K: [80, 82],
               Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}


def random_blocks(qtype, rows: int, K: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Random bytes [rows, row_bytes] of a block type, with finite fp16 scales in [scale / 2, scale) patched in."""
    block, size = GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows, K // block, size), dtype=np.uint8)
    for offset in FP16_FIELDS[qtype]:
        d = (scale * rng.uniform(0.5, 1.0, size=(rows, K // block))).astype(np.float16)
        data[:, :, offset:offset + 2] = d.view(np.uint8).reshape(rows, K // block, 2)
    return data.reshape(rows, -1)


def gguf_quantized(qtype, rows: int, K: int, rng: np.random.Generator) -> np.ndarray:
    """gguf's quantization of random normal weights: uint8 [rows, row_bytes]."""
    q = quants.quantize(rng.standard_normal((rows, K)).astype(np.float32), qtype)
    return np.ascontiguousarray(q).view(np.uint8).reshape(rows, -1)




# ---- cases that could hang, abort or allocate without end ----

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, *args: str, timeout: float = 120, memory_gb: float | None = 8, env: dict | None = None):
    """Run `code` in a fresh interpreter (the package, tests/ and tools/ importable; argv[1:] = args) under a
    wall-clock timeout and an address-space limit, so that a case that hangs, aborts or allocates without end fails
    alone; `env` adds to the environment. Returns the CompletedProcess (stdout and stderr as text); a timeout raises
    subprocess.TimeoutExpired."""
    import resource
    import subprocess
    import sys

    def limit():
        if memory_gb is not None:
            n = int(memory_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (n, n))

    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(ROOT / "tools")])}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit)
