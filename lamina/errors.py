"""Errors a user can act on.

Every error lamina raises for bad input says four things: what was wrong, the
value that was given, what is allowed, and how to fix it. The CLI prints the
message (never a traceback) and exits 2 for usage errors, 1 for failures at
run time. Library code raises; only the CLI prints.

Messages are written once, with CLI flags (``--epochs``); raised into Python
code, ``str(error)`` names the argument instead (``epochs``, ``overwrite=True``),
and the CLI prints :meth:`LaminaError.cli_text`.
"""

from __future__ import annotations

import difflib
import re
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


    def __str__(self) -> str:
        return api_text(self._format())  # raised to Python code: name arguments, not flags

    def cli_text(self) -> str:
        """The message as the ``lamina`` command prints it: CLI flags (``--epochs``) as written."""
        return self._format()


# Flags that take no value: "pass --overwrite" reads "pass overwrite=True" in the API.
_SWITCHES = {"overwrite", "resume", "full", "progress", "control", "importance", "ffn-per-layer", "recalibrate-bn",
             "scratch", "verify", "accuracy", "json"}
_FLAG = re.compile(r"(?<![\w-])--(no-)?([a-z][a-z0-9]*(?:-[a-z0-9]+)*)(?: (-?[0-9][^\s,;)]*|[A-Z][A-Z_]*\b|"
                   r"\S*/\S*|'[^']*'))?")
_KEEP = re.compile(r"`[^`]*`|\blamina [a-z]+ [^`\n]*")  # commands stay as a user types them


def _api_flag(m: re.Match) -> str:
    neg, name, value = m.group(1), m.group(2), m.group(3)
    arg = name.replace("-", "_")
    if neg:
        return f"{arg}=False"
    if value is not None:
        return f"{arg}={value}"
    return f"{arg}=True" if name in _SWITCHES else arg


def api_text(text: str) -> str:
    """``text`` with CLI flags turned into argument names (``--epochs 3`` -> ``epochs=3``,
    ``--overwrite`` -> ``overwrite=True``); commands (``lamina VERB ...`` and anything in backticks) are kept."""
    out, pos = [], 0
    for k in _KEEP.finditer(text):
        out.append(_FLAG.sub(_api_flag, text[pos:k.start()]))
        out.append(k.group(0))
        pos = k.end()
    out.append(_FLAG.sub(_api_flag, text[pos:]))
    return "".join(out)


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
