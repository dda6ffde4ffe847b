"""The built-in demo model and `python -m mistralrs`."""
import json
import pydoc_data.topics
import re

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import mistralrs
from mistralrs.__main__ import main
from mistralrs.cli import DEMO_MODEL


def test_demo_cli_streams_and_reports_speed(capsys):
    main(["--max-tokens", "12", "--temperature", "0"])
    out = capsys.readouterr().out
    assert "> The import statement" in out
    assert re.search(r"\[\d+ tokens in [\d.]+ s: [\d.]+ tok/s", out)


def test_demo_model_writes_english_and_matches_transformers():
    with mistralrs.NormalLoader(mistralrs.LlamaLoader, model_id=str(DEMO_MODEL)).load(token_source="none") as r:
        text = json.loads(r.send_completion_request(mistralrs.CompletionRequest(
            "The import statement", "demo", max_tokens=64, temperature=0)))["choices"][0]["text"]
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    hf = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32)
    ids = tok("The import statement", return_tensors="pt").input_ids
    ref = hf.generate(ids, max_new_tokens=64, do_sample=False)[0, ids.shape[1]:]
    assert text == tok.decode(ref, skip_special_tokens=True)

    corpus = set(re.findall(r"[a-z]+", " ".join(pydoc_data.topics.topics.values()).lower()))
    words = re.findall(r"[a-z]+", text.lower())
    assert len(set(words)) >= 10, text
    assert sum(w in corpus for w in words) / len(words) >= 0.8, text
