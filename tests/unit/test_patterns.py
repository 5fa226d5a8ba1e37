"""User and config regexes run on RE2 (issue 31, findings 2, 5 and 10): patterns that make Python's
``re`` backtrack for hours answer at once, and patterns RE2 cannot run are clear 4xx errors."""

from __future__ import annotations

import json
import time

import pytest

from adapters.analysis import compile_layer_filter
from adapters.errors import AdapterError
from adapters.patterns import MAX_PATTERN_CHARS, PatternError, compile_pattern
from adapters.peft_format import parse_adapter_config

EVIL = r"(.+)+!"  # Python's re: 2^n steps on n characters without a '!'
MODULE = "model.layers.0.self_attn.q_proj"


def test_backtracking_patterns_run_in_linear_time() -> None:
    started = time.monotonic()
    assert compile_pattern(EVIL).search(MODULE + "a" * 100_000) is None
    assert compile_layer_filter(r"^(a|aa)+$").search("a" * 100_000 + "b") is None
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    "pattern",
    [r"^(?=model\.layers\.0\.self_attn\.q).{4}(.+)+!", r"(a)\1", "(", "x" * (MAX_PATTERN_CHARS + 1)],
)
def test_patterns_re2_cannot_run_are_refused_with_the_reason(pattern: str) -> None:
    with pytest.raises(PatternError):
        compile_pattern(pattern)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        compile_layer_filter(pattern)


def _config(**extra) -> bytes:
    return json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **extra}
    ).encode()


def test_config_patterns_are_matched_in_linear_time() -> None:
    config = parse_adapter_config(_config(target_modules=EVIL, rank_pattern={EVIL: 2}, layers_pattern=[EVIL]))
    started = time.monotonic()
    long_name = "model." + "a" * 20_000 + ".q_proj"
    assert not config.targets(long_name) and config.rank_for(long_name) == 4
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"rank_pattern": {"(": 2}}, "rank_pattern"),
        ({"alpha_pattern": {"(?<=x)q": 2.0}}, "alpha_pattern"),
        ({"layers_pattern": "(?=layers)"}, "layers_pattern"),
        ({"layers_pattern": [3]}, "layers_pattern"),
        ({"target_modules": r"(a)\1"}, "target_modules"),
    ],
)
def test_bad_config_patterns_are_config_errors_not_crashes(extra: dict, words: str) -> None:
    with pytest.raises(AdapterError, match=words) as err:
        parse_adapter_config(_config(**extra))
    assert err.value.error_type == "invalid_config"
