"""What every Mini LLM tokenizer offers, and the checks both kinds share.

A tokenizer trained by Mini LLM reserves the same special tokens at the same ids in both kinds, so a model
config (pad_id, bos_id, eos_id) fits either: "<|pad|>"=0, "<|bos|>"=1, "<|eos|>"=2; the character
tokenizer adds "<|unk|>"=3. A BPE tokenizer imported from a Hugging Face tokenizer.json (GPT-2's, Llama's)
keeps its own ids: its special tokens fill the three roles (pad, bos, eos) by their usual spellings
(ROLE_SPELLINGS), and the ids are read from the tokenizer, never assumed.
Encoding ordinary text never produces a special id, even when the text spells one ("<|eos|>" is seven
ordinary characters) unless the caller passes `allow_special=True`.

More special tokens can be added after the last id (`with_special_tokens`: a chat run's role markers), and a
tokenizer may carry a chat template (`chat_template`, see chat_template.py), stored beside its file.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

from minillm.errors import MiniLLMError
from minillm.run_folder import TOKENIZER_FILE
from minillm.tokenizers.chat_template import ChatTemplate, Message, check_messages

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]  # ids 0, 1, 2 in both kinds
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
ROLES = ("pad", "bos", "eos")
# How common tokenizers spell each role, ours first; the first spelling a tokenizer has fills the role.
# GPT-2 has one special token, <|endoftext|>, that both begins and ends a document (its own convention).
# Padding is never the end token: the loss ignores padding targets, and the model must learn to end.
ROLE_SPELLINGS = {
    "pad": (PAD_TOKEN, "<pad>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>"),
    "bos": (BOS_TOKEN, "<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[CLS]", "<|endoftext|>"),
    "eos": (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>", "[SEP]"),
}
OWN_SPELLING = {"pad": PAD_TOKEN, "bos": BOS_TOKEN, "eos": EOS_TOKEN}  # what a missing role is added as
FINGERPRINT_CHARS = 16  # hex digits of sha256 kept: 64 bits tell a run's tokenizer from any other


class DecodeStream(Protocol):
    """Incremental decoder: feed one token id at a time, get text once it forms whole characters."""

    def step(self, token_id: int) -> str | None:
        """The new text completed by `token_id`, or None while a character is still partial."""
        ...


class Tokenizer(ABC):
    """Text <-> token ids. Subclasses: BPETokenizer ("bpe") and CharacterTokenizer ("char")."""

    kind: str
    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    unk_id: int | None = None
    spells_every_text: bool = True  # no text loses a character (see unspelled)
    notes: tuple[str, ...] = ()  # what loading changed in the file, to tell the user (e.g. BPE dropout off)
    # How a conversation becomes ids (a chat run's; None: the tokenizer has none). Set once, when loaded.
    chat_template: ChatTemplate | None = None

    def noting(self, notes: Iterable[str]) -> Tokenizer:
        """This tokenizer, with `notes` about how it was loaded."""
        self.notes = (*self.notes, *notes)
        return self

    @classmethod
    def planned_vocab_size(cls, vocab_size: int) -> int:
        """The vocabulary a tokenizer of this kind trained with target `vocab_size` will about have (for
        estimates made before it is trained)."""
        return vocab_size

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (valid ids are 0..vocab_size-1)."""

    @abstractmethod
    def encode(self, text: str, add_special_tokens: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids for `text`; BOS first and EOS last if `add_special_tokens`.

        Special-token spellings in `text` are encoded as ordinary text unless `allow_special` is True.
        """

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = False,
                     allow_special: bool = False) -> list[list[int]]:
        """`[encode(t) for t in texts]`, possibly faster."""
        return [self.encode(t, add_special_tokens, allow_special) for t in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text for `ids`; pad/bos/eos are left out if `skip_special_tokens`."""

    @abstractmethod
    def decode_stream(self, skip_special_tokens: bool = True) -> DecodeStream:
        """A fresh incremental decoder (see DecodeStream) for streaming generation."""

    @abstractmethod
    def token_bytes(self) -> list[bytes]:
        """The UTF-8 bytes that each id stands for (b"" for pad/bos/eos), indexed by id.

        Decoding whole texts, the bytes of their tokens add up to the text's UTF-8 bytes, less those of the
        characters it cannot spell (`unspelled`: the unknown token spells b""): this is what bits per byte
        are counted against (a BPE token may hold part of a character). A SentencePiece-style tokenizer
        that puts a space before each text (its dummy prefix) spells that space too.
        """

    def unspelled(self, text: str) -> Counter[str]:
        """The characters of `text` that no token spells (the tokenizer drops them or encodes them as its
        unknown token), counted. Empty when the tokenizer spells every text."""
        return Counter()

    def count_unknown(self, text: str) -> int:
        """How many characters of `text` this tokenizer cannot represent (dropped, or encoded as unk_id)."""
        return sum(self.unspelled(text).values())

    def fingerprint(self) -> str:
        """A short hash of what the tokenizer maps (kind, vocabulary, merges), not of how its file is
        formatted: two tokenizers with the same fingerprint encode every text alike."""
        return hashlib.sha256(f"{self.kind}\n{self.canonical_form()}".encode()).hexdigest()[:FINGERPRINT_CHARS]

    @abstractmethod
    def canonical_form(self) -> str:
        """Everything that decides the mapping between text and ids, as one deterministic string."""

    @abstractmethod
    def save(self, path: str | Path) -> None:
        """Write one JSON file (`path/tokenizer.json` if `path` is a folder), atomically."""

    @abstractmethod
    def token_text(self, token_id: int) -> str:
        """The spelling of one token id in the vocabulary (a special token's name, e.g. "<|eos|>")."""

    @abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """Every special token's spelling -> its id (the roles', the character tokenizer's unknown token, added
        ones): what `allow_special` reads as one id, and what ordinary text never becomes."""

    @abstractmethod
    def with_special_tokens(self, spellings: Iterable[str]) -> Tokenizer:
        """A copy of this tokenizer (without its chat template) with the `spellings` it lacks added as special
        tokens after its last id; no existing id changes."""

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = False) -> list[int]:
        """The ids of a conversation ({"role", "content"} messages, checked) by the chat template, with the start
        of an assistant's turn after it when `add_generation_prompt` (transformers' method of the same name)."""
        return self._template().render_ids(check_messages(messages), add_generation_prompt, self)

    def chat_stop_ids(self) -> list[int]:
        """The ids that end an assistant's answer: the template's end-of-turn token and EOS."""
        return self._template().stop_ids(self)

    def chat_training_ids(self, messages: list[Message]) -> tuple[list[int], list[bool]]:
        """(the conversation's ids, which ones the model learns: its assistant turns with their end-of-turn)."""
        return self._template().training_ids(messages, self)

    def _template(self) -> ChatTemplate:
        if self.chat_template is None:
            raise MiniLLMError("this tokenizer has no chat template: the run was not trained on conversations "
                               "(train on a JSONL file of {\"messages\": [...]} lines, --task chat)")
        return self.chat_template

    def role_tokens(self) -> dict[str, tuple[str, int]]:
        """Each role ("pad", "bos", "eos") -> (the token's spelling, its id)."""
        return {role: (self.token_text(getattr(self, f"{role}_id")), getattr(self, f"{role}_id"))
                for role in ROLES}

    @abstractmethod
    def hugging_face_json(self) -> dict:
        """An equivalent Hugging Face tokenizer.json (parsed), for export: same ids for every text, the
        special tokens declared, and a post-processor that adds BOS in front as the model was trained."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


def tokenizer_file(path: str | Path) -> Path:
    """`path` itself, or `path/tokenizer.json` when `path` is a folder."""
    path = Path(path)
    return path / TOKENIZER_FILE if path.is_dir() else path


def find_roles(token_id: Callable[[str], int | None]) -> dict[str, int | None]:
    """Which id fills each role, by ROLE_SPELLINGS (`token_id(spelling)` is None when absent); None when
    the tokenizer has no token for a role. Padding never shares an id with BOS or EOS."""
    roles: dict[str, int | None] = {}
    for role in ("bos", "eos", "pad"):
        taken = {roles.get("bos"), roles.get("eos")} if role == "pad" else set()
        found = (token_id(spelling) for spelling in ROLE_SPELLINGS[role])
        roles[role] = next((i for i in found if i is not None and i not in taken), None)
    return {role: roles[role] for role in ROLES}


def bos_template(bos_token: str, bos_id: int) -> dict:
    """A Hugging Face TemplateProcessing post-processor that puts BOS before the text (as training does)."""
    bos = {"SpecialToken": {"id": bos_token, "type_id": 0}}
    return {"type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos_token: {"id": bos_token, "ids": [bos_id], "tokens": [bos_token]}}}


def checked_texts(texts: Iterable[str] | str, seen_text: list[bool]) -> Iterator[str]:
    """Yield the training texts, refusing non-strings; sets seen_text[0] once a non-blank text passes.

    Works as a stream, so a large file can be trained on line by line without reading it whole.
    A single string counts as one text (not as an iterable of characters).
    """
    if isinstance(texts, str):
        texts = [texts]
    for text in texts:
        if not isinstance(text, str):
            raise MiniLLMError(
                f"training texts must be strings, got {type(text).__name__}; "
                "pass e.g. open(path).read() or a list of str"
            )
        if not seen_text[0] and text and not text.isspace():
            seen_text[0] = True
        yield text


def require_text(seen_text: list[bool]) -> None:
    """Refuse to train on nothing (empty or whitespace-only input)."""
    if not seen_text[0]:
        raise MiniLLMError(
            "training text is empty or only whitespace; give the tokenizer some real text to learn from"
        )


def checked_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
    """`ids` as a list of Python ints, refusing any outside 0..vocab_size-1."""
    try:
        ids = [int(i) for i in ids]
    except (TypeError, ValueError):
        raise MiniLLMError(f"token ids must be integers, got {ids!r:.80}") from None
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        bad = next(i for i in ids if not 0 <= i < vocab_size)
        raise MiniLLMError(
            f"token id {bad} is outside the vocabulary (0..{vocab_size - 1}); "
            "decode only ids produced by this tokenizer or a model trained with it"
        )
    return ids
