"""Tokenizers: byte-level BPE (Hugging Face `tokenizers`) and character level, behind one interface.

    tok = BPETokenizer.train(open("input.txt", encoding="utf-8"), vocab_size=4096)
    ids = tok.encode("Hello", add_special_tokens=True)   # [bos_id, ..., eos_id]
    tok.save("run/tokenizer.json"); tok = load_tokenizer("run/tokenizer.json")
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from minillm.errors import MiniLLMError
from minillm.files import read_json
from minillm.tokenizers.base import Tokenizer, tokenizer_file
from minillm.tokenizers.bpe_tokenizer import BPETokenizer
from minillm.tokenizers.character_tokenizer import FILE_TYPE as CHAR_FILE_TYPE
from minillm.tokenizers.character_tokenizer import CharacterTokenizer

__all__ = ["Tokenizer", "BPETokenizer", "CharacterTokenizer", "TOKENIZER_KINDS", "load_tokenizer",
           "train_tokenizer"]

# The tokenizer kinds by name (TrainConfig.tokenizer, the "kind" of a loaded tokenizer).
TOKENIZER_KINDS: dict[str, type[Tokenizer]] = {cls.kind: cls for cls in (BPETokenizer, CharacterTokenizer)}


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A tokenizer of `kind` trained on `texts` (streamed); `vocab_size` is the target of kinds that have
    one (BPE), ignored by the character tokenizer, whose vocabulary is the characters it sees."""
    if kind not in TOKENIZER_KINDS:
        raise MiniLLMError(f"unknown tokenizer {kind!r}; choose one of {sorted(TOKENIZER_KINDS)}")
    return TOKENIZER_KINDS[kind].train(texts, vocab_size=vocab_size)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json saved by either kind (or `path/tokenizer.json` if `path` is a folder).

    The file says its kind: {"type": "minillm-char", ...} for ours, {"model": {"type": "BPE"}, ...}
    for Hugging Face's format.
    """
    path = tokenizer_file(path)
    raw = read_json(path, "tokenizer")
    if isinstance(raw, dict) and raw.get("type") == CHAR_FILE_TYPE:
        return CharacterTokenizer.from_json(raw, path)
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict) and raw["model"].get("type") == "BPE":
        return BPETokenizer.from_json(raw, path)
    raise MiniLLMError(
        f"tokenizer {path} is of unknown kind (neither a Mini LLM character tokenizer nor a BPE "
        "tokenizer.json); "
        "pick the tokenizer.json saved with the model or train a new one"
    )
