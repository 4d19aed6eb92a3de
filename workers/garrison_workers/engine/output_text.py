"""A sequence's generated text: incremental decoding, stop strings, and what has been streamed so far.

It is part of the sequence's state (`Sequence.text`), so it travels with the sequence wherever it decodes: a
disaggregated sequence's first token is decoded on the prefill side and the rest on a decode side, and a stop
string that spans both, or a character whose bytes the handoff splits, must read as in one engine.
"""

from __future__ import annotations

from dataclasses import dataclass

from garrison_workers.tokenizer import IncrementalDetokenizer


@dataclass(slots=True)
class OutputText:
    detokenizer: IncrementalDetokenizer
    stops: tuple[str, ...] = ()
    text: str = ""  # everything decoded so far, stop strings included
    emitted: int = 0  # characters already streamed

    def push(self, token_id: int, last: bool) -> tuple[str, bool]:
        """The text `token_id` adds to the stream, minus any stop string and any held-back prefix of one; and whether
        a stop string ended it. `last`: nothing follows (release a held-back partial character)."""
        self.text += self.detokenizer.push(token_id)
        if last:
            self.text += self.detokenizer.flush()
        cut, stopped = len(self.text), False
        for stop in self.stops:
            found = self.text.find(stop, max(0, self.emitted - len(stop) + 1))
            if found != -1 and found < cut:
                cut, stopped = found, True
        if not (last or stopped):
            cut -= _held_back(self.text, self.stops)
        new_text = self.text[self.emitted:max(cut, self.emitted)]
        self.emitted = max(cut, self.emitted)
        return new_text, stopped


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest
