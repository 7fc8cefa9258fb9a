"""Token-by-token text for streaming responses: token ids in, text deltas out.

A server that streams must never show a client text it would later take back. `TextDeltas` turns the
tokens of one generation into deltas of a *view* of its text (the signal z for M, the answer for m), in
three steps:

1. incremental detokenisation with a read offset, as vLLM and TGI do: decode the last few tokens twice
   (with and without the new one) and keep the difference, holding a token back while its bytes do
   not yet make whole characters (the replacement character U+FFFD);
2. the view of the raw text so far, which holds back what may still change (trailing whitespace, a
   prefix of a stop string);
3. the delta: what the view adds to what was already shown.

`finish(final)` reconciles with the text the non-streaming response would carry, so the deltas of a
stream always add up to exactly that text.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any

from duetlm.protocol import pending_prefix_len

log = logging.getLogger(__name__)


class TextDeltas:
    """The text deltas of one generation.

    `view(raw_text) -> str`: what may be shown of the raw text so far (see `answer_view`,
    `protocol.partial_signal`). `hidden_ids`: token ids never shown (end-of-sequence, stop tokens: the
    generation ends on them anyway).
    """

    def __init__(self, tokenizer: Any, view: Callable[[str], str], hidden_ids: Collection[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.view = view
        self.hidden_ids = frozenset(hidden_ids)
        self.ids: list[int] = []
        self.raw = ""
        self.shown = ""
        self._prefix = 0  # ids[_prefix:_read] were decoded last time, as context for the next token
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the new text a client may see ('' if none yet)."""
        if token_id in self.hidden_ids:
            return ""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if after.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its other bytes
            return ""
        self.raw += after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        return self._show(self.view(self.raw))

    def push_text(self, text: str) -> str:
        """Add a piece of raw text (from an engine that streams text, not ids); return what a client
        may see of it now."""
        self.raw += text
        return self._show(self.view(self.raw))

    def finish(self, final: str) -> str:
        """The rest of `final`, the complete text of the non-streaming response."""
        if not final.startswith(self.shown):
            # Cannot happen while the views hold back enough; a client cannot un-see text, so say so.
            log.warning("streamed text %r is not a prefix of the final text %r", self.shown, final)
            return ""
        delta = final[len(self.shown) :]
        self.shown = final
        return delta

    def _show(self, visible: str) -> str:
        if len(visible) <= len(self.shown) or not visible.startswith(self.shown):
            return ""
        delta = visible[len(self.shown) :]
        self.shown = visible
        return delta


def answer_text(text: str, stop: Collection[str] = ()) -> str:
    """An answer as a client sees it: cut before the first stop string (OpenAI's rule; the engines
    keep the stop string, and the rest of the token that completed it, in `text`), stripped."""
    cut = min((at for s in stop if s and (at := text.find(s)) != -1), default=len(text))
    return text[:cut].strip()


def answer_view(stop: Collection[str] = ()) -> Callable[[str], str]:
    """The view for an answer still being written: `answer_text` of what is certain so far."""
    stops = [s for s in stop if s]

    def view(raw: str) -> str:
        text = raw.lstrip()
        cut = min((at for s in stops if (at := text.find(s)) != -1), default=len(text))
        text = text[:cut]
        hold = max((pending_prefix_len(text, s) for s in stops), default=0)
        return text[: len(text) - hold].rstrip()

    return view
