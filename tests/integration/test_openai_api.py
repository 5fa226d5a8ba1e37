"""The official ``openai`` SDK against a real server (tiny model, loopback): /v1/models,
/v1/completions and /v1/chat/completions, streaming and not, with an adapter and without."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import text_generation
import text_generation.types
import torch

from tests.live_server import openai_client, served_with_qv_adapter

BASE = "tiny-llama"
PROMPT = "Hello there, how are"


@pytest.fixture(scope="module")
def server(tiny_base, tokenizer, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("openai")
    with served_with_qv_adapter(tiny_base, tokenizer, workdir, max_total_tokens=256) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with openai_client(server) as c:
        yield c


def _generate(server, inputs: str, adapter_id: str | None, n: int) -> dict:
    body = {"inputs": inputs, "parameters": {"adapter_id": adapter_id, "max_new_tokens": n}}
    return httpx.post(server.url + "/generate", json=body, timeout=30).json()


def test_adapter_scale_as_an_extra_body_field(server, client) -> None:
    """``adapter_scale`` through the SDK's extra_body: 0 is the base model, 1 the adapter."""
    base = _generate(server, PROMPT, None, 6)["generated_text"]
    adapter = _generate(server, PROMPT, "qv", 6)["generated_text"]
    assert base != adapter
    for scale, expected in ((0.0, base), (1.0, adapter)):
        reply = client.completions.create(
            model="qv", prompt=PROMPT, max_tokens=6, temperature=0, extra_body={"adapter_scale": scale}
        )
        assert reply.choices[0].text == expected
    half = client.completions.create(model="qv", prompt=PROMPT, max_tokens=6, temperature=0,
                                     extra_body={"adapter_scale": 0.5})  # fmt: skip
    body = {"inputs": PROMPT, "parameters": {"adapter_id": "qv", "max_new_tokens": 6, "adapter_scale": 0.5}}
    assert (
        half.choices[0].text
        == httpx.post(server.url + "/generate", json=body, timeout=30).json()["generated_text"]
    )
    with pytest.raises(openai.UnprocessableEntityError, match="adapter_scale"):
        client.completions.create(model="qv", prompt=PROMPT, max_tokens=2, extra_body={"adapter_scale": 50})


def test_models_lists_base_and_adapters(client) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {BASE, "qv"}
    assert models["qv"].model_extra["parent"] == BASE and models[BASE].model_extra["parent"] is None
    assert all(m.object == "model" and m.owned_by == "loraplex" for m in models.values())


@pytest.mark.parametrize("model", [BASE, "qv"])
def test_completion_matches_generate_and_counts_usage(server, client, model) -> None:
    reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0)
    expected = _generate(server, PROMPT, None if model == BASE else "qv", 6)
    choice = reply.choices[0]
    assert reply.model == model and reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert choice.text == expected["generated_text"]
    assert choice.finish_reason == ("length" if expected["details"]["finish_reason"] == "length" else "stop")
    usage = reply.usage
    assert usage.prompt_tokens == expected["details"]["prompt_tokens"]
    assert usage.completion_tokens == expected["details"]["generated_tokens"]
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_adapter_changes_the_completion(client) -> None:
    texts = {m: client.completions.create(model=m, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
             for m in (BASE, "qv")}  # fmt: skip
    assert texts[BASE] != texts["qv"]


@pytest.mark.parametrize("model", [BASE, "qv"])
def test_completion_stream_equals_whole(client, model) -> None:
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=7, temperature=0)
    chunks = list(
        client.completions.create(
            model=model, prompt=PROMPT, max_tokens=7, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == whole.usage.completion_tokens
    text_chunks = chunks[:-1]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert len({c.id for c in chunks}) == 1


@pytest.mark.parametrize("model", [BASE, "qv"])
def test_chat_uses_the_template_stream_and_not(server, client, tokenizer, model) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = _generate(server, templated, None if model == BASE else "qv", 6)
    message = reply.choices[0].message
    assert reply.object == "chat.completion" and message.role == "assistant"
    assert message.content == expected["generated_text"]
    assert reply.usage.prompt_tokens == expected["details"]["prompt_tokens"]

    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0,
                                                 stream=True))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_stop_sequence_is_excluded_stream_and_not(client) -> None:
    full = client.completions.create(model="qv", prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    stripped = full.strip()
    assert len(stripped) >= 4, f"need some text to cut: {full!r}"
    stop = stripped[len(stripped) // 2 : len(stripped) // 2 + 2]
    expected = full[: full.find(stop)]
    for stops in (stop, [stop, "\x00never"]):
        cut = client.completions.create(model="qv", prompt=PROMPT, max_tokens=16, temperature=0, stop=stops)
        assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
        streamed = client.completions.create(
            model="qv", prompt=PROMPT, max_tokens=16, temperature=0, stop=stops, stream=True
        )
        chunks = list(streamed)
        assert "".join(c.choices[0].text for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_makes_sampling_repeatable(client) -> None:
    def sample() -> str:
        reply = client.completions.create(model="qv", prompt=PROMPT, max_tokens=8, temperature=0.9, top_p=0.95,
                                          seed=7)  # fmt: skip
        return reply.choices[0].text

    assert sample() == sample()


def test_unknown_model_is_404_in_openai_shape(server, client) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    assert info.value.body["code"] == "model_not_found" and "'nope'" in info.value.body["message"]
    raw = httpx.post(server.url + "/v1/chat/completions",
                     json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert raw.status_code == 404
    error = raw.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == "model" and error["type"] == "invalid_request_error"


def test_unsupported_fields_are_refused(client) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.completions.create(model=BASE, prompt=PROMPT, max_tokens=2, n=9)
    assert info.value.body["param"] == "n"
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.completions.create(model=BASE, prompt=PROMPT, max_tokens=2, best_of=2)
    assert "best_of" in info.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       response_format={"type": "xml"})  # fmt: skip
    assert "response_format" in info.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=BASE, prompt=PROMPT, max_tokens=2, logprobs=6)


def test_chat_logprobs_match_generate(server, client, tokenizer) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    reply = client.chat.completions.create(model="qv", messages=messages, max_tokens=5, temperature=0,
                                           logprobs=True, top_logprobs=3, response_format={"type": "text"})  # fmt: skip
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    body = {"inputs": templated, "parameters": {"adapter_id": "qv", "max_new_tokens": 5, "details": True}}
    expected = httpx.post(server.url + "/generate", json=body, timeout=30).json()["details"]["tokens"]
    content = reply.choices[0].logprobs.content
    assert [round(c.logprob, 4) for c in content] == [round(t["logprob"], 4) for t in expected]
    assert [c.token for c in content] == [tokenizer.decode([t["id"]]) for t in expected]
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.bytes == list(entry.token.encode())
    chunks = list(client.chat.completions.create(model="qv", messages=messages, max_tokens=5, temperature=0,
                                                 logprobs=True, stream=True))  # fmt: skip
    streamed = [
        c
        for chunk in chunks
        for c in (((chunk.choices[0].logprobs or None) and chunk.choices[0].logprobs.content) or [])
    ]
    assert [round(c.logprob, 4) for c in streamed] == [round(c.logprob, 4) for c in content]


def test_completion_logprobs_and_echo(client, tiny_base, tokenizer) -> None:
    reply = client.completions.create(
        model=BASE, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, echo=True
    )
    choice = reply.choices[0]
    ids = tokenizer(PROMPT)["input_ids"]
    assert choice.text.startswith(PROMPT)
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(ids) + 4 and logprobs.token_logprobs[0] is None
    with torch.no_grad():
        logits = tiny_base(torch.tensor([ids])).logits[0].log_softmax(-1)
    reference = [logits[j, ids[j + 1]].item() for j in range(len(ids) - 1)]
    assert logprobs.token_logprobs[1 : len(ids)] == pytest.approx(reference, abs=1e-4)
    assert all(len(top) == 2 for top in logprobs.top_logprobs[len(ids) :])
    assert logprobs.text_offset[len(ids)] == len(PROMPT)
    streamed = list(client.completions.create(model=BASE, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2,
                                              echo=True, stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == logprobs.tokens
    # the echoed prompt's chunk carries its log-probabilities (they come with the first token's event)
    values = [v for c in streamed if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert values[0] is None and values[1 : len(ids)] == pytest.approx(reference, abs=1e-4)


def test_n_choices_stream_and_not(client) -> None:
    reply = client.completions.create(model="qv", prompt=PROMPT, max_tokens=5, temperature=0.9, seed=3, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    single = client.completions.create(model="qv", prompt=PROMPT, max_tokens=5, temperature=0.9, seed=4)
    assert reply.choices[1].text == single.choices[0].text  # choice i samples with seed + i
    assert (
        reply.usage.completion_tokens == sum(5 for _ in reply.choices) or reply.usage.completion_tokens <= 15
    )
    chunks = list(client.chat.completions.create(
        model="qv", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0.9, seed=3, n=2,
        stream=True, stream_options={"include_usage": True}))  # fmt: skip
    texts = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        texts[chunk.choices[0].index] += chunk.choices[0].delta.content or ""
    whole = client.chat.completions.create(model="qv", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                           temperature=0.9, seed=3, n=2)  # fmt: skip
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_tgi_chat_client(server) -> None:
    """TGI's own chat client names the model "tgi" and reads role and system_fingerprint from every chunk."""
    tgi = text_generation.Client(server.url, timeout=30)
    messages = [text_generation.types.Message(role="user", content="Hi")]
    reply = tgi.chat(messages=messages, max_tokens=4, temperature=0.0001, seed=1)
    assert reply.choices[0].message.content
    chunks = []
    with pytest.raises(json.JSONDecodeError):  # text-generation 0.7.0 cannot parse OpenAI's closing `[DONE]`
        for chunk in tgi.chat(messages=messages, max_tokens=4, temperature=0.0001, seed=1, stream=True):
            chunks.append(chunk)
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == reply.choices[0].message.content
    )


def test_token_id_prompt(client, tokenizer) -> None:
    ids = tokenizer(PROMPT)["input_ids"]
    by_ids = client.completions.create(model=BASE, prompt=ids, max_tokens=5, temperature=0).choices[0].text
    by_text = (
        client.completions.create(model=BASE, prompt=PROMPT, max_tokens=5, temperature=0).choices[0].text
    )
    assert by_ids == by_text
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=BASE, prompt=[10**9], max_tokens=2)
