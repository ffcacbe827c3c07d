"""Stop strings: a generation ends where one of them first completes in its text, matched on the decoded
text (so also across token boundaries, and inside a token), the stop string itself left out of the text.

    matcher = StopMatcher(["\\n\\n", "THE END"])
    for chunk in chunks:                # the decoded text, piece by piece, as it streams
        show(matcher.feed(chunk))       # what is safe to show now
        if matcher.stopped:             # matcher.matched: which stop string
            break
    show(matcher.flush())               # at the end: the text held back (nothing after a stop)

While the text so far ends with what may be the start of a stop string ("THE" above), that end is held
back, so a stop string is never shown in part. The text shown is exactly the text before the stop string
that completes first (at the earliest end: a generation cannot wait to see whether a longer one that began
earlier completes too; of two ending together, the longer), however the text is cut into chunks. Plain text
in, plain text out: no tokenizer, no model.
"""

from __future__ import annotations

from collections.abc import Iterable

from minillm.errors import MiniLLMError


def check_stop_strings(stops: Iterable[str]) -> tuple[str, ...]:
    """The stop strings, each once in their order; an empty or non-text one is refused."""
    stops = tuple(stops)
    for stop in stops:
        if not isinstance(stop, str) or not stop:
            raise MiniLLMError(f"a stop string must be some text, got {stop!r}")
    return tuple(dict.fromkeys(stops))


class StopMatcher:
    """Finds the first stop string in a text that arrives in chunks; see the module docstring."""

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = check_stop_strings(stops)
        self.matched: str | None = None  # the stop string found, once found
        self._held = ""  # the end of the text so far that may begin a stop string

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, chunk: str) -> str:
        """The next chunk of text in; out: the text that can be shown now (after a stop: nothing more)."""
        if self.stopped:
            return ""
        text = self._held + chunk
        found = [(text.find(stop), stop) for stop in self.stops if stop in text]
        if found:  # the one that completes first; of those ending together, the longer
            start, self.matched = min(found, key=lambda hit: (hit[0] + len(hit[1]), hit[0]))
            self._held = ""
            return text[:start]
        keep = self._start_of_a_stop(text)
        self._held = text[keep:]
        return text[:keep]

    def flush(self) -> str:
        """The text held back, at the end of the text (after a stop: "")."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _start_of_a_stop(self, text: str) -> int:
        """The first index from which the rest of `text` is the start of some stop string (len(text): none).
        Only the last (longest stop - 1) characters can be: a whole stop string would have been found."""
        longest = max((len(stop) for stop in self.stops), default=0)
        for start in range(max(0, len(text) - longest + 1), len(text)):
            if any(stop.startswith(text[start:]) for stop in self.stops):
                return start
        return len(text)
