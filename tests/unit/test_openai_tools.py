"""Tool calling's parts without a server: the plan, the prompt (template or generic format), the
grammar (valid calls only), and the incremental parser behind streamed tool-call deltas."""

from __future__ import annotations

import json

import pytest

from server.api.errors import ApiError
from server.api.openai_tools import (
    NamedToolChoice,
    ToolDef,
    ToolStream,
    parse_calls,
    render_call,
    tool_lark,
    tool_messages,
    tool_plan,
    whole_message,
)
from server.engine.grammar import GrammarCompiler

PARAMS = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["n"], "additionalProperties": False}  # fmt: skip
TOOLS = [ToolDef.model_validate({"type": "function", "function": {"name": n, "parameters": PARAMS}})
         for n in ("f", "g")]  # fmt: skip
QWEN_LIKE = "{% if tools %}{% for t in tools %}{{ t | tojson }}{% endfor %}<tool_call>{% endif %}"


def _consumes(compiler: GrammarCompiler, lark: str, text: str, tokenizer) -> bool:
    row = compiler.matcher(compiler.compile_lark(lark, {}))
    ok = all(row.matcher.consume_token(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"])
    return ok and row.accepting


def test_plan_follows_tool_choice() -> None:
    assert tool_plan(TOOLS, "none", None) is None and tool_plan(None, None, None) is None
    assert tool_plan(TOOLS, None, None).mode == "auto"
    named = tool_plan(
        TOOLS, NamedToolChoice.model_validate({"type": "function", "function": {"name": "g"}}), False
    )
    assert named.mode == "required" and named.names == {"g"} and not named.parallel
    with pytest.raises(ApiError, match="needs tools"):
        tool_plan(None, "required", None)
    with pytest.raises(ApiError, match="unique"):
        tool_plan([TOOLS[0], TOOLS[0]], "auto", None)
    with pytest.raises(ValueError, match="schema of an object"):
        ToolDef.model_validate(
            {"type": "function", "function": {"name": "s", "parameters": {"type": "string"}}}
        )


def test_the_grammar_allows_valid_calls_only(tokenizer) -> None:
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    required = tool_lark(tool_plan(TOOLS, "required", True))
    two = render_call("f", '{"n": 3}') + "\n" + render_call("g", {"n": 0})
    assert _consumes(compiler, required, two, tokenizer)
    assert not _consumes(compiler, required, render_call("f", '{"n": 12}'), tokenizer)  # above the maximum
    assert not _consumes(compiler, required, render_call("h", '{"n": 1}'), tokenizer)  # no such function
    assert not _consumes(compiler, required, "plain text", tokenizer)
    single = tool_lark(tool_plan(TOOLS, "required", False))
    assert not _consumes(compiler, single, two, tokenizer)
    auto = tool_lark(tool_plan(TOOLS, "auto", True))
    assert _consumes(compiler, auto, "plain text", tokenizer) and _consumes(compiler, auto, two, tokenizer)
    assert not _consumes(compiler, auto, "<b>bold</b>", tokenizer)  # text starting with "<" must be a call


def test_generic_prompt_format() -> None:
    plan = tool_plan(TOOLS, "required", True)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"n": 1}'}}]},
        {"role": "tool", "content": "42", "tool_call_id": "c"},
    ]  # fmt: skip
    rendered, extra = tool_messages([dict(m) for m in messages], plan, "{{ messages }}")
    assert extra == {}
    assert rendered[0]["role"] == "system" and rendered[0]["content"].startswith("Be brief.\n\n")
    assert '"name": "g"' in rendered[0]["content"] and "You must call" in rendered[0]["content"]
    assert rendered[2] == {"role": "assistant", "content": render_call("f", {"n": 1})}
    assert rendered[3] == {"role": "user", "content": "<tool_response>\n42\n</tool_response>"}
    templated, extra = tool_messages([dict(m) for m in messages], plan, QWEN_LIKE)
    assert [t["function"]["name"] for t in extra["tools"]] == ["f", "g"]
    assert templated[2]["tool_calls"][0]["function"]["arguments"] == {"n": 1}  # templates want a dict
    assert templated[3]["role"] == "tool"


def test_stream_deltas_join_to_the_whole_reply() -> None:
    text = render_call("f", '{"n": 3}') + "\n" + render_call("g", '{"n": 4}')
    stream = ToolStream()
    deltas = [d for ch in text for d in stream.push(ch)] + stream.push("", final=True)
    heads = [d["tool_calls"][0] for d in deltas if "id" in d["tool_calls"][0]]
    assert [h["function"]["name"] for h in heads] == ["f", "g"] and all(
        h["function"]["arguments"] == "" for h in heads
    )
    joined = {0: "", 1: ""}
    for delta in deltas:
        call = delta["tool_calls"][0]
        if "id" not in call:
            joined[call["index"]] += call["function"]["arguments"]
    assert joined == {0: '{"n": 3}', 1: '{"n": 4}'}
    message, reason = whole_message(text, "stop")
    assert reason == "tool_calls" and [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]] == [
        {"n": 3}, {"n": 4}]  # fmt: skip
    plain = ToolStream()
    assert plain.push("Hel") == [{"content": "Hel"}] and plain.push("lo") == [{"content": "lo"}]
    assert not plain.called and parse_calls("Hello", final=True) is None
    cut, reason = whole_message(text[:30], "length")
    assert reason == "length" and cut == {"role": "assistant", "content": text[:30]}


HERMES_LIKE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t['function']['name'] }};{% endfor %}</tools> reply with <tool_call>"
    "{% endif %}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] or '' }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ c['function']['arguments'] | tojson }}</tool_call>"
    "{% endfor %}{% endfor %}"
)


def test_a_template_that_renders_tools_gets_them(tokenizer) -> None:
    """Through the tokenizer's own apply_chat_template: tools=, and call arguments as a dict."""
    plan = tool_plan(TOOLS, "auto", True)
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"n": 1}'}}]},
                {"role": "tool", "content": "42", "tool_call_id": "c"}]  # fmt: skip
    rendered, extra = tool_messages(messages, plan, HERMES_LIKE)
    text = tokenizer.apply_chat_template(rendered, chat_template=HERMES_LIKE, tokenize=False, **extra)
    assert text.startswith("<tools>f;g;</tools>") and '<tool_call>{"n": 1}</tool_call>' in text
    assert text.endswith("[tool]42")
