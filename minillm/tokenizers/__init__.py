"""Tokenizers: byte-level BPE (Hugging Face `tokenizers`) and character level, behind one interface.

    tok = BPETokenizer.train(open("input.txt", encoding="utf-8"), vocab_size=4096)
    ids = tok.encode("Hello", add_special_tokens=True)   # [bos_id, ..., eos_id]
    tok.save("run/tokenizer.json"); tok = load_tokenizer("run/tokenizer.json")
    tok, added = import_tokenizer("gpt2/tokenizer.json")  # an existing tokenizer for a new run

A run records which of its tokenizer's tokens are pad/bos/eos in special_tokens.json beside
tokenizer.json; loading reads that record and never changes an id. A chat run's template is
chat_template.jinja beside them (`save_chat_template`); loading attaches it to the tokenizer. An imported
Hugging Face tokenizer brings its own template when it has one (tokenizer_config.json's "chat_template" or a
chat_template.jinja beside its tokenizer.json).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from minillm.errors import MiniLLMError
from minillm.files import atomic_write, read_json, write_json
from minillm.run_folder import CHAT_TEMPLATE_FILE, SPECIAL_TOKENS_FILE
from minillm.tokenizers.base import ROLES, Tokenizer, tokenizer_file
from minillm.tokenizers.bpe_tokenizer import BPETokenizer
from minillm.tokenizers.character_tokenizer import FILE_TYPE as CHAR_FILE_TYPE
from minillm.tokenizers.character_tokenizer import CharacterTokenizer
from minillm.tokenizers.chat_template import ChatTemplate

__all__ = ["Tokenizer", "BPETokenizer", "CharacterTokenizer", "ChatTemplate", "TOKENIZER_KINDS",
           "import_tokenizer", "load_tokenizer", "save_chat_template", "save_special_tokens", "train_tokenizer"]

HF_TOKENIZER_CONFIG = "tokenizer_config.json"  # where a Hugging Face tokenizer keeps its chat_template

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
        tokenizer: Tokenizer = CharacterTokenizer.from_json(raw, path, recorded)
    else:
        tokenizer = BPETokenizer.from_json(_hugging_face_bpe(raw, path), path, recorded)
    tokenizer.chat_template = read_chat_template(path.parent / CHAT_TEMPLATE_FILE)
    return tokenizer


def import_tokenizer(path: str | Path) -> tuple[Tokenizer, list[str]]:
    """An existing tokenizer for a new run: a Hugging Face BPE tokenizer.json (GPT-2's, Llama's, ...)
    or one saved by another run. Returns (tokenizer, the special tokens that had to be added)."""
    path = tokenizer_file(path)
    if (path.parent / SPECIAL_TOKENS_FILE).is_file():  # another run's: its roles are recorded
        return load_tokenizer(path), []
    raw = read_json(path, "tokenizer")
    if isinstance(raw, dict) and raw.get("type") == CHAR_FILE_TYPE:
        tokenizer, added = CharacterTokenizer.from_json(raw, path), []
    else:
        tokenizer, added = BPETokenizer.imported(_hugging_face_bpe(raw, path), path)
    tokenizer.chat_template = (read_chat_template(path.parent / CHAT_TEMPLATE_FILE)
                               or _config_chat_template(path.parent / HF_TOKENIZER_CONFIG))
    return tokenizer, added


def save_chat_template(tokenizer: Tokenizer, folder: str | Path) -> None:
    """Write the tokenizer's chat template as chat_template.jinja in `folder` (nothing when it has none)."""
    template = tokenizer.chat_template
    if template is not None:
        atomic_write(Path(folder) / CHAT_TEMPLATE_FILE, lambda f: f.write(template.source), mode="w")


def read_chat_template(path: Path) -> ChatTemplate | None:
    """The chat template in a chat_template.jinja file; None when there is none."""
    if not path.is_file():
        return None
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MiniLLMError(f"cannot read the chat template {path} ({e}); copy it again from the run") from None
    return ChatTemplate(source, str(path))


def _config_chat_template(path: Path) -> ChatTemplate | None:
    """The "chat_template" of a Hugging Face tokenizer_config.json (a string, or a list of named templates of
    which "default" is the one); None when it has none."""
    if not path.is_file():
        return None
    raw = read_json(path, "tokenizer config")
    found = raw.get("chat_template") if isinstance(raw, dict) else None
    if isinstance(found, list):
        found = next((t.get("template") for t in found if isinstance(t, dict) and t.get("name") == "default"), None)
    return ChatTemplate(found, f"the chat_template of {path}") if isinstance(found, str) else None


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
