"""The openai SDK against a live server (tiny model) for what evaluation and benchmark tools send:
echoed prompts with their top log-probabilities, ``max_tokens: 0`` scoring, a list of prompts in
one request, ``ignore_eos``, OpenAI's context-length error, and the SDK's chat stream helper."""

from __future__ import annotations

from collections import Counter

import httpx
import openai
import pydantic
import pytest
import torch

from tests.live_server import openai_client, served_with_qv_adapter

BASE = "tiny-llama"
PROMPTS = ["Hello there, how are", "The capital of France is", "One two three"]


@pytest.fixture(scope="module")
def server(tiny_base, tokenizer, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("openai-scoring")
    with served_with_qv_adapter(tiny_base, tokenizer, workdir, max_total_tokens=128) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with openai_client(server) as c:
        yield c


def _reference(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].log_softmax(-1)  # [T, V]


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_scores_every_prompt_token_with_its_top_entries(
    client, tiny_base, tokenizer, max_tokens
) -> None:
    """lm-eval's loglikelihood request: the first prompt token alone has null entries (OpenAI's shape)."""
    prompt = PROMPTS[0]
    ids = tokenizer(prompt)["input_ids"]
    reply = client.completions.create(model=BASE, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                      logprobs=1, echo=True)  # fmt: skip
    choice = reply.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(ids) + max_tokens
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    reference = _reference(tiny_base, ids)
    for j in range(1, len(ids)):
        top = logprobs.top_logprobs[j]
        assert len(top) == 1
        best = reference[j - 1].max().item()
        assert next(iter(top.values())) == pytest.approx(best, abs=1e-4)
        assert logprobs.token_logprobs[j] == pytest.approx(reference[j - 1, ids[j]].item(), abs=1e-4)
    if max_tokens == 0:  # scoring only: the prompt back, nothing generated
        assert choice.text == prompt and choice.finish_reason == "length"
        assert reply.usage.completion_tokens == 0 and reply.usage.prompt_tokens == len(ids)
        streamed = list(client.completions.create(model=BASE, prompt=prompt, max_tokens=0, logprobs=1,
                                                  echo=True, stream=True))  # fmt: skip
        assert "".join(c.choices[0].text for c in streamed) == prompt
        tops = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.top_logprobs]
        assert tops == logprobs.top_logprobs


def test_max_tokens_zero_without_echo_is_refused(client) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.completions.create(model=BASE, prompt=PROMPTS[0], max_tokens=0)
    assert info.value.body["param"] == "max_tokens" or "echo" in info.value.body["message"]
    assert "echo" in info.value.body["message"]


@pytest.mark.parametrize("model", [BASE, "qv"])
def test_list_of_prompts_is_one_choice_per_prompt_and_n(server, client, tokenizer, model) -> None:
    stats = server.app.state.engine.stats
    before = Counter(stats.batch_sizes)
    reply = client.completions.create(
        model=model, prompt=PROMPTS, max_tokens=5, temperature=0.8, seed=11, n=2
    )
    assert max(size for size, steps in (stats.batch_sizes - before).items() if steps) == 6  # one batch
    assert [c.index for c in reply.choices] == list(range(6))
    for index, choice in enumerate(
        reply.choices
    ):  # index = prompt x n + choice; choice i samples with seed + i
        alone = client.completions.create(model=model, prompt=PROMPTS[index // 2], max_tokens=5, temperature=0.8,
                                          seed=11 + index % 2)  # fmt: skip
        assert choice.text == alone.choices[0].text
    assert reply.usage.prompt_tokens == sum(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    by_ids = client.completions.create(model=model, prompt=[tokenizer(p)["input_ids"] for p in PROMPTS],
                                       max_tokens=5, temperature=0, echo=True)  # fmt: skip
    assert [c.text[: len(p)] for c, p in zip(by_ids.choices, PROMPTS, strict=True)] == PROMPTS
    chunks = list(client.completions.create(model=model, prompt=PROMPTS, max_tokens=5, temperature=0.8,
                                            seed=11, n=2, stream=True, stream_options={"include_usage": True}))  # fmt: skip
    texts: dict[int, str] = {}
    for chunk in chunks[:-1]:
        texts[chunk.choices[0].index] = texts.get(chunk.choices[0].index, "") + chunk.choices[0].text
    assert texts == {c.index: c.text for c in reply.choices}
    assert chunks[-1].usage.prompt_tokens == reply.usage.prompt_tokens


def test_too_many_batched_choices_are_refused(client) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.completions.create(model=BASE, prompt=["a"] * 20, max_tokens=1, n=4)
    assert "split the prompts" in info.value.body["message"]


def test_ignore_eos_generates_max_tokens(client) -> None:
    """A grammar that ends after one JSON boolean: EOS ends the reply, unless ignore_eos (vLLM's field)."""
    schema = {"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "boolean"}}}
    messages = [{"role": "user", "content": "yes?"}]
    short = client.chat.completions.create(model=BASE, messages=messages, max_tokens=12, temperature=0,
                                           response_format=schema)  # fmt: skip
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 12
    long = client.chat.completions.create(model=BASE, messages=messages, max_tokens=12, temperature=0,
                                          response_format=schema, extra_body={"ignore_eos": True})  # fmt: skip
    assert long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 12
    completion = client.completions.create(model=BASE, prompt=PROMPTS[0], max_tokens=9, temperature=0,
                                           extra_body={"ignore_eos": True, "response_format": schema})  # fmt: skip
    assert completion.usage.completion_tokens == 9 and completion.choices[0].finish_reason == "length"


def test_context_length_exceeded_is_openais_400(server, client) -> None:
    long_prompt = "hello " * 200
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=BASE, prompt=long_prompt, max_tokens=2)
    assert info.value.code == "context_length_exceeded" and info.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=BASE, prompt="hi", max_tokens=1000)
    assert info.value.code == "context_length_exceeded" and "128" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="qv", messages=[{"role": "user", "content": long_prompt}])
    assert info.value.code == "context_length_exceeded" and info.value.param == "messages"
    error = httpx.post(server.url + "/v1/completions", json={"model": BASE, "prompt": [long_prompt]}).json()
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["type"] == "invalid_request_error"


class Answer(pydantic.BaseModel):
    ok: bool


@pytest.mark.parametrize("model", [BASE, "qv"])
def test_chat_stream_helper_joins_the_deltas(client, model) -> None:
    """``chat.completions.stream()`` merges the deltas' fields: the role must come once (OpenAI's shape),
    and the message it builds can be sent back in the conversation. (The helper refuses a reply cut by
    max_tokens; a response_format ends the random model's reply.)"""
    messages = [{"role": "user", "content": "Hi"}]
    whole = client.chat.completions.parse(model=model, messages=messages, max_tokens=40, temperature=0,
                                          response_format=Answer)  # fmt: skip
    assert isinstance(whole.choices[0].message.parsed, Answer)
    with client.chat.completions.stream(model=model, messages=messages, max_tokens=40, temperature=0,
                                        response_format=Answer) as stream:  # fmt: skip
        deltas = [e.chunk.choices[0].delta for e in stream if e.type == "chunk" and e.chunk.choices]
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert message.role == "assistant" and message.content == whole.choices[0].message.content
    assert message.parsed == whole.choices[0].message.parsed
    assert len(deltas) > 2 and deltas[0].role == "assistant" and all(d.role is None for d in deltas[1:])
    follow_up = [
        *messages,
        {"role": message.role, "content": message.content},
        {"role": "user", "content": "And?"},
    ]
    assert (
        client.chat.completions.create(model=model, messages=follow_up, max_tokens=2)
        .choices[0]
        .message.content
    )
