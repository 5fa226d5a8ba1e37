"""lm-evaluation-harness (the ``lm-eval`` command, ``local-completions`` model) against a live server:
a multiple-choice task (loglikelihood: echoed prompts with ``logprobs: 1``, ``max_tokens: 1``) and a
generate_until task, both sent in batches of 4 prompts (``--batch_size 4``), on the base model and
on an adapter. Scores are checked against the models' own log-probabilities and the server's own
completions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch

from tests.conftest import make_peft_adapter
from tests.live_server import start_live_server

BASE = "tiny-llama"
MAX_LENGTH = 256
MC_DOCS = [
    {"question": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0},
    {"question": "Two plus two is", "choices": [" four", " five"], "answer": 0},
    {"question": "Cats like to", "choices": [" sleep", " fly", " sing"], "answer": 0},
    {"question": "Water is", "choices": [" wet", " dry"], "answer": 0},
]
GEN_DOCS = [
    {"question": "Hello there, how are", "answer": " you"},
    {"question": "One two three", "answer": " four"},
    {"question": "The capital of France is", "answer": " Paris"},
    {"question": "Once upon a time", "answer": " there"},
    {"question": "Roses are red", "answer": ","},
]
MC_TASK = """\
task: loraplex_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
GEN_TASK = """\
task: loraplex_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def served(tiny_base, tokenizer, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lm-eval")
    peft = make_peft_adapter(tiny_base, workdir / "qv", seed=3, b_scale=0.5, r=8, lora_alpha=16,
                             target_modules=["q_proj", "v_proj"])  # fmt: skip
    live = start_live_server(
        tiny_base, tokenizer, workdir, adapter=[f"qv={workdir / 'qv'}"], max_total_tokens=MAX_LENGTH
    )
    yield live, {BASE: tiny_base, "qv": peft.eval()}
    live.stop()


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm-eval-tasks")
    for name, docs, template in (("mc", MC_DOCS, MC_TASK), ("gen", GEN_DOCS, GEN_TASK)):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (root / f"{name}.yaml").write_text(template.format(path=data))
    return root


def _lm_eval(url: str, model: str, tokenizer_dir: Path, tasks: Path, out: Path) -> list[dict]:
    """Run the real ``lm-eval`` command; returns its logged samples, both tasks."""
    model_args = (f"model={model},base_url={url}/v1/completions,tokenizer={tokenizer_dir},"
                  f"tokenizer_backend=huggingface,max_length={MAX_LENGTH},num_concurrent=1,max_retries=1")  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
               "--tasks", "loraplex_mc,loraplex_gen", "--include_path", str(tasks), "--batch_size", "4",
               "--output_path", str(out), "--log_samples"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    samples = [json.loads(line) for path in sorted(out.rglob("samples_*.jsonl")) for line in path.open()]
    assert len(samples) == len(MC_DOCS) + len(GEN_DOCS), sorted(out.rglob("*"))
    return samples


def _loglikelihood(model: torch.nn.Module, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's pair encoding (context alone, then the rest of context + continuation), scored by ``model``."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    continuation_ids = whole[len(context_ids) :]
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].log_softmax(-1)  # [T, V]
    rows = logits[len(context_ids) - 1 : len(whole) - 1]  # [len(continuation), V]
    targets = torch.tensor(continuation_ids)
    score = rows.gather(1, targets[:, None]).sum().item()
    return score, bool(torch.equal(rows.argmax(-1), targets))


@pytest.mark.parametrize("model", [BASE, "qv"])
def test_lm_eval_local_completions(served, tasks, tokenizer, embedded_dir, tmp_path, model) -> None:
    live, models = served
    samples = _lm_eval(live.url, model, embedded_dir, tasks, tmp_path / "out")
    mc = [s for s in samples if s["doc"] in MC_DOCS]
    gen = [s for s in samples if s["doc"] in GEN_DOCS]
    assert len(mc) == len(MC_DOCS) and len(gen) == len(GEN_DOCS)
    for sample in mc:  # every choice's score: the model's own log-probabilities of lm-eval's request
        requests = [sample["arguments"][f"gen_args_{i}"] for i in range(len(sample["doc"]["choices"]))]
        for request, response in zip(requests, sample["resps"], strict=True):  # logged as strings
            score, greedy = _loglikelihood(models[model], tokenizer, request["arg_0"], request["arg_1"])
            assert float(response[0][0]) == pytest.approx(score, abs=1e-3)
            assert response[0][1] == str(greedy)
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
    for sample in gen:  # what the server answers this prompt alone, greedy
        prompt = tokenizer(sample["doc"]["question"], add_special_tokens=False)["input_ids"]
        alone = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                          stop=["\n", tokenizer.eos_token])  # fmt: skip
        assert sample["resps"][0][0] == alone.choices[0].text
    client.close()
