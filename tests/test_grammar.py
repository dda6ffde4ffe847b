"""Grammar-constrained completions: every output is a complete match, checked with independent parsers."""
import json
import re

import pytest

import mistralrs
from mistralrs import CompletionRequest

PROMPT = "The answer is"


@pytest.fixture(scope="module")
def runner(tiny_models):
    with mistralrs.NormalLoader(mistralrs.LlamaLoader, model_id=str(tiny_models["llama"])).load(
            token_source="none") as r:
        yield r


def complete(runner, grammar, grammar_type, **kw):
    kw.setdefault("max_tokens", 48)
    r = json.loads(runner.send_completion_request(
        CompletionRequest(PROMPT, "tiny", grammar=grammar, grammar_type=grammar_type, **kw)))
    return [(c["text"], c["finish_reason"]) for c in r["choices"]]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_regex(runner, temperature):
    pattern = r"(yes|no), [a-z]{2,5} [0-9]{2}"
    for text, reason in complete(runner, pattern, "regex", temperature=temperature, n_choices=3, seed=1):
        assert re.fullmatch(pattern, text), text
        assert reason == "stop"


def test_json_schema(runner):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "age"], "additionalProperties": False}
    for text, reason in complete(runner, json.dumps(schema), "json_schema", temperature=1.0, seed=4, n_choices=2,
                                 max_tokens=64):
        value = json.loads(text)
        assert set(value) == {"name", "age"} and isinstance(value["age"], int) and 0 <= value["age"] <= 99
        assert isinstance(value["name"], str) and len(value["name"]) <= 6
        assert reason == "stop"


def test_lark_and_gbnf(runner):
    lark = 'start: "(" num ("+" num)* ")"\nnum: /[1-9]/'
    for text, _ in complete(runner, lark, "lark", temperature=1.0, seed=2, max_tokens=24):
        assert re.fullmatch(r"\([1-9](\+[1-9])*\)", text) or re.fullmatch(r"\([1-9](\+[1-9])*", text), text
    gbnf = 'root ::= "color: " ("red" | "green" | "blue")'
    for text, reason in complete(runner, gbnf, "gbnf", temperature=1.0, seed=3):
        assert text in ("color: red", "color: green", "color: blue") and reason == "stop"


def test_grammar_streams_the_same_text(runner):
    req = dict(grammar=r"[a-c]{3}-[0-9]{3}", grammar_type="regex", temperature=0.0, max_tokens=20)
    whole = complete(runner, **req)[0][0]
    chunks = [json.loads(c)["choices"][0]["text"] for c in runner.send_completion_request(
        CompletionRequest(PROMPT, "tiny", stream=True, **req))]
    assert "".join(chunks) == whole


@pytest.mark.parametrize("grammar,kind", [("(unclosed", "regex"), ("{not json", "json_schema"),
                                          ("start: missing_rule", "lark")])
def test_invalid_grammar_is_a_value_error_and_the_runner_serves_on(runner, grammar, kind):
    with pytest.raises(ValueError, match=kind):
        runner.send_completion_request(CompletionRequest(PROMPT, "tiny", grammar=grammar, grammar_type=kind))
    assert complete(runner, "[0-9]{4}", "regex", temperature=0.0)[0][1] == "stop"
