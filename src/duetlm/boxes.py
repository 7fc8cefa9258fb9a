"""LaTeX boxes in text: where a `\\boxed{...}` answer is and what it holds (a leaf: the grader reads
a response's box, the data loaders a reference solution's)."""

from __future__ import annotations

import re

__all__ = [
    "BOX_COMMANDS",
    "MAX_BOX_CHARS",
    "UNCLOSED",
    "find_last_box",
    "last_boxed",
    "strip_math_delimiters",
]

MAX_BOX_CHARS = 10_000  # a \boxed{...} longer than this is treated as unclosed
BOX_COMMANDS = ("\\boxed", "\\fbox", "\\framebox")
UNCLOSED = object()  # sentinel: the last box was opened and never closed


def _match_braces(text: str, start: int) -> int | None:
    """Index just past the `}` that closes the `{` at `start`, or None (unclosed or too long)."""
    depth = 0
    end = min(len(text), start + MAX_BOX_CHARS)
    i = start
    while i < end:
        ch = text[i]
        if ch == "\\":
            i += 2  # `\{` and `\}` are literal braces in LaTeX, not grouping
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def strip_math_delimiters(s: str) -> str:
    s = s.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left) : len(s) - len(right)].strip()
    return s


def find_last_box(text: str) -> tuple[int, str] | object | None:
    """(position, content) of the last non-empty box; `UNCLOSED` if it never closes; None if no box."""
    end = len(text)
    for _ in range(8):  # skip at most a few empty boxes such as "put it in \boxed{}"
        pos, cmd = max((text.rfind(c, 0, end), c) for c in BOX_COMMANDS)
        if pos < 0:
            return None
        after = pos + len(cmd)
        if after < len(text) and text[after].isalpha():  # \boxedfoo is another command
            end = pos
            continue
        j = after
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            close = _match_braces(text, j)
            if close is None:
                return UNCLOSED
            content = strip_math_delimiters(text[j + 1 : close - 1])
        else:  # `\boxed 42`: TeX boxes the next token
            m = re.match(r"[^\s$]+", text[j : j + 200])
            content = m.group(0).rstrip(".,;") if m else ""
        if content:
            return pos, content
        end = pos
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last non-empty `\\boxed{}` / `\\fbox{}` of `text`; None if none or unclosed."""
    boxed = find_last_box(text)
    return boxed[1] if isinstance(boxed, tuple) else None
