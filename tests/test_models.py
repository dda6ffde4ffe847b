"""Each architecture, loaded through NormalLoader, against Hugging Face transformers on the same checkpoint."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import mistralrs
from mistralrs.block_manager import BlockManager
from mistralrs.model_runner import SeqState
from mistralrs.scheduler import Scheduler

ARCHS = {
    "llama": mistralrs.LlamaLoader,
    "mistral": mistralrs.MistralLoader,
    "gemma": mistralrs.GemmaLoader,
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
        self.scheduler = Scheduler(BlockManager(self.mr.num_blocks, self.mr.block_size), max_seqs,
                                   no_kv_cache=self.mr.no_kv_cache)

    def step(self, seqs, all_logits=False):
        """One step of exactly these sequences; those not yet scheduled are added."""
        sched = self.scheduler
        for s in seqs:
            if s not in sched.running and s not in sched.waiting:
                sched.add(s)
        batch, too_long = sched.schedule()
        assert batch == seqs and not too_long, "the test's sequences must fit the KV cache together"
        return self.mr.step(batch, sched.block_tables(batch), all_logits=all_logits)

    def finish(self, *seqs):
        for s in seqs:
            self.scheduler.remove(s)


def all_logits(runner, ids):
    """[T, V]: the logits of every prompt token, from one prefill."""
    d, seq = Driver(runner), SeqState(list(ids))
    out = d.step([seq], all_logits=True)
    d.finish(seq)
    return out


def greedy(runner, ids, n):
    d, seq = Driver(runner), SeqState(list(ids))
    for _ in range(n):
        seq.tokens.append(int(d.step([seq]).argmax(-1)))
    d.finish(seq)
    return seq.tokens[len(ids):]


def hf_greedy(model, ids, n):
    model.generation_config.eos_token_id = None  # compare 32 tokens, whatever they are
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(tiny_models, arch):
    runner = load(tiny_models[arch], arch)
    ids = prompt_ids(runner)
    with torch.no_grad():
        ref = hf_model(tiny_models[arch])(torch.tensor([ids])).logits[0]
    ours = all_logits(runner, ids)
    d, seq = Driver(runner), SeqState(list(ids))
    last = d.step([seq])[0]
    diff = (ours - ref).abs().max().item()
    print(f"{arch}: max |logits - transformers| = {diff:.2e}")  # shown with -s
    assert diff <= 1e-4, diff
    assert (last - ref[-1]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("no_kv_cache", [False, True], ids=["kv_cache", "no_kv_cache"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(tiny_models, arch, no_kv_cache):
    runner = load(tiny_models[arch], arch, no_kv_cache=no_kv_cache)
    ids = prompt_ids(runner)
    ours = greedy(runner, ids, 32)
    assert ours == hf_greedy(hf_model(tiny_models[arch]), ids, 32)
    assert len(set(ours)) >= 8


@pytest.mark.parametrize("arch", ARCHS)
def test_float16(tiny_models, arch):
    """fp16 logits: close to transformers run in fp16, and no further from the fp32 truth than transformers is."""
    runner = load(tiny_models[arch], arch, dtype=mistralrs.DType.F16)
    assert runner.pipeline.model_runner.model.lm_head.weight.dtype == torch.float16
    ids = prompt_ids(runner)
    with torch.no_grad():
        ref32 = hf_model(tiny_models[arch])(torch.tensor([ids])).logits[0]
        ref16 = hf_model(tiny_models[arch], torch.float16)(torch.tensor([ids])).logits[0].float()
    ours = all_logits(runner, ids)
    torch.testing.assert_close(ours, ref16, atol=1e-1, rtol=2e-2)  # logits reach ~10: fp16 ulp there is 8e-3
    assert (ours - ref32).abs().max() <= 2 * (ref16 - ref32).abs().max() + 1e-2


def test_sharded_checkpoint_equals_single_file(tiny_models, tiny_sharded_llama):
    a = load(tiny_models["llama"], "llama").pipeline.model_runner
    b = load(tiny_sharded_llama, "llama").pipeline.model_runner
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name


def test_paged_cache_in_small_blocks_matches_one_big_block(tiny_models):
    """Block boundaries inside the prompt and during decode change nothing."""
    ids = prompt_ids(load(tiny_models["mistral"], "mistral"))
    small = load(tiny_models["mistral"], "mistral", block_size=3, kv_cache_tokens=300)
    big = load(tiny_models["mistral"], "mistral", block_size=256, kv_cache_tokens=512)
    assert greedy(small, ids, 16) == greedy(big, ids, 16)

