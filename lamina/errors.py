"""Errors a user can act on.

Every error lamina raises for bad input says four things: what was wrong, the
value that was given, what is allowed, and how to fix it. The CLI prints the
message (never a traceback) and exits 2 for usage errors, 1 for failures at
run time. Library code raises; only the CLI prints.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class LaminaError(Exception):
    """A failure lamina can explain (exit code 1 from the CLI)."""

    exit_code = 1

    def __init__(self, what: str, *, value=None, allowed=None, fix: str | None = None):
        self.what = what
        self.value = value
        self.allowed = allowed
        self.fix = fix
        super().__init__(self._format())

    def _format(self) -> str:
        lines = [self.what]
        if self.value is not None:
            lines.append(f"  given:   {self.value!r}" if not isinstance(self.value, str)
                         else f"  given:   {self.value}")
        if self.allowed is not None:
            lines.append(f"  allowed: {self.allowed}")
        if self.fix:
            lines.append(f"  fix:     {self.fix}")
        return "\n".join(lines)


class UsageError(LaminaError):
    """The user asked for something that cannot work (exit code 2)."""

    exit_code = 2


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` closest valid names to ``name`` (difflib ratio), best first."""
    choices = list(choices)
    found = difflib.get_close_matches(name, choices, n=n, cutoff=0.4)
    if not found:  # fall back to substring matches so short typos still help
        found = [c for c in choices if name.lower() in c.lower() or c.lower() in name.lower()][:n]
    return found


def suggest(name: str, choices: Iterable[str]) -> str:
    """A 'did you mean' phrase for error messages, or '' when nothing is close."""
    found = closest(name, choices)
    return f"did you mean {', '.join(repr(f) for f in found)}?" if found else ""
