"""Train the built-in demo model: a tiny Llama on the English prose of Python's own documentation (pydoc_data).

    python tools/train_demo_model.py mistralrs/data/demo-llama --minutes 20

Writes a Hugging Face checkpoint (config.json, model.safetensors in bfloat16, tokenizer.json, tokenizer_config.json,
generation_config.json) that mistralrs loads through its ordinary safetensors path. Training uses transformers'
LlamaForCausalLM (a dev dependency), so the demo also exercises our loader against a checkpoint we did not write.
"""
import argparse
import json
import math
import pydoc_data.topics
import re
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB = 2048
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ message['content'] | trim }}"
                 "{% if not loop.last %}\n\n{% endif %}{% endfor %}{% if add_generation_prompt %} {% endif %}")


def corpus() -> str:
    """Python's topic docs, with reST markup stripped down to prose and code."""
    text = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    text = re.sub(r"[*`]{1,2}", "", text)
    return re.sub(r"\n{3,}", "\n\n", text)


def train_tokenizer(text: str) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.split("\n\n"), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def model_config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 256,
        "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
        "head_dim": 32, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }


def train(out: Path, minutes: float, seq_len: int = 256, batch: int = 16, lr: float = 3e-3) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    text = corpus()
    tok = train_tokenizer(text)
    ids = torch.tensor(tok.encode(text, add_special_tokens=False).ids)
    print(f"corpus: {len(text)} chars, {len(ids)} tokens")
    model = LlamaForCausalLM(LlamaConfig(**model_config()))
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    start, step, deadline = time.time(), 0, time.time() + minutes * 60
    while time.time() < deadline:
        frac = (time.time() - start) / (minutes * 60)
        for group in opt.param_groups:  # linear warmup over 2%, then cosine to 10%
            group["lr"] = lr * min(1.0, frac / 0.02) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,))
        x = torch.stack([ids[s: s + seq_len] for s in starts])  # [batch, seq_len]
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
        step += 1
    save(model.to(torch.bfloat16), tok, out)


def save(model, tok: Tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 512,
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--minutes", type=float, default=20.0)
    a = ap.parse_args()
    train(a.out, a.minutes)
