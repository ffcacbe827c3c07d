"""The text of one generated choice as its tokens arrive: decoded without broken characters, cut at the first
stop string (matched on the decoded text, also across token boundaries, and not included), and handed out
in pieces that never show what may turn out to be the start of a stop string.

    text = ChoiceText(tokenizer, stops=["\\n\\n"])
    for token in tokens: text.add(token)          # then text.stopped says whether a stop string ended it
    piece = text.take()                           # the text (and tokens) safe to send now
    text.finish(); piece = text.take()            # at the end: the rest

The stop strings are matched by minillm.stop_strings' StopMatcher, as `minillm generate --stop` matches them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from minillm.batch_engine import Token
from minillm.stop_strings import StopMatcher
from minillm.tokenizers import Tokenizer


@dataclass
class Piece:
    """Text ready to send, with the tokens whose text it completes and their offsets in the choice's text."""

    text: str = ""
    tokens: list[Token] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)


class ChoiceText:
    """One choice's text: `prefix` (an echoed prompt, shown first) and then the generated tokens' text."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str], prefix: str = "") -> None:
        self.tokenizer = tokenizer
        self._matcher = StopMatcher(stop for stop in stops if stop)
        self._safe = 0  # characters of the generated text that cannot be the start of a stop string
        self._decoder = tokenizer.decode_stream(skip_special_tokens=True)
        self.text, self.start = prefix, len(prefix)  # generated text starts at self.start
        self._ids: list[int] = []
        self._pending: list[tuple[Token, int, int]] = []  # (token, offset, length of its text), not taken yet
        self._sent = 0  # characters of self.text taken so far
        self.n_tokens = 0  # tokens whose text is in the choice (up to a stop string)
        self.stopped = False  # a stop string ended the text
        self.finished = False

    def add(self, token: Token) -> None:
        """Append a token's text; cut the text at a stop string that it completes (stop strings are looked
        for in the generated text only, not in an echoed prompt)."""
        if self.finished:
            return
        chunk = self._decoder.step(token.id) or ""  # "" while a character is incomplete
        offset = len(self.text)
        self.text += chunk
        self._ids.append(token.id)
        self._pending.append((token, offset, len(chunk)))
        self.n_tokens += 1
        self._safe += len(self._matcher.feed(chunk))
        if self._matcher.stopped:
            cut = self.start + self._safe
            self.text, self.stopped, self.finished = self.text[:cut], True, True
            # The tokens that begin at the stop string or after it are not part of the choice.
            self.n_tokens -= sum(offset >= cut for _, offset, _ in self._pending)
            self._pending = [entry for entry in self._pending if entry[1] < cut]

    def finish(self) -> None:
        """The generation ended: a character still incomplete at the end shows (as U+FFFD), so the text is
        the tokenizer's decode of the tokens; everything is released."""
        if not self.finished:
            full, done = self.tokenizer.decode(self._ids), self.text[self.start:]
            if len(full) > len(done) and full.startswith(done):
                self.text += full[len(done):]
        self.finished = True

    def take(self) -> Piece:
        """The text and tokens that are safe to send now (all of them once finished)."""
        end = len(self.text) if self.finished else self.start + self._safe
        end = max(end, self._sent)
        ready = [entry for entry in self._pending if self.finished or entry[1] + entry[2] <= end]
        self._pending = self._pending[len(ready):]
        piece = Piece(self.text[self._sent:end], [t for t, _, _ in ready], [o for _, o, _ in ready])
        self._sent = end
        return piece


@lru_cache(maxsize=8)
def _spellings(tokenizer: Tokenizer) -> tuple[str, ...]:
    return tuple(tokenizer.decode([i], skip_special_tokens=False) for i in range(tokenizer.vocab_size))


def token_string(tokenizer: Tokenizer, token_id: int) -> str:
    """How a token is shown in logprobs: its own text (a special token's spelling; a byte-level token that
    is part of a character decodes to U+FFFD)."""
    return _spellings(tokenizer)[token_id]
