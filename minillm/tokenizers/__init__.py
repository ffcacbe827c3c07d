"""Tokenizers: byte-level BPE (Hugging Face `tokenizers`) and character level, behind one interface.

    tok = BPETokenizer.train(open("input.txt", encoding="utf-8"), vocab_size=4096)
    ids = tok.encode("Hello", add_special_tokens=True)   # [bos_id, ..., eos_id]
    tok.save("run/tokenizer.json"); tok = load_tokenizer("run/tokenizer.json")
    tok, added = import_tokenizer("gpt2/tokenizer.json")  # an existing tokenizer for a new run

A run records which of its tokenizer's tokens are pad/bos/eos in special_tokens.json beside
tokenizer.json; loading reads that record and never changes an id.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from minillm.errors import MiniLLMError
from minillm.files import read_json, write_json
from minillm.run_folder import SPECIAL_TOKENS_FILE
from minillm.tokenizers.base import ROLES, Tokenizer, tokenizer_file
from minillm.tokenizers.bpe_tokenizer import BPETokenizer
from minillm.tokenizers.character_tokenizer import FILE_TYPE as CHAR_FILE_TYPE
from minillm.tokenizers.character_tokenizer import CharacterTokenizer

__all__ = ["Tokenizer", "BPETokenizer", "CharacterTokenizer", "TOKENIZER_KINDS", "import_tokenizer",
           "load_tokenizer", "save_special_tokens", "train_tokenizer"]

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
    for Hugging Face's format. The special_tokens.json beside it, if any, says which tokens are pad/bos/eos.
    """
    path = tokenizer_file(path)
    raw = read_json(path, "tokenizer")
    recorded = read_special_tokens(path.parent / SPECIAL_TOKENS_FILE)
    if isinstance(raw, dict) and raw.get("type") == CHAR_FILE_TYPE:
        return CharacterTokenizer.from_json(raw, path, recorded)
    return BPETokenizer.from_json(_hugging_face_bpe(raw, path), path, recorded)


def import_tokenizer(path: str | Path) -> tuple[Tokenizer, list[str]]:
    """An existing tokenizer for a new run: a Hugging Face BPE tokenizer.json (GPT-2's, Llama's, ...)
    or one saved by another run. Returns (tokenizer, the special tokens that had to be added)."""
    path = tokenizer_file(path)
    if (path.parent / SPECIAL_TOKENS_FILE).is_file():  # another run's: its roles are recorded
        return load_tokenizer(path), []
    raw = read_json(path, "tokenizer")
    if isinstance(raw, dict) and raw.get("type") == CHAR_FILE_TYPE:
        return CharacterTokenizer.from_json(raw, path), []
    return BPETokenizer.imported(_hugging_face_bpe(raw, path), path)


def save_special_tokens(tokenizer: Tokenizer, path: str | Path, added: list[str], source: str) -> None:
    """Record which tokens fill the roles (special_tokens.json), which were added, and where it came from."""
    record = {role: {"token": token, "id": token_id} for role, (token, token_id) in tokenizer.role_tokens().items()}
    write_json(path, {**record, "added": added, "source": source})


def read_special_tokens(path: Path) -> dict[str, tuple[str, int]] | None:
    """role -> (spelling, id) from a special_tokens.json; None when there is none."""
    if not path.is_file():
        return None
    raw = read_json(path, "special tokens record")
    try:
        return {role: (str(raw[role]["token"]), int(raw[role]["id"])) for role in ROLES}
    except (KeyError, TypeError, ValueError):
        raise MiniLLMError(f"{path} is damaged (it needs pad, bos and eos, each with a token and an id); "
                           "copy it again from the run, or delete it to find the roles by name") from None


def _hugging_face_bpe(raw: object, path: Path) -> dict:
    """`raw` if it is a Hugging Face BPE tokenizer.json, else the error that says what it is."""
    model = raw.get("model") if isinstance(raw, dict) else None
    if isinstance(model, dict) and model.get("type") == "BPE":
        return raw
    if isinstance(model, dict) and isinstance(model.get("type"), str) and "vocab" in model:
        raise MiniLLMError(f"tokenizer {path} is a Hugging Face {model['type']} tokenizer; Mini LLM reads BPE "
                           "tokenizer.json files (GPT-2, Llama, Mistral, Qwen, ...) and its own; pick one of those")
    raise MiniLLMError(
        f"tokenizer {path} is of unknown kind (neither a Mini LLM character tokenizer nor a BPE "
        "tokenizer.json); "
        "pick the tokenizer.json saved with the model or train a new one"
    )
