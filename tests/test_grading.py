"""The grader: extraction, an equivalence table a careful human would agree with, adversarial text,
bounded time from the main thread, from worker threads and from other processes. Real math-verify."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from duetlm import grading
from duetlm.grading import answers_equivalent, clear_cache, extract_answer, grade, grade_many, last_boxed
from duetlm.problems import Problem

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"benchmark files not found at {SHARED_DATA} (../shared/data)"
)


def math_problem(answer: str) -> Problem:
    return Problem(id="p", question="q", answer=answer)


GPQA_LIKE = Problem(
    id="c",
    question="Which is a noble gas?",
    answer="C",
    kind="choice",
    choices=("Oxygen", "Nitrogen", "Argon", "Iron"),
)

# (gold, prediction, a careful human grader's verdict). The prediction is what a model put in \boxed{}.
EQUIVALENCE = [
    # fractions and decimals
    ("\\frac{1}{2}", "0.5", True),
    ("\\frac12", "1/2", True),
    ("0.5", "\\frac{1}{2}", True),
    ("\\frac{3}{4}", "0.75", True),
    ("\\frac{2}{3}", "\\frac{4}{6}", True),
    ("-\\frac{1}{2}", "\\frac{-1}{2}", True),
    ("\\frac{7}{2}", "3.5", True),
    ("\\frac{1}{3}", "0.333", False),
    ("1/2", "2", False),
    ("\\frac{1}{2}", "\\frac{2}{1}", False),
    # \dfrac, \tfrac
    ("\\dfrac{5}{8}", "\\frac{5}{8}", True),
    ("\\tfrac{3}{7}", "3/7", True),
    ("\\frac{9}{4}", "\\dfrac94", True),
    ("\\dfrac{5}{8}", "\\tfrac{8}{5}", False),
    # radicals
    ("2\\sqrt{2}", "\\sqrt{8}", True),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}", True),
    ("3\\sqrt{5}", "\\sqrt{45}", True),
    ("\\sqrt[3]{27}", "3", True),
    ("\\sqrt{2}", "1.414", False),
    ("\\sqrt{2}", "2", False),
    ("2\\sqrt{3}", "3\\sqrt{2}", False),
    # pi
    ("2\\pi", "2 \\pi", True),
    ("\\frac{\\pi}{2}", "\\pi/2", True),
    ("4\\pi", "\\pi \\cdot 4", True),
    ("\\pi", "3", False),
    ("\\frac{3\\pi}{4}", "\\frac{\\pi}{4}", False),
    # degrees
    ("30^\\circ", "30", True),
    ("45", "45^{\\circ}", True),
    ("120", "120^\\circ", True),
    ("90^\\circ", "45^\\circ", False),
    # percent
    ("25\\%", "25", True),
    ("40", "40\\%", True),
    ("12.5\\%", "12.5", True),
    ("50\\%", "40\\%", False),
    # units and \text{}
    ("10\\text{ cm}", "10", True),
    ("5.4 \\text{ cents}", "5.4", True),
    ("18", "18 \\text{ dollars}", True),
    ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}", True),
    ("10\\text{ cm}", "11", False),
    # text answers
    ("10", "10~\\text{cm}", True),  # ~ is a LaTeX space
    ("\\text{Evelyn}", "Evelyn", True),
    ("\\text{east}", "\\text{East}", True),
    ("\\text{(C)}", "C", True),
    ("\\text{Navin}", "\\text{Evelyn}", False),
    ("\\text{even}", "\\text{odd}", False),
    ("\\text{(C)}", "(D)", False),
    # thousands separators
    ("1000", "1,000", True),
    ("1234567", "1,234,567", True),
    ("10000", "10{,}000", True),
    ("2125", "2,125", True),
    ("1000", "1,001", False),
    # negative numbers
    ("-5", "-5", True),
    ("-\\frac{3}{2}", "-1.5", True),
    ("-2", "- 2", True),
    ("-5", "5", False),
    ("-7", "7", False),
    # scientific notation
    ("1.5\\times10^{3}", "1500", True),
    ("3\\times 10^{-2}", "0.03", True),
    ("1500", "1.5 \\cdot 10^3", True),
    ("10^{100}", "10^{100}", True),
    ("6\\times10^{5}", "6\\times10^{6}", False),
    # intervals and sets
    ("(-\\infty, 3]", "(-\\infty,3]", True),
    ("(0, \\infty)", "(0,\\infty)", True),
    ("(-\\infty, 2) \\cup (3, \\infty)", "(-\\infty,2)\\cup(3,\\infty)", True),
    ("\\{1, 2, 3\\}", "\\{3, 2, 1\\}", True),
    ("x \\in [0, 1]", "[0,1]", True),
    ("[1,2)", "(1,2]", False),
    ("[2, 5]", "[2,5)", False),
    ("\\{1, 2\\}", "\\{1, 3\\}", False),
    # tuples and coordinates
    ("(3, -4)", "(3,-4)", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)", True),
    ("\\left( \\frac{3}{2}, -13 \\right)", "(1.5, -13)", True),
    ("(1,2)", "(2,1)", False),
    ("(1, 2, 3)", "(1, 2, 4)", False),
    # matrices and vectors
    ("\\begin{pmatrix} 1/5 \\\\ -18/5 \\end{pmatrix}", "\\begin{pmatrix} 0.2 \\\\ -3.6 \\end{pmatrix}", True),
    (
        "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}",
        "\\begin{bmatrix} -1 & 0 \\\\ 0 & -1 \\end{bmatrix}",
        True,
    ),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}", False),
    # equations
    ("3", "x=3", True),
    ("x=3", "3", True),
    ("y = 2x + 1", "y=1+2x", True),
    ("x = 3", "x = 4", False),
    ("y=2x+1", "y=2x-1", False),
    # plus/minus
    ("\\pm 2", "2, -2", True),
    ("1 \\pm \\sqrt{2}", "1+\\sqrt{2}, 1-\\sqrt{2}", True),
    ("\\pm 3", "3", False),
    # expressions
    ("x^2 + 2x + 1", "(x+1)^2", True),
    ("p - q", "-q + p", True),
    ("a^2 - b^2", "(a-b)(a+b)", True),
    ("x^5 - x^4 + x^3 - x^2 + x - 1", "x^5 - x^4 + x^3 - x^2 + x + 1", False),
    ("6 - 5i", "6-5i", True),
    ("1 + i", "1 - i", False),
    # plain numbers
    ("27", "27.0", True),
    ("25", "025", True),
    ("0", "0", True),
    ("204", "240", False),
    ("3", "3.5", False),
    ("100", "99.99", False),
]


def test_the_table_is_big_and_balanced() -> None:
    assert len(EQUIVALENCE) >= 80
    assert sum(not ok for _, _, ok in EQUIVALENCE) >= 30


@pytest.mark.parametrize(
    ("gold", "pred", "expected"), EQUIVALENCE, ids=[f"{g} vs {p}" for g, p, _ in EQUIVALENCE]
)
def test_equivalence_table(gold: str, pred: str, expected: bool) -> None:
    response = f"Let me work through it.\n\nTherefore the final answer is $\\boxed{{{pred}}}$."
    assert grade(response, math_problem(gold)) == (1.0 if expected else 0.0)


# --- extraction, math ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "gold", "expected"),
    [
        ("so $\\boxed{\\frac{a^{2}}{\\sqrt{b_{1}}}}$ done", "x", "\\frac{a^{2}}{\\sqrt{b_{1}}}"),
        ("\\boxed{\\{1, 2\\}}", "x", "\\{1, 2\\}"),  # escaped braces do not close the box
        ("first \\boxed{3}, then corrected: \\boxed{4}", "x", "4"),
        ("the answer is \\boxed 42.", "x", "42"),
        ("\\fbox{7}", "x", "7"),
        ("\\boxed{$12$}", "x", "12"),
        ("put it in \\boxed{} ... final: \\boxed{9} and later \\boxed{}", "x", "9"),
        ("I think \\boxed{5} but then \\boxed{6", "5", None),  # truncated: no fallback into the reasoning
        ("The final answer is $\\frac{1}{2}$.", "x", "\\frac{1}{2}"),
        ("So the answer is 12 apples.", "12", "12"),
        ("**Final Answer:** 3.5", "x", "3.5"),
        ("The answer is Monday.", "x", "Monday"),
        ("Adding up we get 5 + 7 = 12 pencils.", "12", "12"),  # last number, numeric gold only
        ("Adding up we get 5 + 7 = 12 pencils.", "\\frac{1}{2}", None),
        ("There are 1,234 of them", "1234", "1,234"),
        ("<think>maybe \\boxed{1}</think>It is \\boxed{2}", "x", "2"),  # only the text after </think>
        ("<think>the answer is 3</think>", "3", None),
        ("", "1", None),
        ("no numbers here at all", "1", None),
    ],
)
def test_extract_math(response: str, gold: str, expected: str | None) -> None:
    assert extract_answer(response, math_problem(gold)) == expected


def test_last_boxed_is_public_for_solution_texts() -> None:
    assert last_boxed("we get $\\boxed{\\pm 2}$, with $x>0$: $\\boxed{2}$.") == "2"
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed{unclosed") is None


# --- extraction, multiple choice ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("Reasoning...\nAnswer: C", "C"),
        ("**Answer:** C", "C"),
        ("**Answer: C**", "C"),
        ("ANSWER: $C$", "C"),
        ("answer: (c)", "C"),
        ("The correct answer is (C).", "C"),
        ("so it must be \\boxed{C}", "C"),
        ("\\boxed{\\text{C}}", "C"),
        ("\\boxed{Argon}", "C"),  # an option's text maps to its letter
        ("Answer: A ... on reflection, Answer: C", "C"),
        ("Answer: A\nWait, that is wrong. \\boxed{C}", "C"),
        ("After all that, I pick C", "C"),
        ("(C)", "C"),
        ("Answer: E", None),  # there is no option E
        ("The energy is E", None),
        ("I am not sure.", None),
        ("", None),
    ],
)
def test_extract_choice(response: str, expected: str | None) -> None:
    assert extract_answer(response, GPQA_LIKE) == expected
    assert grade(response, GPQA_LIKE) == (1.0 if expected == "C" else 0.0)


def test_choice_wrong_letter_is_wrong() -> None:
    assert grade("Answer: B", GPQA_LIKE) == 0.0


# --- never raises, bounded time -----------------------------------------------------------------

ADVERSARIAL = {
    "tower": "\\boxed{10^{10^{10}}}",
    "tower of nines": "\\boxed{9^{9^{9}}}",
    "factorial of a huge number": "\\boxed{(10^{10})!}",
    "huge binomial": "\\boxed{\\binom{10^{9}}{5 \\cdot 10^{8}}}",
    "huge product": "\\boxed{\\prod_{i=1}^{10^{9}} i}",
    "huge sum": "\\boxed{\\sum_{i=1}^{10^{9}} i^i}",
    "tiny rational power": "\\boxed{(1/2)^{10^{10}}}",
    "float power": "\\boxed{1.0001^{10^{12}}}",
    "symbolic huge exponent": "\\boxed{x^{10^{10}}}",
    "deeply nested braces": "\\boxed{" + "{" * 5000 + "5" + "}" * 5000 + "}",
    "nested parentheses": "\\boxed{" + "(" * 30 + "5" + ")" * 30 + "}",
    "1 MB of text then a wrong box": "x" * 1_000_000 + " \\boxed{4}",
    "1 MB of open braces": "\\boxed{" + "{" * 1_000_000,
    "100k boxes": "\\boxed{1}" * 100_000,
    "1 MB of numbers": "1 " * 500_000,
    "1 MB answer phrase": "The answer is " + "9" * 1_000_000,
    "1 MB box content": "\\boxed{" + "9" * 1_000_000 + "}",
    "broken latex": "\\boxed{\\frac{\\frac{}{}}{}}",
    "unbalanced latex": "\\boxed{\\left( 4 \\right]]]]}",
    "control characters": "\\boxed{\x00\x01\x02\ufffd}",
    "empty": "",
}


def grade_all_adversarial(timeout: float) -> dict[str, tuple[float, float]]:
    results = {}
    for name, response in ADVERSARIAL.items():
        start = time.monotonic()
        score = grade(response, math_problem("5"), timeout=timeout)
        results[name] = (score, time.monotonic() - start)
    return results


def test_adversarial_text_grades_zero_quickly_on_the_main_thread() -> None:
    clear_cache()
    for name, (score, seconds) in grade_all_adversarial(timeout=1.0).items():
        assert score == 0.0, name
        assert seconds < 3.0, f"{name}: {seconds:.1f} s"


def test_adversarial_text_grades_zero_quickly_from_a_worker_thread() -> None:
    clear_cache()  # the main-thread test may have cached these verdicts
    out: dict[str, tuple[float, float]] = {}

    def work() -> None:
        answers_equivalent("1/2", "0.5")  # start a helper process first: that takes a second or two
        out.update(grade_all_adversarial(timeout=1.0))

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive()
    assert set(out) == set(ADVERSARIAL)
    for name, (score, seconds) in out.items():
        assert score == 0.0, name
        assert seconds < 3.0 + grading.WORKER_GRACE_S, f"{name}: {seconds:.1f} s"


def test_non_string_responses_grade_zero() -> None:
    assert grade(None, math_problem("1")) == 0.0  # type: ignore[arg-type]
    assert extract_answer(b"\\boxed{1}", math_problem("1")) is None  # type: ignore[arg-type]


def test_the_table_grades_the_same_from_a_worker_thread() -> None:
    sample = EQUIVALENCE[::4]
    clear_cache()
    out: list[float] = []
    worker = threading.Thread(
        target=lambda: out.extend(grade(f"\\boxed{{{p}}}", math_problem(g)) for g, p, _ in sample)
    )
    worker.start()
    worker.join(timeout=120)
    assert out == [1.0 if ok else 0.0 for _, _, ok in sample]


def test_a_slow_comparison_times_out_on_the_main_thread_and_restores_a_callers_alarm() -> None:
    fired: list[int] = []

    def callers_handler(signum: int, frame: object) -> None:
        fired.append(signum)

    previous = signal.signal(signal.SIGALRM, callers_handler)
    signal.setitimer(signal.ITIMER_REAL, 30.0)
    try:
        clear_cache()
        # A sum that sympy expands term by term, under our guard's limit, with a tiny budget.
        start = time.monotonic()
        assert grade("\\boxed{\\sum_{i=1}^{9000} i^{i}}", math_problem("5"), timeout=0.2) == 0.0
        assert time.monotonic() - start < 2.0
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 20.0 < remaining <= 30.0  # the caller's alarm is re-armed with its remaining time
        assert signal.getsignal(signal.SIGALRM) is callers_handler
        assert not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_stuck_helper_process_is_killed_and_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grading, "WORKER_GRACE_S", 0.3)
    pool = grading._HelperPool(max_size=1)
    try:
        assert pool.verify_many([("1/2", "0.5")], 2.0) == [True]
        (helper,) = list(pool._idle.queue)
        os.kill(helper.proc.pid, signal.SIGSTOP)  # a helper stuck where no alarm can reach it
        start = time.monotonic()
        # The pair it was stuck on counts as wrong; a fresh helper takes the rest.
        assert pool.verify_many([("1/2", "2/4"), ("1/2", "0.75"), ("1/2", "\\frac{3}{6}")], 0.5) == [
            False,
            False,
            True,
        ]
        assert time.monotonic() - start < 0.5 + 0.3 + grading.WORKER_START_TIMEOUT_S
        assert helper.proc.poll() is not None  # killed
        assert len(pool._idle.queue) == 1
    finally:
        pool.close()


def _grade_in_child(queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    start = time.monotonic()
    scores = [
        grade(ADVERSARIAL["huge sum"], math_problem("5"), timeout=1.0),
        grade("\\boxed{0.5}", math_problem("1/2")),
    ]
    queue.put((scores, time.monotonic() - start))


def test_grading_in_another_process() -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_grade_in_child, args=(queue,))
    child.start()
    scores, seconds = queue.get(timeout=120)
    child.join(timeout=30)
    assert scores == [0.0, 1.0]
    assert seconds < 10.0


# --- grade_many ---------------------------------------------------------------------------------


def test_grade_many_matches_grade_with_one_and_several_workers() -> None:
    problems = [math_problem(g) for g, _, _ in EQUIVALENCE[:24]] + [GPQA_LIKE, GPQA_LIKE]
    responses = [f"\\boxed{{{p}}}" for _, p, _ in EQUIVALENCE[:24]] + ["Answer: C", "Answer: A"]
    expected = [1.0 if ok else 0.0 for _, _, ok in EQUIVALENCE[:24]] + [1.0, 0.0]
    clear_cache()
    assert grade_many(responses, problems, workers=1) == expected
    clear_cache()
    assert grade_many(responses, problems, workers=2) == expected


def test_grade_many_checks_lengths() -> None:
    with pytest.raises(ValueError, match="2 responses for 1 problems"):
        grade_many(["a", "b"], [math_problem("1")])


def test_answers_equivalent_rejects_non_strings_and_empty_gold() -> None:
    assert answers_equivalent("", "1") is False
    assert answers_equivalent("1", None) is False  # type: ignore[arg-type]


# --- every gold answer of the shared benchmarks ---------------------------------------------------


def shared_gold_answers() -> list[str]:
    answers = []
    for name in ("math500.jsonl", "aime24.jsonl", "aime25.jsonl", "amc23.jsonl"):
        with (SHARED_DATA / name).open() as f:
            answers += [json.loads(line)["answer"] for line in f if line.strip()]
    return answers


@needs_shared
def test_every_benchmark_gold_answer_matches_itself_and_not_another() -> None:
    golds = shared_gold_answers()
    assert len(golds) == 500 + 30 + 30 + 40
    compared = 0
    for i, gold in enumerate(golds):
        assert grade(f"The final answer is $\\boxed{{{gold}}}$.", math_problem(gold)) == 1.0, gold
        if grading.as_integer(gold) is None:  # integers never reach sympy (integer fast path)
            # Past the exact-string fast path: math-verify itself must accept the gold answer.
            assert grading.verify_in_process(gold, gold, 5.0), gold
        other = golds[(i + 7) % len(golds)]
        if grading.canonical(other) != grading.canonical(gold):
            compared += 1
            assert grade(f"\\boxed{{{other}}}", math_problem(gold)) == 0.0, (gold, other)
    assert compared > 550
