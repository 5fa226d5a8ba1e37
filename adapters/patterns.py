"""Regular expressions from users and adapter configs, run on RE2 (``google-re2``): linear time in
the text, bounded memory, whatever the pattern.

Python's ``re`` backtracks: ``(.+)+!`` against a module name takes hours and holds the GIL, so a
``layers=`` filter or an adapter's ``target_modules``/``rank_pattern``/``layers_pattern`` could
stall the whole server. RE2 has no backtracking; it refuses the few constructs that would need it
(look-arounds, back-references), and a pattern that does not compile is a clear error here.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import re2

MAX_PATTERN_CHARS = 500  # longer patterns are refused (and RE2's program size is capped below)
_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # a bad pattern is the caller's error, reported to them, not logged
_OPTIONS.max_mem = 8 << 20  # bytes of RE2 program and DFA cache per pattern


class PatternError(ValueError):
    """A pattern RE2 cannot run; the message says why (``str(exc)``)."""


@lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> Any:
    """``pattern`` compiled by RE2 (cached); :class:`PatternError` when it is too long or invalid."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(
            f"the pattern is {len(pattern)} characters long; at most {MAX_PATTERN_CHARS} are allowed"
        )
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        raise PatternError(f"{reason} (patterns run on RE2: no look-arounds or back-references)") from None
