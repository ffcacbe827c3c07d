"""One token per character: the vocabulary is every character seen in training, sorted by code point.

Ids: the special tokens first ("<|pad|>"=0, "<|bos|>"=1, "<|eos|>"=2, "<|unk|>"=3), then the characters,
then any special tokens added after training (a chat run's role markers, `with_special_tokens`).
A character not seen in training encodes as unk_id and decodes as U+FFFD "\N{REPLACEMENT CHARACTER}";
`count_unknown(text)` says how many there are, so a caller can warn before generating.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from minillm.errors import MiniLLMError
from minillm.files import write_json
from minillm.tokenizers.base import (
    BOS_ID,
    EOS_ID,
    ROLES,
    SPECIAL_TOKENS,
    UNK_TOKEN,
    Tokenizer,
    bos_template,
    checked_ids,
    checked_texts,
    require_text,
    tokenizer_file,
)

FILE_TYPE = "minillm-char"  # the "type" field that marks our tokenizer.json
FILE_VERSION = 1
TYPICAL_ALPHABET = 512  # letters, digits, punctuation and some accented or other scripts' characters
CHAR_SPECIAL_TOKENS = [*SPECIAL_TOKENS, UNK_TOKEN]
UNK_ID = CHAR_SPECIAL_TOKENS.index(UNK_TOKEN)
UNKNOWN_TEXT = "\N{REPLACEMENT CHARACTER}"  # what unk_id decodes to


class CharacterTokenizer(Tokenizer):
    """Character-level tokenizer over a fixed alphabet (full Unicode)."""

    kind = "char"
    unk_id = UNK_ID
    spells_every_text = False  # a character not seen in training is unknown

    def __init__(self, alphabet: str, added: tuple[str, ...] = ()):
        self.alphabet = alphabet  # id of alphabet[i] is i + len(CHAR_SPECIAL_TOKENS)
        self.added = tuple(added)  # special tokens after the alphabet, in id order
        self._ids = _CharIds({c: i + len(CHAR_SPECIAL_TOKENS) for i, c in enumerate(alphabet)})
        skipped = ["", "", "", UNKNOWN_TEXT]
        spelled = [*SPECIAL_TOKENS, UNKNOWN_TEXT]
        self._decode_tables = {True: skipped + list(alphabet) + [""] * len(self.added),
                               False: spelled + list(alphabet) + list(self.added)}
        self._specials = {**{t: i for i, t in enumerate(CHAR_SPECIAL_TOKENS)},
                          **{t: len(CHAR_SPECIAL_TOKENS) + len(alphabet) + i for i, t in enumerate(self.added)}}
        # Longest first: a spelling that begins another never cuts it short.
        spellings = sorted(self._specials, key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(re.escape(t) for t in spellings) + ")")

    @classmethod
    def train(cls, texts: Iterable[str] | str, vocab_size: int | None = None) -> CharacterTokenizer:
        """Collect the characters of `texts` (strings, streamed) into a sorted alphabet.

        `vocab_size` is accepted for the common interface and ignored: the vocabulary is what the text has.
        """
        chars: set[str] = set()
        seen_text = [False]
        for text in checked_texts(texts, seen_text):
            chars.update(text)
        require_text(seen_text)
        return cls("".join(sorted(chars)))

    @classmethod
    def planned_vocab_size(cls, vocab_size: int) -> int:
        """Not known before training (it is the characters of the text): a typical alphabet's size."""
        return TYPICAL_ALPHABET

    @property
    def vocab_size(self) -> int:
        return len(CHAR_SPECIAL_TOKENS) + len(self.alphabet) + len(self.added)

    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    def with_special_tokens(self, spellings: Iterable[str]) -> CharacterTokenizer:
        new = [t for t in dict.fromkeys(spellings) if t not in self._specials]
        for spelling in new:
            if not isinstance(spelling, str) or len(spelling) < 2:
                raise MiniLLMError(f"a special token must be a spelling of two characters or more, got {spelling!r}")
        return CharacterTokenizer(self.alphabet, (*self.added, *new))

    def encode(self, text: str, add_special_tokens: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids for `text`; BOS first and EOS last if `add_special_tokens`."""
        _require_str(text)
        # map + dict lookup runs in C, faster than numpy for paragraph-sized texts (bench/tokenizer_speed.py).
        if not allow_special:
            ids = list(map(self._ids.__getitem__, text))
        else:
            ids = []
            for n, piece in enumerate(self._special_split.split(text)):
                # Odd pieces of the split are special-token spellings, even pieces ordinary text.
                ids += [self._specials[piece]] if n % 2 else map(self._ids.__getitem__, piece)
        return [BOS_ID, *ids, EOS_ID] if add_special_tokens else ids

    def count_unknown(self, text: str) -> int:
        """How many characters of `text` were never seen in training (they encode as unk_id)."""
        _require_str(text)
        return sum(c not in self._ids for c in text)

    def unspelled(self, text: str) -> Counter[str]:
        """The characters of `text` never seen in training (they encode as unk_id), counted."""
        _require_str(text)
        return Counter(c for c in text if c not in self._ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text for `ids`; pad/bos/eos are left out if `skip_special_tokens`; unk_id gives U+FFFD."""
        table = self._decode_tables[bool(skip_special_tokens)]
        return "".join(map(table.__getitem__, checked_ids(ids, self.vocab_size)))

    def token_bytes(self) -> list[bytes]:
        """UTF-8 of each id's character (specials, and unk_id, which spells no character of the text: b"")."""
        return [b"" if token_id == UNK_ID else text.encode("utf-8")
                for token_id, text in enumerate(self._decode_tables[True])]

    def decode_stream(self, skip_special_tokens: bool = True) -> _CharDecodeStream:
        """An incremental decoder; every id is a whole character, so only skipped specials give None."""
        return _CharDecodeStream(self, skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        [token_id] = checked_ids([token_id], self.vocab_size)
        return self._decode_tables[False][token_id] if token_id != UNK_ID else UNK_TOKEN

    def hugging_face_json(self) -> dict:
        """The same mapping as a Hugging Face tokenizer.json: every character its own token (a Split
        pre-tokenizer on any one code point), a WordLevel vocabulary whose unknown token decodes as U+FFFD."""
        vocab = {token: i for i, token in enumerate(CHAR_SPECIAL_TOKENS)}
        vocab.update({c: i + len(CHAR_SPECIAL_TOKENS) for i, c in enumerate(self.alphabet)})
        specials = {t: i for t, i in self._specials.items() if t != UNK_TOKEN}
        vocab.update(specials)
        # pad/bos/eos and the added ones are special (skipped by decode(skip_special_tokens=True)); <|unk|>
        # stays an ordinary entry so that decoding never drops it: the Replace decoder turns it into U+FFFD,
        # as ours does.
        added = [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True} for token, i in specials.items()]
        return {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated",
                              "invert": False},
            "post_processor": bos_template(SPECIAL_TOKENS[BOS_ID], BOS_ID),
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": UNK_TOKEN}, "content": UNKNOWN_TEXT}, {"type": "Fuse"}]},
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": UNK_TOKEN},
        }

    def canonical_form(self) -> str:
        return "\n".join([*CHAR_SPECIAL_TOKENS, self.alphabet, *self.added])

    def save(self, path: str | Path) -> None:
        """Write our own JSON ({"type": "minillm-char", ...}), atomically."""
        write_json(tokenizer_file(path), {
            "type": FILE_TYPE,
            "version": FILE_VERSION,
            "special_tokens": CHAR_SPECIAL_TOKENS,
            "unknown_text": UNKNOWN_TEXT,
            "alphabet": self.alphabet,
            **({"added_special_tokens": list(self.added)} if self.added else {}),
        })

    @classmethod
    def from_json(cls, raw: dict[str, Any], path: Path,
                  recorded: dict[str, tuple[str, int]] | None = None) -> CharacterTokenizer:
        """Build from a parsed tokenizer.json written by `save`, checking it is consistent (and that the
        special tokens `recorded` beside it, if any, are its own: their ids are fixed in this kind)."""
        if recorded is not None and recorded != {role: (SPECIAL_TOKENS[i], i) for i, role in enumerate(ROLES)}:
            raise MiniLLMError(f"the special tokens recorded beside {path} do not match it; keep the run's "
                               "tokenizer.json and special_tokens.json together")
        if raw.get("version") != FILE_VERSION:
            raise MiniLLMError(
                f"tokenizer {path} has version {raw.get('version')!r}, "
                f"this minillm reads version {FILE_VERSION}; "
                "upgrade minillm or retrain the tokenizer"
            )
        alphabet = raw.get("alphabet")
        if raw.get("special_tokens") != CHAR_SPECIAL_TOKENS or not isinstance(alphabet, str) or not alphabet:
            raise MiniLLMError(f"tokenizer {path} is a damaged character tokenizer file; retrain it")
        if len(set(alphabet)) != len(alphabet):
            raise MiniLLMError(f"tokenizer {path} lists a character twice in its alphabet; retrain it")
        added = raw.get("added_special_tokens", [])
        if (not isinstance(added, list) or not all(isinstance(t, str) and len(t) > 1 for t in added)
                or len(set(added) | set(CHAR_SPECIAL_TOKENS)) != len(added) + len(CHAR_SPECIAL_TOKENS)):
            raise MiniLLMError(f"tokenizer {path} has damaged added special tokens; retrain it")
        return cls(alphabet, tuple(added))


class _CharDecodeStream:
    def __init__(self, tokenizer: CharacterTokenizer, skip_special_tokens: bool):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens

    def step(self, token_id: int) -> str | None:
        """The character for `token_id`, or None for a skipped special token."""
        text = self._tokenizer.decode([token_id], self._skip)
        return text or None


class _CharIds(dict):
    """Character -> id; a character never seen in training maps to unk_id."""

    def __missing__(self, char: str) -> int:
        return UNK_ID


def _require_str(text: object) -> None:
    if not isinstance(text, str):
        raise MiniLLMError(f"can only encode text (str), got {type(text).__name__}")
