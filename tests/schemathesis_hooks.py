"""Schemathesis hooks for ``tests/integration/test_openapi_contract.py``: the rules a schema cannot
state. A generation request's prompt, counted in tokens, plus the tokens it asks for must fit in
``--max-total-tokens`` (and the prompt in ``--max-input-tokens``); a composition (``merged_adapters``,
``POST /adapters/compose``) has one weight per adapter, a density above 0 for ties and DARE, and
``merged_adapters`` comes without ``adapter_id``. Bodies that break them are dropped from the
generated cases. Limits come from the environment the test sets.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import schemathesis
from transformers import AutoTokenizer

MAX_TOTAL = int(os.environ.get("LORAPLEX_TEST_MAX_TOTAL_TOKENS", "0"))
MAX_INPUT = int(os.environ.get("LORAPLEX_TEST_MAX_INPUT_TOKENS", "0"))


@cache
def _tokenizer():
    return AutoTokenizer.from_pretrained(os.environ["LORAPLEX_TEST_TOKENIZER"])


def _prompt_tokens(body: dict[str, Any]) -> int | None:
    tokenizer = _tokenizer()
    if isinstance(body.get("inputs"), str):
        return len(tokenizer(body["inputs"])["input_ids"])
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if isinstance(prompt, str):
        return len(tokenizer(prompt)["input_ids"])
    if isinstance(prompt, list) and all(isinstance(i, int) for i in prompt):
        return len(prompt)
    messages = body.get("messages")
    if isinstance(messages, list):
        try:
            text = tokenizer.apply_chat_template(
                [_message(m) for m in messages], add_generation_prompt=True, tokenize=False
            )
        except Exception:
            return None
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return None


def _message(m: Any) -> dict:
    content = m.get("content") if isinstance(m, dict) else None
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return {"role": m.get("role") if isinstance(m, dict) else "user", "content": content or ""}


def _asked(body: dict[str, Any]) -> int:
    params = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
    for value in (
        params.get("max_new_tokens", 64),
        body.get("max_completion_tokens"),
        body.get("max_tokens"),
    ):
        if isinstance(value, int):
            return value
    return 1 if "messages" in body else 16 if "prompt" in body else 64


def _composition_ok(body: dict[str, Any]) -> bool:
    params = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
    merged = params.get("merged_adapters")
    if isinstance(merged, dict):
        ids, weights = merged.get("ids"), merged.get("weights")
        if params.get("adapter_id") is not None or not isinstance(ids, list) or not isinstance(weights, list):
            return False
        if len(ids) != len(weights):
            return False
        return not ((merged.get("merge_strategy") or "linear") != "linear" and merged.get("density") == 0)
    if isinstance(body.get("sources"), list):  # POST /adapters/compose
        return not (body.get("strategy", "linear") != "linear" and body.get("density") == 0)
    return True


@schemathesis.hook
def filter_body(ctx, body: Any) -> bool:
    if not isinstance(body, dict):
        return True
    if not _composition_ok(body):
        return False
    if not MAX_TOTAL:
        return True
    prompt = _prompt_tokens(body)
    if prompt is None:
        return True
    return prompt <= MAX_INPUT and prompt + _asked(body) <= MAX_TOTAL
