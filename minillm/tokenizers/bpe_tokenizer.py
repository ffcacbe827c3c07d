"""Byte-level BPE, trained and run by Hugging Face `tokenizers` (Rust).

Byte level means the base alphabet is the 256 byte values, so any Unicode text round-trips exactly and
there is no unknown token. An imported tokenizer.json may spell text otherwise (SentencePiece style with byte
fallback, as Llama-2's and Mistral's; or plain text, which may drop characters): spelling.py reads how, for
bits per byte, and `unspelled` measures what a text loses.
The saved tokenizer.json is that library's own format: it loads with `tokenizers.Tokenizer.from_file(path)`
and `transformers.PreTrainedTokenizerFast(tokenizer_file=path)`.
Those loaders treat a special-token spelling in the text ("<|eos|>") as the special token (their
convention); pass `split_special_tokens=True` to transformers, or set `tok.encode_special_tokens = True`
on a `tokenizers.Tokenizer`, to get exactly the ids this class gives.

This is the only module that imports Hugging Face `tokenizers` (our sub-package has the same name).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from minillm.errors import MiniLLMError
from minillm.files import atomic_write
from minillm.tokenizers.base import (
    BOS_ID,
    BOS_TOKEN,
    EOS_ID,
    EOS_TOKEN,
    OWN_SPELLING,
    PAD_ID,
    ROLES,
    SPECIAL_TOKENS,
    Tokenizer,
    bos_template,
    checked_ids,
    checked_texts,
    find_roles,
    require_text,
    tokenizer_file,
)
from minillm.tokenizers.spelling import BYTE_ALPHABET_SIZE, spells_every_text, token_bytes_table

LONE_SURROGATE = re.compile("[\ud800-\udfff]")
UNCOVERED = re.compile(b"\x00+")  # runs of characters no token spells (see unspelled)
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)


class BPETokenizer(Tokenizer):
    """BPE tokenizer (byte-level when trained here); wraps a `tokenizers.Tokenizer`.

    `roles` ({"pad": id, "bos": id, "eos": id}) says which ids are the special tokens; trained tokenizers
    have ours at 0, 1, 2, imported ones keep their own ids (see `imported`).
    """

    kind = "bpe"

    def __init__(self, hf_tokenizer: HFTokenizer, roles: dict[str, int] | None = None):
        # Two copies of the same tokenizer: one reads special-token spellings as plain text (the default),
        # one as special tokens (allow_special=True). A flag flipped per call would not be thread-safe.
        json_str = hf_tokenizer.to_str()
        self._hf = HFTokenizer.from_str(json_str)
        self._hf.encode_special_tokens = True
        self._hf_special = HFTokenizer.from_str(json_str)
        self._hf_special.encode_special_tokens = False
        # Ids need not be dense in a foreign file: the model needs a row for the largest one.
        vocab = self._hf.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values(), default=-1) + 1
        roles = roles or {"pad": PAD_ID, "bos": BOS_ID, "eos": EOS_ID}
        self.pad_id, self.bos_id, self.eos_id = (int(roles[role]) for role in ROLES)
        raw = json.loads(json_str)
        unknown = (raw.get("model") or {}).get("unk_token")
        self.unk_id = vocab.get(unknown) if unknown else None
        self.spells_every_text = spells_every_text(raw, vocab)

    def __getstate__(self) -> dict[str, Any]:
        # Pickled (DataLoader workers, deepcopy) as the JSON: HF's own pickling drops encode_special_tokens.
        return {"json": self._hf.to_str(), "roles": {role: token_id for role, (_, token_id) in
                                                     self.role_tokens().items()},
                "chat_template": self.chat_template}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(HFTokenizer.from_str(state["json"]), state.get("roles"))
        self.chat_template = state.get("chat_template")

    @classmethod
    def train(cls, texts: Iterable[str] | str, vocab_size: int, min_frequency: int = 2) -> BPETokenizer:
        """Learn merges from `texts` (strings, streamed) up to `vocab_size` tokens, special tokens included.

        Pairs seen fewer than `min_frequency` times are not merged, so a small text may give a smaller
        vocabulary than asked for: read `vocab_size` afterwards.
        """
        if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
            raise MiniLLMError(
                f"BPE vocab_size {vocab_size!r} is too small: it needs at least {MIN_VOCAB_SIZE} "
                f"({BYTE_ALPHABET_SIZE} byte tokens + {len(SPECIAL_TOKENS)} special tokens); "
                "use e.g. 1024 or more"
            )
        if not isinstance(min_frequency, int) or min_frequency < 1:
            raise MiniLLMError(f"BPE min_frequency must be a whole number >= 1, got {min_frequency!r}")
        hf = HFTokenizer(models.BPE())
        # No normalizer: the text is kept byte for byte, so decode(encode(s)) == s.
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS,  # first, so they get ids 0, 1, 2
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, even unseen ones
            show_progress=False,
        )
        seen_text = [False]
        hf.train_from_iterator(checked_texts(texts, seen_text), trainer=trainer)
        require_text(seen_text)
        # For Hugging Face loaders: add_special_tokens=True wraps the text in BOS ... EOS, as ours does.
        hf.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A {EOS_TOKEN}", special_tokens=[(BOS_TOKEN, BOS_ID), (EOS_TOKEN, EOS_ID)]
        )
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def special_tokens(self) -> dict[str, int]:
        return {token.content: token_id for token_id, token in self._hf.get_added_tokens_decoder().items()
                if token.special}

    def with_special_tokens(self, spellings: Iterable[str]) -> BPETokenizer:
        hf = HFTokenizer.from_str(self._hf.to_str())
        # Declared special (a spelling already in the vocabulary keeps its id), never normalized or stripped.
        hf.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in dict.fromkeys(spellings)])
        return BPETokenizer(hf, {role: token_id for role, (_, token_id) in self.role_tokens().items()})

    @property
    def hf_tokenizer(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (reads special spellings as text); do not modify it."""
        return self._hf

    def _backend(self, allow_special: bool) -> HFTokenizer:
        return self._hf_special if allow_special else self._hf

    def encode(self, text: str, add_special_tokens: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids for `text`; BOS first and EOS last if `add_special_tokens`."""
        try:
            ids = self._backend(allow_special).encode(text, add_special_tokens=False).ids
        except TypeError as e:
            raise _encode_failure([text], e) from None
        return [self.bos_id, *ids, self.eos_id] if add_special_tokens else ids

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = False,
                     allow_special: bool = False) -> list[list[int]]:
        """`[encode(t) for t in texts]`, computed in parallel by the Rust library."""
        texts = list(texts)
        try:
            # encode_batch_fast skips computing character offsets, which we do not use.
            encodings = self._backend(allow_special).encode_batch_fast(texts, add_special_tokens=False)
        except TypeError as e:
            raise _encode_failure(texts, e) from None
        if add_special_tokens:
            return [[self.bos_id, *e.ids, self.eos_id] for e in encodings]
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text for `ids`; pad/bos/eos are left out if `skip_special_tokens`."""
        return self._hf.decode(checked_ids(ids, self._vocab_size), skip_special_tokens=skip_special_tokens)

    def token_bytes(self) -> list[bytes]:
        """The bytes of each id (specials and the unknown token: b""), as the tokenizer spells text: through
        the byte-level alphabet, or SentencePiece's space marker and byte tokens (spelling.py)."""
        return token_bytes_table(json.loads(self._hf.to_str()), self._hf.get_vocab(with_added_tokens=True),
                                 self._vocab_size)

    def unspelled(self, text: str) -> Counter[str]:
        """The characters of `text` that no token spells (dropped, or covered by the unknown token), counted;
        empty for a tokenizer that spells every text (byte level, or complete byte fallback)."""
        if self.spells_every_text:
            return Counter()
        try:
            encoding = self._hf.encode(text, add_special_tokens=False)
        except TypeError as e:
            raise _encode_failure([text], e) from None
        covered = bytearray(len(text))  # 1 where a token other than the unknown one covers the character
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets, strict=True):
            if token_id != self.unk_id and end > start:
                covered[start:end] = b"\x01" * (end - start)
        return Counter(char for run in UNCOVERED.finditer(covered) for char in text[run.start():run.end()])

    def decode_stream(self, skip_special_tokens: bool = True) -> _BPEDecodeStream:
        """An incremental decoder that never returns part of a UTF-8 character."""
        return _BPEDecodeStream(self, skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        [token_id] = checked_ids([token_id], self._vocab_size)
        return self._hf.id_to_token(token_id)

    def hugging_face_json(self) -> dict:
        """The tokenizer.json itself (its special tokens are declared), with BOS added in front."""
        raw = json.loads(self._hf.to_str())
        raw["post_processor"] = bos_template(self.token_text(self.bos_id), self.bos_id)
        return raw

    def canonical_form(self) -> str:
        """The Hugging Face JSON of the tokenizer (deterministic: written by the Rust library)."""
        return self._hf.to_str(pretty=False)

    def save(self, path: str | Path) -> None:
        """Write Hugging Face's tokenizer.json format, atomically."""
        json_str = self._hf.to_str(pretty=True)
        atomic_write(tokenizer_file(path), lambda f: f.write(json_str + "\n"), mode="w")

    @classmethod
    def from_json(cls, raw: dict[str, Any], path: Path,
                  recorded: dict[str, tuple[str, int]] | None = None) -> BPETokenizer:
        """Build from a parsed Hugging Face tokenizer.json, as it is (no token added, no id changed).

        `recorded` (role -> (spelling, id), from the run's special_tokens.json) says which tokens are
        pad/bos/eos; without it they are found by their usual spellings, and a tokenizer lacking one is refused.
        """
        raw, notes = _without_dropout(raw, path)
        hf = _parse(raw, path)
        if recorded is not None:
            wrong = [role for role, (token, token_id) in recorded.items() if hf.token_to_id(token) != token_id]
            if wrong:
                raise MiniLLMError(f"the special tokens recorded beside {path} ({', '.join(wrong)}) are not in it at "
                                   "the recorded ids; keep the run's tokenizer.json and special_tokens.json together")
            return cls(hf, {role: token_id for role, (_, token_id) in recorded.items()}).noting(notes)
        roles = find_roles(hf.token_to_id)
        missing = [role for role, token_id in roles.items() if token_id is None]
        if missing:
            raise MiniLLMError(
                f"tokenizer {path} has no {'/'.join(missing)} token that Mini LLM recognises; train with "
                f"`minillm train DATA --tokenizer-file {path}`, which adds the missing ones to the run's copy"
            )
        return cls(hf, roles).noting(notes)

    @classmethod
    def imported(cls, raw: dict[str, Any], path: Path) -> tuple[BPETokenizer, list[str]]:
        """A foreign Hugging Face tokenizer.json for a new run: its special tokens fill the roles, and a
        role it has no token for gets ours, added after its last id (no existing id changes).

        Returns (tokenizer, the spellings that were added).
        """
        raw, notes = _without_dropout(raw, path)
        hf = _parse(raw, path)
        roles = find_roles(hf.token_to_id)
        added = []
        for role in ROLES:
            if roles[role] is None:
                token = OWN_SPELLING[role]
                if hf.token_to_id(token) is not None:  # (ours, but already taken by another role)
                    raise MiniLLMError(f"tokenizer {path} uses {token} for another role; pick another tokenizer")
                added.append(token)
            else:
                token = hf.id_to_token(roles[role])
            # Declared special (an existing token keeps its id): decoding skips it, as our own do.
            hf.add_special_tokens([AddedToken(token, special=True, normalized=False)])
            roles[role] = hf.token_to_id(token)
        return cls(hf, roles).noting(notes), added


def _without_dropout(raw: dict[str, Any], path: Path) -> tuple[dict[str, Any], list[str]]:
    """`raw` with BPE dropout off, and the note that says so when it was on: dropout picks merges at random
    on every encode (a training trick), so the same text would get other ids at each evaluation."""
    model = raw.get("model")
    if not isinstance(model, dict) or not model.get("dropout"):
        return raw, []
    note = (f"tokenizer {path} had BPE dropout {model['dropout']} on: turned off, so that a text always gets "
            "the same tokens (the run's copy is saved without it)")
    return {**raw, "model": {**model, "dropout": None}}, [note]


def _parse(raw: dict[str, Any], path: Path) -> HFTokenizer:
    try:
        return HFTokenizer.from_str(json.dumps(raw))
    except Exception as e:  # the Rust library raises a bare Exception for malformed files
        message = f"tokenizer {path} is a broken BPE tokenizer.json ({str(e)[:200]}); retrain it"
        raise MiniLLMError(message) from None


class _BPEDecodeStream:
    """Wraps tokenizers.decoders.DecodeStream, which buffers bytes until a character is whole."""

    def __init__(self, tokenizer: BPETokenizer, skip_special_tokens: bool):
        self._tokenizer = tokenizer
        self._stream = decoders.DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str | None:
        """The new text completed by `token_id`, or None while a character is still partial."""
        [token_id] = checked_ids([token_id], self._tokenizer.vocab_size)
        return self._stream.step(self._tokenizer._hf, token_id)


def _encode_failure(texts: list[Any], error: TypeError) -> MiniLLMError:
    """What made the Rust library refuse `texts`: a non-string, a lone surrogate, or (it reports every failure
    to read a str as "must be str") something else, such as no memory to copy the text: the real cause."""
    for text in texts:
        if not isinstance(text, str):
            return MiniLLMError(f"can only encode text (str), got {type(text).__name__}")
    for text in texts:
        if LONE_SURROGATE.search(text):  # (a search allocates nothing, unlike text.encode)
            return MiniLLMError("text contains a lone surrogate character, which is not valid Unicode; read "
                                "files with encoding='utf-8' (errors='replace' for damaged files)")
    size = sum(len(text) for text in texts)
    try:
        for text in texts:
            text.encode("utf-8")  # what the library does first: copy the text as UTF-8
    except MemoryError:
        return MiniLLMError(f"out of memory while tokenizing {size:,} characters of text (copying it as UTF-8 "
                            "failed); free some memory, or split the data into smaller samples")
    return MiniLLMError(f"the tokenizers library could not read {size:,} characters of valid text ({error}); "
                        "this usually means it ran out of memory: free some memory and try again")
