"""Token ids to text as they arrive: incremental decoding with stop strings held back.

Decoding the whole sequence on every token costs O(n) per token; ``TextStream`` decodes only
a short window (the previous chunk as context, then the new tokens), so each token costs about
the same however long the text grows. A window that ends inside a multi-byte character
(``\\ufffd`` at its end) waits for the next token.

    stream = TextStream(tokenizer, stop=("\\n\\n",))
    delta = stream.push(generated_ids)               # text safe to show now ("" while held back)
    rest = stream.push(generated_ids, final=True)    # the rest, once generation has ended
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    """What ``TextStream`` needs of a tokenizer: a transformers tokenizer is one; a test fake
    is a class with one ``decode``."""

    def decode(self, token_ids: list[int], /, skip_special_tokens: bool = ...) -> str | list[str]:
        """The text of ``token_ids`` (transformers types it for a batch of sequences too)."""
        ...


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class TextStream:
    """The text of one growing sequence (see the module docstring)."""

    def __init__(self, tokenizer: Decoder, stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        # the tail that could still be the start of a stop string: "###" -> hold 2 characters
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._prefix_offset = 0  # decoding starts here, one chunk back, for context
        self._read_offset = 0  # tokens before this are already in self.text
        self.text = ""
        """All text so far, cut before a stop string once one is found."""
        self._emitted = 0  # characters of self.text already handed out
        self.stopped = False
        """A stop string was found: generation should end."""

    def push(self, token_ids: list[int], *, final: bool = False) -> str:
        """Take the sequence's generated ids so far; return the new text that is safe to show.

        ``final``: generation has ended, so a trailing partial character is shown as it is and
        nothing is held back any more."""
        if final:
            return self._push(token_ids, final=True) + self.finish()
        return self._push(token_ids, final=False)

    def _push(self, token_ids: list[int], *, final: bool) -> str:
        if self.stopped or len(token_ids) <= self._read_offset:
            return ""
        before = self._decode(token_ids[self._prefix_offset : self._read_offset])
        after = self._decode(token_ids[self._prefix_offset :])
        if (after.endswith(REPLACEMENT_CHAR) and not final) or len(after) <= len(before):
            return ""  # a character split across tokens, or tokens with no text (yet)
        new_text = after[len(before) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(token_ids)
        if self._stop:
            # a stop string may straddle the old text and the new: search from hold back
            start = max(0, len(self.text) - self._hold)
            tail, self.stopped = cut_at_stop(self.text[start:] + new_text, self._stop)
            self.text = self.text[:start] + tail
            if self.stopped:
                return self._take(len(self.text))
            return self._take(len(self.text) - self._hold)
        self.text += new_text
        return self._take(len(self.text))

    def _decode(self, token_ids: list[int]) -> str:
        text = self._tokenizer.decode(token_ids, skip_special_tokens=True)
        if not isinstance(text, str):  # a list comes back only for a batch of sequences
            raise TypeError(f"decode of one sequence gave {type(text).__name__}, not str")
        return text

    def finish(self) -> str:
        """The text held back until now (stop-string lookahead)."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        delta = self.text[self._emitted : upto]
        self._emitted = upto
        return delta
