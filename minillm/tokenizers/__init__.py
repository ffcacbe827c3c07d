"""Tokenizers: byte-level BPE (Hugging Face `tokenizers`) and character level, behind one interface.

    tok = BPETokenizer.train(open("input.txt", encoding="utf-8"), vocab_size=4096)
    ids = tok.encode("Hello", add_special_tokens=True)   # [bos_id, ..., eos_id]
    tok.save("run/tokenizer.json"); tok = load_tokenizer("run/tokenizer.json")
"""

from __future__ import annotations

from pathlib import Path

from minillm.checkpoint import read_json
from minillm.errors import MiniLLMError
from minillm.tokenizers.base import Tokenizer, tokenizer_file
from minillm.tokenizers.bpe_tokenizer import BPETokenizer
from minillm.tokenizers.character_tokenizer import FILE_TYPE as CHAR_FILE_TYPE
from minillm.tokenizers.character_tokenizer import CharacterTokenizer

__all__ = ["Tokenizer", "BPETokenizer", "CharacterTokenizer", "load_tokenizer"]


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
