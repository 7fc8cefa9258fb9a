import pytest

from duetlm import protocol
from duetlm.protocol import LARGE_INSTRUCTION, Signal, extract_signal


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>\nadd 2 and 3\n</think>\n\nThe answer is 5.", Signal("add 2 and 3", True)),  # both tags
        ("add 2 and 3\n</think>\n\n5", Signal("add 2 and 3", True)),  # only the closing tag
        ("add 2 and 3 and then", Signal("add 2 and 3 and then", False)),  # neither: ran out of tokens
        ("<think>\nadd 2 and", Signal("add 2 and", False)),  # a leading open tag is stripped
        ("<think>\n\n</think>\n\nfive", Signal("", True)),  # empty thinking block
        ("<think>a</think> b </think>", Signal("a", True)),  # repeated closing tag: the first counts
        ("<think>x <think> y</think>", Signal("x <think> y", True)),  # nested opening tag kept as text
        ("<think>π ≈ 3.14159 — ünïcödé ✓</think>", Signal("π ≈ 3.14159 — ünïcödé ✓", True)),
        (
            f"<think>the prompt said:{LARGE_INSTRUCTION}</think>",
            Signal(f"the prompt said:{LARGE_INSTRUCTION}", True),
        ),
        ("", Signal("", False)),
    ],
)
def test_extract_signal(text, expected):
    assert extract_signal(text) == expected


def test_small_prompts_differ_only_by_signal(tiny_tokenizer):
    q = "What is 12 + 7?"
    with_z = protocol.small_prompt(tiny_tokenizer, q, "12 + 7 = 19")
    without = protocol.small_prompt(tiny_tokenizer, q, None)
    assert with_z.replace("12 + 7 = 19\n", "\n", 1) == without
    assert without == protocol.small_prompt(tiny_tokenizer, q, "")
    # Without a signal, m's prompt is exactly the template's own thinking-off prompt (Qwen3 convention).
    off = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert without == off


def test_large_prompt_has_instruction_and_thinking_on(tiny_tokenizer):
    p = protocol.large_prompt(tiny_tokenizer, "What is 1+1?")
    assert p.endswith("What is 1+1?" + LARGE_INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n")
    assert protocol.supports_thinking(tiny_tokenizer)
    # The stop marker is one token of the tiny vocabulary.
    (stop_id,) = protocol.large_stop_token_ids(tiny_tokenizer)
    assert tiny_tokenizer.convert_ids_to_tokens(stop_id) == "</think>"


def test_round_trip_tiny_tokenizer(tiny_tokenizer):
    p = protocol.small_prompt(tiny_tokenizer, "What is 12 + 7? ünï", "first 2 + 7 = 9")
    ids = tiny_tokenizer.encode(p, add_special_tokens=False)
    assert tiny_tokenizer.decode(ids) == p
    for tag in ("<think>", "</think>", "<|im_end|>", "<|im_start|>"):
        assert tiny_tokenizer.convert_tokens_to_ids(tag) in ids


@pytest.fixture(scope="module")
def qwen_tokenizer():
    from duetlm.models import qwen3_tokenizer

    return qwen3_tokenizer()


def test_real_qwen_tokenizer_ids(qwen_tokenizer):
    tok = qwen_tokenizer
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 151643
    assert tok.convert_tokens_to_ids("<|im_start|>") == 151644
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tok.convert_tokens_to_ids("<think>") == 151667
    assert tok.convert_tokens_to_ids("</think>") == 151668
    assert tok.encode("user", add_special_tokens=False) == [872]
    assert tok.encode("assistant", add_special_tokens=False) == [77091]
    assert protocol.supports_thinking(tok)
    assert protocol.large_stop_token_ids(tok) == (151668,)


def test_round_trip_real_qwen_tokenizer(qwen_tokenizer):
    tok = qwen_tokenizer
    p = protocol.small_prompt(tok, "Find $x$ if $x^2 = 4$.", "x = ±2, positive root 2")
    ids = tok.encode(p, add_special_tokens=False)
    assert tok.decode(ids) == p
    assert ids[:1] == [151644]
    assert 151667 in ids and 151668 in ids
    # M's output parsed from real token ids.
    out = tok.decode(tok.encode("<think>\nsquare root\n</think>\n\n\\boxed{2}", add_special_tokens=False))
    assert extract_signal(out) == Signal("square root", True)


def test_fallback_for_template_without_thinking():
    """SmolLM2-style ChatML: M's turn is pre-filled with the opening tag; m's carries the block as text."""
    from duetlm.models import train_tokenizer

    tok = train_tokenizer(["hello world"], vocab_size=300)
    tok.chat_template = (
        "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}{% endif %}"
    )
    assert not protocol.supports_thinking(tok)
    assert protocol.large_prompt(tok, "q").endswith("<|im_start|>assistant\n<think>\n")
    assert protocol.small_prompt(tok, "q", "z").endswith("<|im_start|>assistant\n<think>\nz\n</think>\n\n")


def test_split_response():
    assert protocol.split_response("<think>a</think>\n\n\\boxed{3}") == ("a", "\\boxed{3}")
    assert protocol.split_response("<think>never closed") == ("never closed", "")


@pytest.mark.parametrize(
    ("text", "graded"),
    [
        ("<think>a</think>\n\n\\boxed{3}", "\\boxed{3}"),  # closed: the text after </think>
        ("<think>so \\boxed{3}</think>", ""),  # closed with nothing after: nothing to grade
        ("<think>never closed \\boxed{3} ", "<think>never closed \\boxed{3}"),  # unclosed: everything
        ("plain \\boxed{4}\n", "plain \\boxed{4}"),  # no tags at all (a model without a template)
        ("", ""),
    ],
)
def test_own_answer_is_what_m_alone_is_graded_on(text, graded):
    assert protocol.own_answer(text) == graded


def test_answering_at_once_by_prefix_or_by_cap(qwen_tokenizer):
    from duetlm.lab.recipes import build_tokenizer
    from duetlm.lab.task import MIX_TASK, TaskSpec

    # Qwen's BPE spells the box's opening: m's prompt ends with it, and the answer begins with it.
    assert protocol.at_once_by_prefix(qwen_tokenizer)
    prompt = protocol.small_prompt(qwen_tokenizer, "What is 2 + 2?", at_once=True)
    assert prompt == protocol.small_prompt(qwen_tokenizer, "What is 2 + 2?") + protocol.ANSWER_AT_ONCE
    assert protocol.answer_text("4}", prefixed=True) == "\\boxed{4}"
    # The lab's word vocabulary holds `\boxed{v}` only as whole words: no prefix, room for one word.
    lab = build_tokenizer(TaskSpec(**MIX_TASK))
    assert not protocol.at_once_by_prefix(lab) and protocol.at_once_cap(lab) == 1
    assert protocol.small_prompt(lab, "3 S1 +1", at_once=True) == protocol.small_prompt(lab, "3 S1 +1")
