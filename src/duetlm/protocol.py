"""The M -> z -> m protocol: the one place that builds prompts and parses signals (algorithm.md §1).

- M's prompt: M's chat template over the question plus `LARGE_INSTRUCTION`, thinking enabled. M stops
  at the end-of-thinking marker (`</think>`), so it never writes an answer we would throw away
  (**Decision** vs the reference, which lets M answer and discards it).
- The signal z: `extract_signal` on M's output (three cases; a missing opening tag is stripped and
  the signal marked incomplete, a **Decision** vs the reference, which keeps the tag).
- m's prompt: m's chat template, the bare question as the user turn, and an assistant turn that opens
  with `<think>\\n{z}\\n</think>\\n\\n`, which m continues. The prompt without a signal is the same
  builder with z = "" (exactly Qwen3's `enable_thinking=False` prompt), so the two prompts differ only
  by the signal (**Decision**: the reference builds them differently).

Templates without a thinking block (e.g. SmolLM2's ChatML). Fallback, documented: the same text-level
protocol is applied on top of whatever template the tokenizer has. M's assistant turn is pre-filled with
`<think>\\n` (so it starts thinking) and M stops at the `</think>` string; m's assistant turn is
pre-filled with the thinking block as plain text. For Qwen3-style templates (the tags are tokens of the
vocabulary, the template knows `enable_thinking`) nothing is pre-filled for M: the model opens the
block itself, exactly as at deployment.

Conversations (several turns, system messages; what `duetlm serve` takes). A pipeline question is a
string; a conversation travels as one too (`conversation_question`: the messages encoded, one user
message alone stays its bare text, so single-turn prompts are unchanged). Both models see it through
their chat templates: earlier user and assistant turns as chat history (an assistant turn holds the
answer the client shows, never an earlier signal: z is not repeated to m, nor to M), M's instruction
appended to the last user turn only, and m's assistant turn opening with z for the last one. System
messages reach both models, or m only when marked so (`SMALL_ONLY`, `duetlm serve --system-messages
small`). Training and `duetlm eval` take single questions only.

M behind an OpenAI-compatible chat endpoint (`engines/remote.py`). Such a server applies M's own chat
template, so M's "prompt" is the chat messages themselves: an engine that carries `CHAT_ENDPOINT` as
its tokenizer gets from `large_prompt` the messages encoded as text (`encode_messages`), and reads them
back with `decode_messages`. M's user turn is written in one place (`large_messages`) for a local and a
remote M alike, and duetlm's own `--role large` server templates a request with `large_chat_prompt`, so
a remote M behind duetlm sees byte for byte the prompt a local M would.

m behind a chat endpoint (`duetlm serve --small-url`). m's prompt continues an assistant turn (the
thinking block holding z), which the chat API does only through vLLM's extension
`continue_final_message` (SGLang has it too): `small_prompt(CHAT_ENDPOINT, ...)` encodes m's turns plus
a final assistant message holding the thinking block, and `RemoteEngine` sends a conversation that ends
with an assistant message with `continue_final_message: true, add_generation_prompt: false`. duetlm's
own `--role small` server builds the prompt of such a request with `small_chat_prompt` (the template
over the earlier turns, then the final message's text as it is), which is `small_prompt` byte for byte.
The truncation baseline's answer prompt still needs M's tokenizer locally.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from duetlm.boxes import last_boxed
from duetlm.errors import DuetError

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# m's answer forced to start with the box: it commits to a value before writing any reasoning.
ANSWER_AT_ONCE = "\\boxed{"
LARGE_INSTRUCTION = " Let's think step by step and output the final answer within \\boxed{}."
CONCISE_INSTRUCTION = (
    " Note that you should keep the reasoning concise: include only essential reasoning steps and "
    "avoid repetition or unnecessary explanations."
)


@dataclass(frozen=True)
class Signal:
    """The reasoning signal z that M hands to m.

    `text`: the thinking, stripped. `complete`: True when M closed its thinking block (it did not run out
    of tokens).
    """

    text: str
    complete: bool


def extract_signal(text: str) -> Signal:
    """z from M's raw output (algorithm.md §1).

    - both tags: the text between the first `<think>` and the first `</think>` after it;
    - only `</think>`: everything before it (the template opened the block);
    - neither: the whole response (M ran out of tokens), `complete=False`; a leading `<think>` with no
      closing tag is removed.
    Text after `</think>` (an answer M should not have written) is ignored.
    """
    close = text.find(THINK_CLOSE)
    if close == -1:
        body = text.lstrip()
        if body.startswith(THINK_OPEN):
            body = body[len(THINK_OPEN) :]
        return Signal(body.strip(), complete=False)
    head = text[:close]
    open_at = head.find(THINK_OPEN)
    if open_at != -1:
        head = head[open_at + len(THINK_OPEN) :]
    return Signal(head.strip(), complete=True)


def partial_signal(text: str) -> str:
    """The part of z that is certain while M is still writing `text` (for streaming the signal).

    Every later `extract_signal(text + more).text` starts with it: trailing whitespace and a trailing
    fragment of `<think>` / `</think>` are held back, since more text may keep or remove them. One case
    is beyond a stream: M writing text and only then `<think>` … `</think>` (the final signal drops the
    text before `<think>`, which was already shown); M opens its block first or the template opens it.
    """
    if THINK_CLOSE in text:
        return extract_signal(text).text
    body = text.lstrip()
    if THINK_OPEN.startswith(body):  # possibly the opening tag, not yet complete
        return ""
    if body.startswith(THINK_OPEN):
        body = body[len(THINK_OPEN) :].lstrip()
    return body[: len(body) - pending_prefix_len(body, THINK_CLOSE)].rstrip()


def pending_prefix_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (text that may yet
    turn out to be `tag`, so a stream holds it back)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def supports_thinking(tokenizer: Any) -> bool:
    """True for Qwen3-style tokenizers: the thinking tags are single tokens and the template knows
    `enable_thinking` (so M opens the thinking block by itself)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if "enable_thinking" not in template:
        return False
    vocab = tokenizer.get_vocab()
    return THINK_OPEN in vocab and THINK_CLOSE in vocab


class ChatEndpoint:
    """Stands in for M's tokenizer when M sits behind a chat-completions endpoint: the server holds
    the vocabulary and the template, so prompts are the messages (see the module docstring)."""

    def get_vocab(self) -> dict[str, int]:
        return {}  # the vocabulary lives on the server: no stop token ids, only the stop string

    def __repr__(self) -> str:
        return "CHAT_ENDPOINT"


CHAT_ENDPOINT = ChatEndpoint()
_MESSAGES_TAG = "\x00duetlm-chat-messages\x00"


def encode_messages(messages: list[dict[str, str]]) -> str:
    """Chat messages as one prompt string (for engines that take messages, e.g. a chat endpoint)."""
    return _MESSAGES_TAG + json.dumps(messages, ensure_ascii=False)


def decode_messages(prompt: str) -> list[dict[str, str]]:
    """The messages `encode_messages` wrote; a `DuetError` for any other prompt."""
    if not prompt.startswith(_MESSAGES_TAG):
        raise DuetError(
            "this prompt is text for a local tokenizer, not chat messages: an engine behind a chat "
            "endpoint takes only prompts built by protocol.large_prompt(CHAT_ENDPOINT, ...) "
            f"(got {prompt[:60]!r})"
        )
    return json.loads(prompt[len(_MESSAGES_TAG) :])


def _needs_local(tokenizer: Any, what: str) -> None:
    if isinstance(tokenizer, ChatEndpoint):
        raise DuetError(
            f"{what} continues an assistant turn, which a chat endpoint cannot do: "
            "run this model locally (hf or vllm engine)"
        )


def _template(tokenizer: Any, messages: list[dict[str, str]], enable_thinking: bool) -> str:
    """The chat template over `messages`, ending with the opening of the assistant turn."""
    if not getattr(tokenizer, "chat_template", None):
        # A base model without a template: a minimal plain-text format (one question only).
        if len(messages) != 1 or messages[0]["role"] != "user":
            raise DuetError("this model has no chat template: only a single user message can be formatted")
        return f"Question: {messages[0]['content']}\nAnswer: "
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
    )


def _chat(tokenizer: Any, user: str, enable_thinking: bool) -> str:
    """The chat template over one user turn, ending with the opening of the assistant turn."""
    return _template(tokenizer, [{"role": "user", "content": user}], enable_thinking)


def thinking_block(signal: str) -> str:
    """The assistant-turn prefix that carries z (empty z gives Qwen3's empty thinking block)."""
    return f"{THINK_OPEN}\n{signal}\n{THINK_CLOSE}\n\n" if signal else f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"


# A system message with this key set reaches m only (`conversation_question`, `--system-messages small`).
SMALL_ONLY = "duetlm_small_only"


def conversation_question(messages: list[dict[str, Any]]) -> str:
    """A conversation as a pipeline question: the bare text of a lone user message, else the messages
    encoded (`encode_messages`); it must end with a user turn."""
    if not messages or messages[-1].get("role") != "user":
        raise DuetError("a conversation must end with a user message")
    if len(messages) == 1:
        return messages[0]["content"]
    return encode_messages(messages)


def conversation(question: str) -> list[dict[str, Any]]:
    """The messages of a pipeline question: one user turn, or the encoded conversation."""
    return (
        decode_messages(question)
        if question.startswith(_MESSAGES_TAG)
        else [{"role": "user", "content": question}]
    )


def _for(messages: list[dict[str, Any]], model: str) -> list[dict[str, str]]:
    """The turns `model` ("large" | "small") sees: `SMALL_ONLY` system messages dropped for M, the
    marker removed for m."""
    return [
        {"role": m["role"], "content": m["content"]}
        for m in messages
        if model == "small" or not m.get(SMALL_ONLY)
    ]


def large_messages(question: str, instruction: str = LARGE_INSTRUCTION) -> list[dict[str, str]]:
    """M's conversation: the question plus the instruction as the (last) user turn (algorithm.md §1),
    after a conversation's earlier turns."""
    turns = _for(conversation(question), "large")
    last = turns[-1]
    return [*turns[:-1], {"role": "user", "content": last["content"] + instruction}]


def large_chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """M's prompt for a conversation, thinking on (`large_prompt` is this over `large_messages`).

    `duetlm serve --role large` templates each request with it (`duetlm.serve.service`). With
    `CHAT_ENDPOINT` as the tokenizer the prompt is the encoded messages.
    """
    if isinstance(tokenizer, ChatEndpoint):
        return encode_messages(messages)
    prompt = _template(tokenizer, messages, enable_thinking=True)
    if not supports_thinking(tokenizer):
        prompt += THINK_OPEN + "\n"  # the fallback: pre-fill the opening tag
    return prompt


def large_prompt(tokenizer: Any, question: str, instruction: str = LARGE_INSTRUCTION) -> str:
    """M's prompt: the question plus the instruction, thinking on (algorithm.md §1)."""
    return large_chat_prompt(tokenizer, large_messages(question, instruction))


def small_prompt(tokenizer: Any, question: str, signal: str | None = None, at_once: bool = False) -> str:
    """m's prompt, with z (`signal`) or without it (`None` or ""); one builder for both. `at_once`
    ends it with `ANSWER_AT_ONCE` where the vocabulary spells it (`at_once_by_prefix`), so m writes
    its final answer with no reasoning of its own (the "m alone, answering at once" baseline); the
    answer then begins with that prefix (`answer_text`). With `CHAT_ENDPOINT` (m behind a server):
    the turns and the opening of m's assistant turn as encoded messages (the module docstring)."""
    turns = _for(conversation(question), "small")
    opening = thinking_block(signal or "")
    if at_once and at_once_by_prefix(tokenizer):
        opening += ANSWER_AT_ONCE
    if isinstance(tokenizer, ChatEndpoint):  # the assistant turn to continue travels as a message
        return encode_messages([*turns, {"role": "assistant", "content": opening}])
    # enable_thinking=True keeps the template from inserting its own empty block; we insert ours.
    return _template(tokenizer, turns, enable_thinking=True) + opening


def small_chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """m's prompt for a chat request to a `--role small` server: a conversation ending with an
    assistant message continues that message (vLLM's `continue_final_message`: the template over the
    earlier turns, then its text as it is, so `small_prompt`'s encoded messages give `small_prompt`'s
    text); one ending with the user's is m alone (`small_prompt` with no signal)."""
    if messages and messages[-1]["role"] == "assistant":
        return _template(tokenizer, messages[:-1], enable_thinking=True) + messages[-1]["content"]
    return _template(tokenizer, messages, enable_thinking=True) + thinking_block("")


def at_once_by_prefix(tokenizer: Any) -> bool:
    """Whether m's answer can be begun with `ANSWER_AT_ONCE`: the vocabulary spells it with no unknown
    token (BPE vocabularies do). The lab's word-level vocabulary holds `\\boxed{v}` only as whole
    words; there m answers at once by having room for one boxed value only (`at_once_cap`). A server's
    vocabulary (`CHAT_ENDPOINT`) is taken to spell it: the models served are BPE."""
    if isinstance(tokenizer, ChatEndpoint):
        return True
    ids = tokenizer(ANSWER_AT_ONCE, add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    return bool(ids) and unk not in ids and tokenizer.decode(ids) == ANSWER_AT_ONCE


def at_once_cap(tokenizer: Any) -> int:
    """m's answer cap when it must answer at once without the prefix: the tokens of one boxed digit,
    so the box has to come first or there is no answer."""
    return len(tokenizer("\\boxed{0}", add_special_tokens=False)["input_ids"])


def answer_text(generated: str, prefixed: bool = False) -> str:
    """m's answer as graded: what it generated, stripped, behind `ANSWER_AT_ONCE` when the prompt
    ended with it (so the box is whole)."""
    return (ANSWER_AT_ONCE + generated).strip() if prefixed else generated.strip()


def large_answer_prompt(
    tokenizer: Any, question: str, thinking: str, instruction: str = LARGE_INSTRUCTION
) -> str:
    """M's prompt after its (possibly truncated) thinking, with the block closed, so that M itself
    writes the answer: budget forcing (the truncation baseline, algorithm.md §5)."""
    _needs_local(tokenizer, "the truncation baseline's answer prompt")
    prompt = _chat(tokenizer, question + instruction, enable_thinking=True)
    return prompt + f"{THINK_OPEN}\n{thinking.strip()}\n{THINK_CLOSE}\n\n"


def large_stop() -> tuple[str, ...]:
    """Stop strings for M's rollouts: the end-of-thinking marker (algorithm.md §1, Decision)."""
    return (THINK_CLOSE,)


def large_stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """`</think>` as a token id where the vocabulary has it (a cheaper, exact stop)."""
    vocab = tokenizer.get_vocab()
    return (vocab[THINK_CLOSE],) if THINK_CLOSE in vocab else ()


def split_response(text: str) -> tuple[str, str]:
    """(thinking, answer) of a full response from M alone; the answer is "" when the block never
    closed (see `own_answer` for what is graded)."""
    close = text.find(THINK_CLOSE)
    if close == -1:
        return extract_signal(text).text, ""
    return extract_signal(text).text, text[close + len(THINK_CLOSE) :].strip()


def own_answer(text: str) -> str:
    """What is graded when M answers itself (the `original` baseline and the M-alone training modes):
    the text after `</think>`, or the whole response, stripped, when M never closed its thinking block
    (the answer may be in it). Training and evaluation grade M alike through this one rule."""
    _, answer = split_response(text)
    return answer if THINK_CLOSE in text else text.strip()


def boxed_answer(text: str) -> str | None:
    """The answer m committed to: its last `\\boxed{}`'s content, whitespace removed (so `\\boxed{ 7 }`
    and `\\boxed{7}` agree); None when there is none. The cascade's confidence reads it (`duetlm.cascade`):
    an answer without one is unsure."""
    boxed = last_boxed(text)
    return None if boxed is None else "".join(boxed.split())
