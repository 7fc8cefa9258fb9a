"""Grading: the rule-based reward r(x, y) in {0, 1} of the paper (algorithm.md §1, §6).

`grade(response, problem)` pulls the final answer out of model text (`extract_answer`) and compares it
with the gold answer. It never raises on model text: empty, unparsable, 1 MB long or adversarial text
(`\\boxed{10^{10^{10}}}`, braces nested ten thousand deep) grades 0.0 within a bounded time.

Extraction, math (`kind="math"`), in this order; only the text after the last `</think>` is read when
the response has one (M's "original" answers carry their thinking):
  1. the last non-empty `\\boxed{...}` / `\\fbox{...}` / `\\framebox{...}` (nested braces, `\\{` escapes),
     or `\\boxed 42` without braces. If the last box is never closed (a truncated response) the answer
     is None: no fallback may pick a number out of the unfinished reasoning.
  2. the last "final answer is X" / "the answer is X" / "Answer: X" phrase: the last `$...$` span in
     it, else its text up to the first plain English word ("12 apples" -> "12").
  3. only when the gold answer is a plain number: the last number in the response.
Extraction, multiple choice (`kind="choice"`): the last `Answer: X` (any case, optional `**`, `$`,
`(X)`) or boxed letter, whichever comes last; else a lone letter at the very end. A letter outside the
problem's options does not count. A boxed option text is mapped to its letter.

Equivalence (math) goes through math-verify, gold first (it is not symmetric), after
  - fast paths: equal strings after removing spacing, `\\left`/`\\right` and `\\dfrac`/`\\tfrac`;
    two plain integers (AIME, AMC, GSM8K, DAPO answers) compared as integers;
  - a guard that rejects absurd predictions before sympy sees them: longer than `MAX_ANSWER_CHARS`,
    nested deeper than `MAX_NESTING`, or naming a number with more than `MAX_DIGITS` digits once
    evaluated (`10^{10^{10}}`, `(10^{10})!`); exact big-integer arithmetic runs in C, where no
    timeout can interrupt it.
Two repairs on top of math-verify: `~` reads as a space, and when only one side carries a `%` the
numbers are also compared without it (math-verify equates `25\\%` with 25 but not `12.5\\%` with 12.5).
Sympy verdicts are cached per (gold, prediction): GRPO rollouts repeat answers.

Bounded time. math-verify's own timeouts use `signal.alarm`, which works only on the main thread of
the main interpreter. So:
  - on the main thread, the comparison runs in-process under a `setitimer` alarm of `timeout` seconds
    (a caller's running alarm is saved and re-armed);
  - anywhere else (worker threads, `grade_many` workers), it runs in a helper process (`python -c`,
    no fork of a threaded parent), which applies the same alarm on its own main thread; if a helper
    does not answer within `timeout + WORKER_GRACE_S` it is killed and replaced, and that answer
    grades 0.0. A helper starts in about a second, once; then a chunk of comparisons costs one pipe
    round trip. `close_helpers()` stops them.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import math
import os
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# last_boxed and MAX_BOX_CHARS stay part of the grader's public surface.
from duetlm.boxes import MAX_BOX_CHARS as MAX_BOX_CHARS
from duetlm.boxes import UNCLOSED, find_last_box, strip_math_delimiters
from duetlm.boxes import last_boxed as last_boxed
from duetlm.problems import Problem

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0  # per comparison; math-verify's own default
WORKER_GRACE_S = 2.0  # how long past its own alarm a helper process may take before it is killed
WORKER_START_TIMEOUT_S = 60.0  # import of sympy + math-verify on a loaded 2-core machine
MAX_ANSWER_CHARS = 1000  # the longest gold answer in MATH-500 is 53 characters
MAX_NESTING = 8  # braces / brackets / parentheses; gold answers nest 2 deep, parsing 15 takes minutes
MAX_DIGITS = 10_000  # no benchmark answer is a number with more digits than this
TAIL_CHARS = 8_000  # answer phrases and the last number are looked for in this many final characters
_CACHE_SIZE = 1 << 16  # cached sympy verdicts


# --------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------


def _final_part(response: str) -> str:
    """The part of a response that holds its answer: the text after the last `</think>`, if any."""
    cut = response.rfind("</think>")
    return response[cut + len("</think>") :] if cut >= 0 else response


# "answer" then "is" and/or ":" / "=" (not "the answer carefully"), then the rest of the line.
_ANSWER_PHRASE = re.compile(r"(?i:answer)(?:\*\*)?(?:\s+(?i:is)\b\s*[:：]?|\s*[:=：])\s*(?:\*\*)?\s*([^\n]+)")
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]")
_ENGLISH_WORD = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}\b")
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _answer_phrase(tail: str) -> str | None:
    """The answer in the last 'the answer is ...' phrase, or None."""
    last = None
    for last in _ANSWER_PHRASE.finditer(tail):  # noqa: B007 - we want the last match
        pass
    if last is None:
        return None
    phrase = last.group(1).strip()
    spans = [next(g for g in m.groups() if g is not None) for m in _MATH_SPAN.finditer(phrase)]
    if spans:
        return spans[-1].strip() or None
    phrase = phrase.replace("**", "").strip()
    word = _ENGLISH_WORD.search(phrase)
    if word is not None and word.start() > 0:  # "12 apples" -> "12"; "Monday" stays "Monday"
        phrase = phrase[: word.start()]
    elif word is not None:
        phrase = word.group(0)
    phrase = re.split(r"[.;,]\s|\.$", phrase.strip())[0]
    return phrase.strip(" .,:;") or None


def _is_plain_number(s: str) -> bool:
    return _PLAIN_NUMBER.fullmatch(s.replace(",", "").strip()) is not None


def _extract_math(response: str, gold: str) -> str | None:
    text = _final_part(response)
    boxed = find_last_box(text)
    if boxed is UNCLOSED:
        return None
    if isinstance(boxed, tuple):
        return boxed[1]
    tail = text[-TAIL_CHARS:]
    phrase = _answer_phrase(tail)
    if phrase is not None:
        return phrase
    if _is_plain_number(gold):
        numbers = _NUMBER.findall(tail)
        if numbers:
            return numbers[-1]
    return None


_CHOICE_LABEL = re.compile(
    r"(?i:answer)\s*(?:(?i:is)\s*)?[:：]?\s*[*$\s]*(?:\\boxed\{|\\text\{|\\textbf\{)?\s*\(?([A-Z])\)?(?![A-Za-z])"
    r"|(?i:answer)\s*(?:(?i:is)\s*)?[:：]\s*[*$\s]*\(?([a-z])\)?[\s.*$]*$",
    re.MULTILINE,
)
_LONE_LETTER = re.compile(r"(?:^|[\s(\[*:])\(?([A-Z])\)?[\s.*$)\]]*$")


def _letters(problem: Problem) -> str:
    n = len(problem.choices) if problem.choices else 10
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n]


def _extract_choice(response: str, problem: Problem) -> str | None:
    text = _final_part(response)
    tail = text[-TAIL_CHARS:]
    valid = _letters(problem)
    candidates: list[tuple[int, str]] = []
    for m in _CHOICE_LABEL.finditer(tail):
        letter = (m.group(1) or m.group(2)).upper()
        if letter in valid:
            candidates.append((m.start(), letter))
    boxed = find_last_box(text)
    if isinstance(boxed, tuple):
        position, content = boxed
        inner = re.sub(r"^\\text(?:bf)?\{(.*)\}$", r"\1", content).strip().strip("()").strip()
        letter = inner.upper() if len(inner) == 1 else _choice_by_text(inner, problem)
        if letter is not None and letter in valid:
            # Box positions are counted from the whole text; shift them into the tail's frame.
            candidates.append((position - (len(text) - len(tail)), letter))
    if candidates:
        return max(candidates)[1]
    m = _LONE_LETTER.search(tail[-200:])
    if m is not None and m.group(1) in valid:
        return m.group(1)
    return None


def _choice_by_text(text: str, problem: Problem) -> str | None:
    """The letter of the option whose text is `text` (ignoring case and spacing), if any."""
    key = " ".join(text.split()).casefold()
    for letter, option in zip("ABCDEFGHIJKLMNOPQRSTUVWXYZ", problem.choices, strict=False):
        if key and " ".join(option.split()).casefold() == key:
            return letter
    return None


def extract_answer(response: str, problem: Problem) -> str | None:
    """The answer string that `grade` compares with the gold answer, or None if there is none.

    A letter for `kind="choice"`; the raw LaTeX/text of the answer for `kind="math"`. Never raises on
    model text (non-strings give None).
    """
    if not isinstance(response, str) or not response:
        return None
    if problem.kind == "choice":
        return _extract_choice(response, problem)
    if problem.kind == "math":
        return _extract_math(response, problem.answer)
    raise ValueError(f"unknown problem kind {problem.kind!r} (expected 'math' or 'choice')")


# --------------------------------------------------------------------------------------------------
# Equivalence
# --------------------------------------------------------------------------------------------------

_PERCENT = re.compile(r"\s*\\?%\s*$")
_SPACING = re.compile(r"\\left|\\right|\\[!,;: ]|\\displaystyle|\s+")


def canonical(s: str) -> str:
    """A conservative spelling normaliser for the exact-match fast path (it never merges values)."""
    s = strip_math_delimiters(s)
    s = _SPACING.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return s.rstrip(".")


def _nesting(s: str) -> int:
    depth = deepest = 0
    for ch in s:
        if ch in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "})]":
            depth -= 1
    return deepest


def _text_guard(pred: str) -> bool:
    """Cheap checks before any parsing: True if `pred` may go to math-verify."""
    return 0 < len(pred) <= MAX_ANSWER_CHARS and _nesting(pred) <= MAX_NESTING


def _log10_bound(expr: Any) -> float:
    """An upper bound on log10 |value| of a sympy expression if evaluated exactly; symbols count as 1.

    Sympy evaluates integer powers, factorials and binomials of literal numbers to exact integers;
    this bound lets `_too_big` refuse `10^{10^{10}}` before sympy tries.
    """
    import sympy

    if isinstance(expr, sympy.Rational):  # Integer is a Rational
        return math.log10(max(abs(int(expr.p)), abs(int(expr.q)), 1))
    if isinstance(expr, sympy.Float):
        return max(abs(float(expr.exp)) * math.log10(2), 0.0) if hasattr(expr, "exp") else 1.0
    if isinstance(expr, sympy.Pow):
        base, exp = expr.args
        base_bound = _log10_bound(base)
        exp_bound = _log10_bound(exp)
        if exp_bound > 15:
            return math.inf if base_bound > 0 else 0.0
        return base_bound * 10.0**exp_bound
    if isinstance(expr, sympy.factorial):
        n_bound = _log10_bound(expr.args[0])
        return math.inf if n_bound > 15 else 10.0**n_bound * max(n_bound, 1.0)
    if isinstance(expr, sympy.binomial):
        n_bound = _log10_bound(expr.args[0])
        return math.inf if n_bound > 15 else 10.0**n_bound * 0.302 + 1.0
    if isinstance(expr, sympy.Mul):
        return sum(_log10_bound(a) for a in expr.args)
    if isinstance(expr, (sympy.Sum, sympy.Product)):  # doit() would run the loop term by term
        for _, low, high in expr.limits:
            if max(_log10_bound(low), _log10_bound(high)) > 4:
                return math.inf
    args = getattr(expr, "args", ())
    if isinstance(expr, sympy.MatrixBase):
        args = tuple(expr)
    if not args:
        return 1.0  # a symbol, a constant such as pi, a string
    return max(_log10_bound(a) for a in args) + math.log10(len(args) + 1)


def _too_big(parsed: list[Any]) -> bool:
    return any(not isinstance(p, str) and _log10_bound(p) > MAX_DIGITS for p in parsed)


@functools.cache
def _math_verify() -> Any:
    """Import math-verify once, quietly: it warns once that its timeouts are off; ours are on."""
    import math_verify
    import math_verify.grader
    import math_verify.parser

    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    return math_verify


def _parse(latex: str) -> list[Any]:
    mv = _math_verify()

    # Timeouts are ours (see module docstring): math-verify's signal.alarm would fail off the main
    # thread and would cancel a caller's alarm.
    # "~" is a space in LaTeX (`10~\\text{cm}`); math-verify reads it as a symbol.
    return mv.parse(
        "\\boxed{" + latex.replace("~", " ") + "}",
        extraction_config=[mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()],
        parsing_timeout=None,  # type: ignore[arg-type]
    )


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list[Any]:
    return _parse(gold)


def _verify_unbounded(gold: str, pred: str) -> bool:
    """math-verify's verdict, gold first; the caller bounds the time."""
    gold_parsed = _parse_gold(gold)
    pred_parsed = _parse(pred)
    if not gold_parsed or not pred_parsed or _too_big(pred_parsed):
        return False
    if _math_verify().verify(gold_parsed, pred_parsed, timeout_seconds=None):
        return True
    # "12.5\%" vs "12.5": math-verify equates 25\% with 25 but not 12.5\% with 12.5 (it turns the
    # non-integer percentage into 0.125). A grader reads the question's "what percent": compare the
    # numbers without the sign when exactly one side has it.
    if bool(_PERCENT.search(gold)) != bool(_PERCENT.search(pred)):
        return _verify_unbounded(_PERCENT.sub("", gold), _PERCENT.sub("", pred))
    return False


class _GradingTimeout(BaseException):
    """Raised by our alarm. A BaseException, so that math-verify's `except Exception` cannot eat it."""


def _alarm_usable() -> bool:
    return (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGALRM) is not None  # None: a handler not installed from Python
    )


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise `_GradingTimeout` in the main thread after `seconds`, re-raising every 50 ms until done.

    A caller's pending alarm (pytest-timeout, another library) is restored with its remaining time.
    """

    def on_alarm(signum: int, frame: Any) -> None:
        raise _GradingTimeout

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:
            remaining = old_delay - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-3), old_interval)


def verify_in_process(gold: str, pred: str, timeout: float) -> bool:
    """Bounded comparison on the main thread (also the body of a helper process)."""
    try:
        with _alarm(timeout):
            return _verify_unbounded(gold, pred)
    except _GradingTimeout:
        logger.warning("grading timed out after %.1f s; counted as wrong: %.80r", timeout, pred)
        return False
    except RecursionError:
        return False


_INTEGER = re.compile(r"-?\d+")


def as_integer(s: str) -> int | None:
    """`s` as an integer if it is one written plainly (thousands separators allowed), else None."""
    s = strip_math_delimiters(s).replace("{,}", "").replace(" ", "")
    if len(s) <= 100 and _NUMBER.fullmatch(s) and _INTEGER.fullmatch(s.replace(",", "")):
        return int(s.replace(",", ""))
    return None


def _quick_verdict(gold: str, pred: str) -> bool | None:
    """Decide without sympy where that is safe: equal spellings, two integers, absurd predictions."""
    if canonical(gold) == canonical(pred):
        return True
    # Integer against integer (AIME, AMC, GSM8K, DAPO, the lab): no rounding can make two different
    # integers equal, so sympy has nothing to add.
    gold_int, pred_int = as_integer(gold), as_integer(pred)
    if gold_int is not None and pred_int is not None:
        return gold_int == pred_int
    if not _text_guard(pred):
        return False
    return None


class _Verdicts:
    """A thread-safe LRU of sympy verdicts keyed by (gold, pred, timeout): rollouts repeat answers."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[tuple[str, str, float], bool] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, float]) -> bool | None:
        with self._lock:
            if key not in self._data:
                return None
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key: tuple[str, str, float], verdict: bool) -> None:
        with self._lock:
            self._data[key] = verdict
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


_VERDICTS = _Verdicts(_CACHE_SIZE)


def _verify_pairs(pairs: list[tuple[str, str]], timeout: float) -> list[bool]:
    """math-verify verdicts for pairs that passed `_quick_verdict`: in-process or in a helper."""
    if _alarm_usable():
        verdicts = [verify_in_process(gold, pred, timeout) for gold, pred in pairs]
    else:
        verdicts = _helper_pool().verify_many(pairs, timeout)
    for (gold, pred), verdict in zip(pairs, verdicts, strict=True):
        _VERDICTS.put((gold, pred, timeout), verdict)
    return verdicts


def answers_equivalent(gold: str, pred: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """True if the predicted answer `pred` is mathematically equal to `gold` (LaTeX or plain text).

    Safe from any thread and bounded by about `timeout` seconds (see the module docstring).
    """
    if not isinstance(pred, str) or not isinstance(gold, str) or not gold.strip():
        return False
    quick = _quick_verdict(gold, pred)
    if quick is not None:
        return quick
    cached = _VERDICTS.get((gold, pred, float(timeout)))
    if cached is not None:
        return cached
    return _verify_pairs([(gold, pred)], float(timeout))[0]


def clear_cache() -> None:
    """Forget cached verdicts and parses in this process (benchmarks that measure the comparison)."""
    _VERDICTS.clear()
    _parse_gold.cache_clear()
    if "math_verify" in sys.modules:
        _math_verify().parser.parse_latex_cached.cache_clear()
        _math_verify().parser.parse_expr_cached.cache_clear()


# --------------------------------------------------------------------------------------------------
# Grading
# --------------------------------------------------------------------------------------------------


def grade(response: str, problem: Problem, *, timeout: float = DEFAULT_TIMEOUT_S) -> float:
    """r(x, y): 1.0 if `response` ends with the right answer to `problem`, else 0.0.

    Never raises on model text; bounded by about `timeout` seconds from any thread.
    """
    pred = extract_answer(response, problem)
    if pred is None:
        return 0.0
    if problem.kind == "choice":
        return 1.0 if pred == problem.answer.strip().upper() else 0.0
    return 1.0 if answers_equivalent(problem.answer, pred, timeout=timeout) else 0.0


def grade_many(
    responses: Sequence[str],
    problems: Sequence[Problem],
    *,
    workers: int = 1,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> list[float]:
    """`grade` over pairs (`responses[i]` answers `problems[i]`), with `workers` comparisons at once.

    Answers are extracted in the calling thread; each distinct (gold, answer) pair is compared once.
    `workers=1` compares in the calling thread. `workers=N` runs N comparisons at a time: N - 1
    threads each hand theirs to a helper process (the GIL keeps sympy from running in parallel in
    one process), and the calling thread, if it is the main thread, does its share in-process.
    N is capped at the number of CPUs this process may use.
    """
    if len(responses) != len(problems):
        raise ValueError(f"grade_many: {len(responses)} responses for {len(problems)} problems")
    scores = [0.0] * len(responses)
    pending: dict[tuple[str, str], list[int]] = {}
    for i, (response, problem) in enumerate(zip(responses, problems, strict=True)):
        pred = extract_answer(response, problem)
        if pred is None:
            continue
        if problem.kind == "choice":
            scores[i] = 1.0 if pred == problem.answer.strip().upper() else 0.0
            continue
        quick = _quick_verdict(problem.answer, pred) if problem.answer.strip() else False
        verdict = quick if quick is not None else _VERDICTS.get((problem.answer, pred, float(timeout)))
        if verdict is None:
            pending.setdefault((problem.answer, pred), []).append(i)
        elif verdict:
            scores[i] = 1.0

    # Chunks of pairs, so that a helper process costs one pipe round trip per chunk, not per pair.
    pairs = list(pending)
    size = max(1, min(16, len(pairs) // (4 * max(workers, 1))))
    todo: queue.SimpleQueue[list[tuple[str, str]]] = queue.SimpleQueue()
    for k in range(0, len(pairs), size):
        todo.put(pairs[k : k + size])

    def drain() -> None:
        while True:
            try:
                chunk = todo.get_nowait()
            except queue.Empty:
                return
            for pair, verdict in zip(chunk, _verify_pairs(chunk, float(timeout)), strict=True):
                if verdict:
                    for i in pending[pair]:
                        scores[i] = 1.0

    # More comparisons at once than cores only adds processes competing for the same CPUs.
    workers = min(
        workers, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    if workers <= 1 or len(pairs) <= size:
        drain()
        return scores
    in_process = _alarm_usable()
    threads = workers - 1 if in_process else workers
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="duetlm-grade") as pool:
        futures = [pool.submit(drain) for _ in range(threads)]
        if in_process:
            drain()
        for future in futures:
            future.result()  # re-raise a helper that could not start
    return scores


# --------------------------------------------------------------------------------------------------
# Helper processes (bounded grading off the main thread)
# --------------------------------------------------------------------------------------------------


class _Helper:
    """One `python -c` child. Request: a JSON line {"pairs": [[gold, pred], ...], "timeout": s}.
    Reply: one line per pair, in order, as each verdict is ready ("1" or "0")."""

    def __init__(self) -> None:
        src = str(Path(__file__).resolve().parents[1])  # so the child imports this very duetlm
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from duetlm.grading import _helper_main; _helper_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            bufsize=0,
        )
        self._buffer = b""
        if self._read_line(WORKER_START_TIMEOUT_S) != b"ready":
            self.close()
            raise RuntimeError("duetlm grading helper process did not start")

    def _read_line(self, timeout: float) -> bytes | None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:  # the child died
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def verify_many(self, pairs: list[tuple[str, str]], timeout: float) -> tuple[list[bool], bool]:
        """Verdicts for a prefix of `pairs`, and False if the child died or overran on the next pair."""
        assert self.proc.stdin is not None
        request = json.dumps({"pairs": pairs, "timeout": timeout}).encode() + b"\n"
        try:
            self.proc.stdin.write(request)
        except OSError:  # BrokenPipeError: the child is gone
            return [], False
        verdicts: list[bool] = []
        for _ in pairs:
            line = self._read_line(timeout + WORKER_GRACE_S)
            if line is None:
                return verdicts, False
            verdicts.append(line == b"1")
        return verdicts, True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _HelperPool:
    """Idle helpers in a LIFO queue; a caller with none idle starts a new one (up to `max_size`)."""

    def __init__(self, max_size: int) -> None:
        self.pid = os.getpid()
        self.max_size = max_size
        self._idle: queue.LifoQueue[_Helper] = queue.LifoQueue()
        self._lock = threading.Lock()
        self._count = 0

    def _acquire(self) -> _Helper:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            start = self._count < self.max_size
            if start:
                self._count += 1
        if not start:
            return self._idle.get()
        try:
            return _Helper()
        except BaseException:
            with self._lock:
                self._count -= 1
            raise

    def _discard(self, helper: _Helper) -> None:
        helper.proc.kill()
        helper.proc.wait()
        with self._lock:
            self._count -= 1

    def verify_many(self, pairs: list[tuple[str, str]], timeout: float) -> list[bool]:
        """One verdict per pair. A pair on which a helper dies or overruns counts as wrong; the helper
        is replaced and the pairs after it go to the next one."""
        verdicts: list[bool] = []
        while len(verdicts) < len(pairs):
            helper = self._acquire()
            done, healthy = helper.verify_many(pairs[len(verdicts) :], timeout)
            verdicts += done
            if healthy:
                self._idle.put(helper)
                break
            stuck = pairs[len(verdicts)][1]
            logger.warning("grading helper overran %.1f s or died; counted as wrong: %.80r", timeout, stuck)
            self._discard(helper)
            verdicts.append(False)
        return verdicts

    def close(self) -> None:
        while True:
            try:
                helper = self._idle.get_nowait()
            except queue.Empty:
                return
            helper.close()


_POOL: _HelperPool | None = None
_POOL_LOCK = threading.Lock()


def _helper_pool() -> _HelperPool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.pid != os.getpid():  # a forked child must not share its parent's pipes
            _POOL = _HelperPool(max_size=max(os.cpu_count() or 1, 8))
        return _POOL


@atexit.register
def close_helpers() -> None:
    """Stop the idle helper processes (they start again on demand); runs at exit."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None and _POOL.pid == os.getpid():
            _POOL.close()
        _POOL = None


def _helper_main() -> None:
    """Body of a helper process: answer requests on stdin until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    out = sys.stdout.buffer
    verify_in_process("1", "\\frac{2}{2}", WORKER_START_TIMEOUT_S)  # load sympy and the parser now
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        request = json.loads(line)
        for gold, pred in request["pairs"]:
            out.write(b"1\n" if verify_in_process(gold, pred, float(request["timeout"])) else b"0\n")
            out.flush()
