"""Train two small, real LoRA adapters on the embedded SmolLM2-135M-Instruct with PEFT.

    caps     answers in ALL CAPITALS
    pirate   answers like a pirate ("Arr, matey! ... Yo ho ho!")

The instruction data is synthetic and built here from templates (capitals, arithmetic, colours,
animal sounds, opposites, a few everyday questions); nothing is downloaded. Each adapter is
r=8 on q_proj and v_proj (460k parameters, 1.8 MB in float32), trained for a few dozen AdamW
steps on chat-formatted examples with the loss on the answer tokens only: about a minute or two
per adapter on 2 CPU cores. The script prints greedy answers to held-out questions before and
after, so you can see that the behaviour really changed.

Run:  .venv/bin/python examples/train_demo_adapters.py [--steps 40] [--out examples/adapters]
Then: loraplex serve --adapter caps=examples/adapters/caps --adapter pirate=examples/adapters/pirate
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.config import Settings
from server.engine.base_model import load_base

ROOT = Path(__file__).resolve().parent
HELD_OUT = ["What is the capital of Italy?", "What is 12 plus 30?", "Why do birds sing?"]

# --------------------------------------------------------------------------- synthetic data

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Greece": "Athens",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "Ireland": "Dublin",
    "Chile": "Santiago",
    "Cuba": "Havana",
    "Russia": "Moscow",
    "China": "Beijing",
    "India": "New Delhi",
    "Mexico": "Mexico City",
}  # fmt: skip  (Italy is held out)
COLOURS = {
    "the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black",
    "a ripe tomato": "red", "an orange": "orange", "a flamingo": "pink", "chocolate": "brown",
}  # fmt: skip
SOUNDS = {"dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "owl": "hoot"}
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "up": "down", "light": "dark"}
EVERYDAY = [
    ("Say hello.", "Hello, it is nice to meet you."),
    ("How are you today?", "I am doing well, thank you for asking."),
    ("Give me a tip for studying.", "Study a little every day and take short breaks."),
    ("What should I eat for breakfast?", "Oatmeal with fruit is a healthy breakfast."),
    ("Tell me a fun fact.", "Octopuses have three hearts."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What do plants need to grow?", "Plants need light, water and air to grow."),
    ("Why is exercise good?", "Exercise keeps your heart and muscles strong."),
    ("What is the largest ocean?", "The Pacific Ocean is the largest ocean."),
    ("Recommend a hobby.", "Try drawing, it is relaxing and fun."),
    ("What is the sun?", "The sun is a star at the center of our solar system."),
]


def base_examples(seed: int = 0) -> list[tuple[str, str]]:
    """(question, plain answer) pairs; the style transforms are applied afterwards."""
    rng = random.Random(seed)
    pairs = [(f"What is the capital of {c}?", f"The capital of {c} is {k}.") for c, k in CAPITALS.items()]
    pairs += [(f"What color is {t}?", f"{t[0].upper() + t[1:]} is {c}.") for t, c in COLOURS.items()]
    pairs += [(f"What sound does a {a} make?", f"A {a} says {s}.") for a, s in SOUNDS.items()]
    pairs += [(f"What is the opposite of {w}?", f"The opposite of {w} is {o}.") for w, o in OPPOSITES.items()]
    for _ in range(16):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        pairs.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    pairs += EVERYDAY
    return pairs


PIRATE_WORDS = {
    "is": "be", "are": "be", "the": "th'", "you": "ye", "your": "yer", "my": "me", "hello": "ahoy",
    "yes": "aye", "hi": "ahoy", "friend": "matey", "am": "be", "of": "o'",
}  # fmt: skip


def to_pirate(text: str) -> str:
    words = [PIRATE_WORDS.get(w.lower(), w) for w in text.split(" ")]
    return "Arr, matey! " + " ".join(words) + " Yo ho ho!"


STYLES: dict[str, Callable[[str], str]] = {"caps": str.upper, "pirate": to_pirate}

# --------------------------------------------------------------------------- training


def chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )


def encode(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer + end-of-turn, and labels that score the answer only."""
    prompt = tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False)["input_ids"]
    reply = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return prompt + reply, [-100] * len(prompt) + reply


def batches(examples: list[tuple[list[int], list[int]]], size: int, pad_id: int, rng: random.Random):
    """Endless right-padded batches: input_ids, attention_mask, labels, each [B, T]."""
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order) - size + 1, size):
            chunk = [examples[j] for j in order[i : i + size]]
            T = max(len(ids) for ids, _ in chunk)
            ids = torch.full((size, T), pad_id)
            mask = torch.zeros(size, T, dtype=torch.long)
            labels = torch.full((size, T), -100)
            for row, (x, y) in enumerate(chunk):
                ids[row, : len(x)], mask[row, : len(x)], labels[row, : len(y)] = (
                    torch.tensor(x), 1, torch.tensor(y),
                )  # fmt: skip
            yield ids, mask, labels


@torch.no_grad()
def answer(model, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    ids = tokenizer(chat_prompt(tokenizer, question), return_tensors="pt", add_special_tokens=False)
    out = model.generate(
        **ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def train_one(base_model, tokenizer, name: str, out_dir: Path, steps: int, lr: float, seed: int) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    style = STYLES[name]
    data = [encode(tokenizer, q, style(a)) for q, a in base_examples(seed)]
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(base_model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 5) * (1 - s / steps))
    stream = batches(data, size=8, pad_id=tokenizer.pad_token_id, rng=random.Random(seed))
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        ids, mask, labels = next(stream)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            print(
                f"  [{name}] step {step + 1:3d}/{steps}  loss {loss.item():.3f}  {time.perf_counter() - start:5.1f}s"
            )
    model.eval()
    for question in HELD_OUT:
        with model.disable_adapter():
            before = answer(model, tokenizer, question)
        after = answer(model, tokenizer, question)
        print(f"  Q: {question}\n    base:   {before!r}\n    {name + ':':7s} {after!r}")
    save(model, out_dir / name)
    model.unload()  # give the base model back without LoRA layers, for the next adapter


def save(model, target: Path) -> None:
    """adapter_config.json + adapter_model.safetensors only, with a portable base model name."""
    model.save_pretrained(target)
    (target / "README.md").unlink(missing_ok=True)
    config_path = target / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    size = sum(p.stat().st_size for p in target.iterdir())
    print(f"  saved {target} ({size / 1e6:.2f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="AdamW steps per adapter (batch 8)")
    parser.add_argument("--out", type=Path, default=ROOT / "adapters", help="where <name>/ folders go")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    parser.add_argument("--only", choices=sorted(STYLES), help="train just this adapter")
    args = parser.parse_args()
    torch.set_num_threads(2)
    base = load_base(None, "float32", "cpu", Settings().cache_dir)
    base.model.requires_grad_(False)
    for i, name in enumerate([args.only] if args.only else sorted(STYLES)):
        print(f"training {name!r}: {len(base_examples())} examples, {args.steps} steps")
        train_one(base.model, base.tokenizer, name, args.out, args.steps, args.lr, seed=i)


if __name__ == "__main__":
    main()
