"""``--lora-backend`` (LORAPLEX_LORA_BACKEND) replaced ``--kernel`` and ``--cpu-kernel``: the old
names, as flags or env vars, stop the server with a message naming the replacement."""

from __future__ import annotations

from typing import get_args

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from server.cli import app
from server.config import Settings
from server.engine.lora import BACKEND_NAMES


def test_lora_backend_is_a_setting_and_an_env_var(monkeypatch) -> None:
    assert set(get_args(Settings.model_fields["lora_backend"].annotation)) == set(BACKEND_NAMES)
    assert Settings().lora_backend == "auto"
    assert Settings(lora_backend="gathered").lora_backend == "gathered"
    monkeypatch.setenv("LORAPLEX_LORA_BACKEND", "segmented")
    assert Settings().lora_backend == "segmented"
    with pytest.raises(ValidationError, match="compiled-cpu"):
        Settings(lora_backend="gather_bmm")  # the old kernel names are not backends


@pytest.mark.parametrize(("name", "value"), [("kernel", "segmented"), ("cpu_kernel", "off")])
def test_the_replaced_settings_name_their_replacement(monkeypatch, name: str, value: str) -> None:
    with pytest.raises(ValidationError, match="replaced by --lora-backend"):
        Settings(**{name: value})
    monkeypatch.setenv(f"LORAPLEX_{name.upper()}", value)
    with pytest.raises(ValidationError, match=f"LORAPLEX_{name.upper()}.*replaced by --lora-backend"):
        Settings()


@pytest.mark.parametrize(
    ("flag", "hint"), [("--kernel", "gathered"), ("--cpu-kernel", "off is --lora-backend grouped")]
)
def test_the_replaced_flags_fail_before_anything_starts(flag: str, hint: str) -> None:
    result = CliRunner().invoke(app, ["serve", flag, "off"])
    assert result.exit_code == 2  # a usage error: nothing was loaded
    text = " ".join(result.output.replace("│", " ").split())  # the message as one line, unboxed
    assert "replaced by --lora-backend" in text and hint in text
