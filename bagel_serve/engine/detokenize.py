"""Streamed tokens as text deltas, split into think text and answer text.

A request streams token ids; callers want text. `TextDeltas` decodes the whole generation so far (byte-level
BPE: a token may end inside a UTF-8 character, so text ending in U+FFFD is held back until the next token
completes it) and hands out only what is new, routed as the engine's outputs are: an image request's tokens
are its think plan; a text request in think mode writes `<think> ... </think>` and then its answer (the tag's
inside is the think text, what follows the answer); without think everything is the answer. A tag that is
still being written is held back too, so no delta ever has to be taken back.
"""

from __future__ import annotations

from typing import Callable

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def split_think(text: str, think: bool, outputs_image: bool) -> tuple[str, str]:
    """(think text, answer text) of a generation so far."""
    if outputs_image:
        return text, ""
    if not think:
        return "", text
    end = text.find(THINK_CLOSE)
    start = text.find(THINK_OPEN)
    inside_from = start + len(THINK_OPEN) if 0 <= start and (end < 0 or start < end) else 0
    if end < 0:
        return text[inside_from:].lstrip(), ""
    return text[inside_from:end].strip(), text[end + len(THINK_CLOSE):].lstrip()


def _held_back(text: str) -> int:
    """How many trailing characters may still change: an unfinished character, or a tag being written."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    for tag in (THINK_CLOSE, THINK_OPEN):
        for n in range(len(tag) - 1, 0, -1):
            if text.endswith(tag[:n]):
                return n
    return 0


class TextDeltas:
    """Feed token ids, get (think delta, answer delta) pairs; `decode` is the tokenizer's decode of a whole
    generation (`BagelTokenizer.decode_generation`)."""

    def __init__(self, decode: Callable[[list[int]], str], *, think: bool, outputs_image: bool) -> None:
        self._decode = decode
        self._think = think
        self._image = outputs_image
        self.ids: list[int] = []
        self._sent = ("", "")

    def push(self, token_id: int) -> tuple[str, str]:
        self.ids.append(int(token_id))
        text = self._decode(self.ids)
        keep = _held_back(text)
        return self._emit(text[: len(text) - keep] if keep else text)

    def finish(self) -> tuple[str, str]:
        """Whatever was held back, once the generation is complete."""
        return self._emit(self._decode(self.ids))

    @property
    def text(self) -> tuple[str, str]:
        """(think text, answer text) sent so far."""
        return self._sent

    def _emit(self, text: str) -> tuple[str, str]:
        think, answer = split_think(text, self._think, self._image)
        old_think, old_answer = self._sent
        # The visible text only grows; the strip()s above can only hold characters back, never retract them.
        d_think = think[len(old_think):] if think.startswith(old_think) else ""
        d_answer = answer[len(old_answer):] if answer.startswith(old_answer) else ""
        self._sent = (old_think + d_think, old_answer + d_answer)
        return d_think, d_answer
