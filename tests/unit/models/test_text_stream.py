"""TextStream: incremental text with stop strings held back, on a toy tokenizer."""

from __future__ import annotations

from models.engines.detokenize import TextStream


class ByteTokenizer:
    """One token per UTF-8 byte, like a byte-level BPE at its smallest."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def ids(text: str) -> list[int]:
    return list(text.encode())


def feed(stream: TextStream, text: str) -> list[str]:
    """Push the text one token at a time, then end; the deltas handed out."""
    tokens = ids(text)
    deltas = [stream.push(tokens[: n + 1]) for n in range(len(tokens))]
    deltas.append(stream.push(tokens, final=True))
    return deltas


def test_deltas_join_to_the_whole_text():
    stream = TextStream(ByteTokenizer())
    assert "".join(feed(stream, "hello world")) == "hello world"


def test_a_multibyte_character_waits_until_it_is_whole():
    stream = TextStream(ByteTokenizer())
    deltas = feed(stream, "né")  # é is two bytes: nothing shows after the first
    assert deltas[:3] == ["n", "", "é"]


def test_a_stop_string_spanning_tokens_cuts_the_text_before_it():
    stream = TextStream(ByteTokenizer(), stop=("END",))
    deltas = feed(stream, "abcENDxyz")
    assert "".join(deltas) == "abc"
    assert stream.stopped


def test_text_that_could_start_a_stop_string_is_held_back_then_released():
    stream = TextStream(ByteTokenizer(), stop=("END",))
    deltas = feed(stream, "abEN")
    # "EN" might become "END": held until generation ends, then shown
    assert deltas[:4] == ["", "", "a", "b"]
    assert deltas[-1] == "EN"
    assert not stream.stopped


def test_the_earliest_of_several_stop_strings_wins():
    stream = TextStream(ByteTokenizer(), stop=("!", "."))
    assert "".join(feed(stream, "hi. there!")) == "hi"
