"""Token-by-token text (`duetlm.streaming`, `protocol.partial_signal`): what a stream shows is never
taken back, and the deltas add up to exactly the non-streaming text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from duetlm import protocol
from duetlm.models import qwen3_tokenizer
from duetlm.streaming import TextDeltas, answer_text, answer_view


@pytest.fixture(scope="module")
def qwen_tok():
    return qwen3_tokenizer()


def stream(tok, ids, view, final, hidden=()):
    d = TextDeltas(tok, view, hidden)
    shown = [d.push(t) for t in ids]
    return shown, d.finish(final), d


@pytest.mark.parametrize(
    "text",
    [
        "Let's think: 12 + 7 = 19.\n\nSo the answer is 19.",
        "数学很有趣：二加二等于四。",  # several tokens per character and characters split across tokens
        "Emoji 🤖🧮 and accents: café, naïve, Ångström.  ",
        "  leading and trailing whitespace \n\n",
    ],
)
def test_deltas_add_up_to_the_decoded_text(qwen_tok, text):
    ids = qwen_tok.encode(text, add_special_tokens=False)
    final = answer_text(qwen_tok.decode(ids))
    shown, rest, d = stream(qwen_tok, ids, answer_view(), final)
    assert "".join(shown) + rest == final
    assert all("\ufffd" not in s for s in shown)  # never half a character
    assert sum(1 for s in shown if s) >= 2  # it does stream
    assert d.raw == qwen_tok.decode(ids)


def test_hidden_tokens_and_a_stop_string_are_never_shown(qwen_tok):
    eos = qwen_tok.convert_tokens_to_ids("<|im_end|>")
    body = qwen_tok.encode("The answer is 19. END and more", add_special_tokens=False)
    final = answer_text(qwen_tok.decode(body), ["END"])
    assert final == "The answer is 19."
    shown, rest, _ = stream(qwen_tok, [*body, eos], answer_view(["END"]), final, hidden={eos})
    assert "".join(shown) + rest == final
    assert not any("END" in s or "<|im_end|>" in s for s in shown)


def test_a_partial_stop_string_is_held_back():
    view = answer_view(["STOP"])
    assert view("Nineteen ST") == "Nineteen"  # could become STOP
    assert view("Nineteen STA") == "Nineteen STA"  # cannot any more
    assert view("Nineteen STOP!") == "Nineteen"


def test_partial_signal_on_the_qwen_stream(qwen_tok):
    raw = "<think>\nAdd the units: 2 + 7 = 9, then the tens.\n</think>\n\nThe answer"
    ids = qwen_tok.encode(raw, add_special_tokens=False)
    close = qwen_tok.convert_tokens_to_ids(protocol.THINK_CLOSE)
    stop_at = ids.index(close)
    final = protocol.extract_signal(raw).text
    shown, rest, _ = stream(qwen_tok, ids[: stop_at + 1], protocol.partial_signal, final, hidden={close})
    assert "".join(shown) + rest == final == "Add the units: 2 + 7 = 9, then the tens."
    assert not any("<think>" in s for s in shown)


BODY = st.sampled_from(["</think>", "<th", "</th", "\n", " ", "  ", "z", "ab", "x=1", "ST", "OP", "<", ">"])


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["", "<think>", " <think>\n", "\n"]), st.lists(BODY, max_size=12))
def test_partial_views_only_grow_into_the_final_text(opening, body):
    """For every prefix of a raw generation, what the views show is a prefix of the final text.

    M opens its thinking block first or not at all (the template may open it); a `<think>` written
    after other text is outside what a stream can honour (see `protocol.partial_signal`)."""
    raw = opening + "".join(body)
    signal, answer = protocol.extract_signal(raw).text, answer_text(raw, ["STOP"])
    view = answer_view(["STOP"])
    for k in range(len(raw) + 1):
        assert signal.startswith(protocol.partial_signal(raw[:k])), raw[:k]
        assert answer.startswith(view(raw[:k])), raw[:k]


def test_answer_text_cuts_at_the_first_stop_string():
    assert answer_text(" 19 END more END", ["END"]) == "19"
    assert answer_text(" 19 \n", ["END"]) == "19"
    assert answer_text("19.\nQ: next", ["\nQ:", "."]) == "19"
