"""Chat templates as checkpoints carry them today, against transformers' apply_chat_template on the same files:
chat_template.jinja (what save_pretrained writes), named templates listed in tokenizer_config.json,
chat_template.json; and the template features real templates use."""
import json
import shutil

import pytest
from transformers import AutoTokenizer

from mistralrs import ChatCompletionRequest, LlamaLoader, NormalLoader
from mistralrs.load import chat_template as ct

KV = dict(kv_cache_tokens=256)
# Written like the templates of Llama 3.1, Qwen 2.5 and SmolLM: a dated default system prompt (strftime_now),
# tools and documents sections, a namespace counter, loop controls, tojson of non-ASCII and HTML characters,
# raise_exception on a bad role, and the generation prompt.
TEMPLATE = """{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}{%- endif %}
{{- bos_token }}
{%- if tools is not none %}<|tools|>{{ tools | tojson(indent=2) }}{% endif %}
{%- if documents %}<|documents|>{% for d in documents %}{{ d.title }}{% endfor %}{% endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system = "Today is " + date_string + "." %}{%- set loop_messages = messages %}
{%- endif %}
<|system|>
{{ system }}{{ eos_token }}
{%- set ns = namespace(turns=0) %}
{%- for message in loop_messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('Only user and assistant roles are supported, got ' + message['role']) }}
    {%- endif %}
    {%- if message['content'] == '' %}{% continue %}{% endif %}
    {%- if ns.turns >= 6 %}{% break %}{% endif %}
    {%- set ns.turns = ns.turns + 1 %}
<|{{ message['role'] }}|>
{{ message['content'] | trim }}{{ eos_token }}
    {%- if message.get('meta') %}{{ message['meta'] | tojson }}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<|assistant|>
{% endif %}"""
TOOL_TEMPLATE = "{{ bos_token }}[tools]{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
CHATS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  2+2?  "},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? <b>&</b> é"}],
    [{"role": "user", "content": "a", "meta": {"lang": "fr", "tag": "<é&>"}}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "b"}],
    [{"role": "user", "content": str(i)} for i in range(9)],  # more turns than the template keeps
]


def save(tiny_models, tmp_path, template, **kw):
    """The tiny llama checkpoint with its tokenizer saved by transformers carrying `template`."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_models["llama"], ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    tok.chat_template = template
    tok.save_pretrained(ckpt, **kw)
    return ckpt, AutoTokenizer.from_pretrained(ckpt)


def prompt_ids(runner, messages) -> list[int]:
    """What send_chat_completion_request tokenizes."""
    p = runner.pipeline
    return p.tokenizer.encode(ct.render(p.chat_template, messages, p.special_tokens), add_special_tokens=False).ids


def load(ckpt, **kw):
    return NormalLoader(LlamaLoader, model_id=str(ckpt), **kw).load(token_source="none", **KV)


def test_chat_template_jinja(tiny_models, tmp_path):
    ckpt, tok = save(tiny_models, tmp_path, TEMPLATE)
    assert (ckpt / "chat_template.jinja").is_file()
    assert "chat_template" not in json.loads((ckpt / "tokenizer_config.json").read_text())
    with load(ckpt) as r:
        for messages in CHATS:
            assert prompt_ids(r, messages) == tok.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False), messages
        reply = json.loads(r.send_chat_completion_request(
            ChatCompletionRequest(CHATS[1], "tiny", max_tokens=2, temperature=0)))
        assert reply["usage"]["prompt_tokens"] == len(prompt_ids(r, CHATS[1]))
        with pytest.raises(ValueError, match="Only user and assistant roles are supported, got tool"):
            r.send_chat_completion_request(ChatCompletionRequest([{"role": "tool", "content": "x"}], "tiny"))


@pytest.mark.parametrize("pick", [None, "tool_use"])
def test_named_templates_in_tokenizer_config(tiny_models, tmp_path, pick):
    """transformers' older format for several templates: a list in tokenizer_config.json; `default` unless the
    loader's chat_template names another."""
    ckpt, tok = save(tiny_models, tmp_path, {"default": TEMPLATE, "tool_use": TOOL_TEMPLATE}, save_jinja_files=False)
    listed = json.loads((ckpt / "tokenizer_config.json").read_text())["chat_template"]
    assert [t["name"] for t in listed] == ["default", "tool_use"]
    with load(ckpt, chat_template=pick) as r:
        for messages in CHATS:
            assert prompt_ids(r, messages) == tok.apply_chat_template(
                messages, chat_template=pick, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_several_templates_without_default(tiny_models, tmp_path):
    ckpt, _ = save(tiny_models, tmp_path, {"chat": TEMPLATE, "tool_use": TOOL_TEMPLATE}, save_jinja_files=False)
    with pytest.raises(ValueError, match=r"several chat templates \(chat, tool_use\) and none named 'default'"):
        load(ckpt)
    with load(ckpt, chat_template="chat") as r:
        assert r.pipeline.chat_template == TEMPLATE


def test_chat_template_json(tiny_models, tmp_path):
    """chat_template.json ({"chat_template": ...}), the file processors saved, when there is no .jinja."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_models["llama"], ckpt)
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    original = config.pop("chat_template")
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    (ckpt / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    tok = AutoTokenizer.from_pretrained(ckpt)
    with load(ckpt) as r:
        assert r.pipeline.chat_template == TEMPLATE != original
        for messages in CHATS:
            assert prompt_ids(r, messages) == tok.apply_chat_template(
                messages, chat_template=TEMPLATE, add_generation_prompt=True, tokenize=True, return_dict=False)
    (ckpt / "chat_template.jinja").write_text(TOOL_TEMPLATE)  # the .jinja file wins, as in transformers
    with load(ckpt) as r:
        assert r.pipeline.chat_template == TOOL_TEMPLATE


def test_render_features():
    """tools and documents are defined (None), add_generation_prompt is passed, tojson does not escape HTML."""
    tokens = {"bos_token": "<s>", "eos_token": None}
    out = ct.render("{{ tools is none }} {{ documents is none }} {{ add_generation_prompt }} {{ eos_token is defined }}"
                    "{{ messages[0] | tojson }}", [{"role": "user", "content": "<é>"}], tokens)
    assert out == 'True True True False{"role": "user", "content": "<é>"}'
    assert ct.render("{% for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}", [], {}) == "012"
