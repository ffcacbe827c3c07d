"""How the tokens of a Hugging Face BPE tokenizer.json spell text, read from the file itself (no Hugging Face
import here): which bytes each token stands for, and whether the tokenizer can spell any text at all.

Three ways of spelling are in use:
- byte level (GPT-2, Qwen, ours): each character of a token stands for one byte (GPT-2's bytes_to_unicode);
- SentencePiece style (Llama-2, Mistral): tokens are text with a marker ("\u2581") for the space, and, with
  byte fallback, `<0x00>`..`<0xFF>` tokens for the bytes of characters that have no token;
- plain text: tokens are the text they match (a word-level split, for instance).
A tokenizer spells every text when nothing can be dropped or mapped to its unknown token: a complete byte
alphabet (byte level or byte fallback) and no step that removes characters.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

BYTE_ALPHABET_SIZE = 256
SENTENCEPIECE_SPACE = "\u2581"  # "▁", SentencePiece's marker for a space
BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a byte-fallback token: <0x0A> is the byte 10
# Pipeline steps that keep every character (anything else may drop some: measure instead of assuming).
KEEPING_NORMALIZERS = ("Prepend", "NFC")
KEEPING_PRE_TOKENIZERS = ("ByteLevel", "Metaspace", "Digits", "Split", "Punctuation")
SEQUENCE_KEYS = ("normalizers", "pretokenizers", "decoders")  # where a Sequence step lists its members


def steps(part: Any) -> Iterator[dict[str, Any]]:
    """The steps of one pipeline part (normalizer, pre_tokenizer, decoder), Sequences opened."""
    if not isinstance(part, dict):
        return
    members = next((part[key] for key in SEQUENCE_KEYS if isinstance(part.get(key), list)), None)
    if part.get("type") == "Sequence" and members is not None:
        for member in members:
            yield from steps(member)
    else:
        yield part


def is_byte_level(raw: dict[str, Any]) -> bool:
    """Whether tokens spell bytes through the byte-level alphabet (a ByteLevel pre-tokenizer or decoder)."""
    return any(step.get("type") == "ByteLevel" for part in ("pre_tokenizer", "decoder")
               for step in steps(raw.get(part)))


def space_marker(raw: dict[str, Any]) -> str | None:
    """The character that stands for a space in the tokens (SentencePiece's "▁"), if any."""
    for part in ("pre_tokenizer", "decoder"):
        for step in steps(raw.get(part)):
            if step.get("type") == "Metaspace":
                return step.get("replacement", SENTENCEPIECE_SPACE)
    for step in steps(raw.get("normalizer")):  # Llama-2: Replace(" " -> "▁")
        if step.get("type") == "Replace" and (step.get("pattern") or {}).get("String") == " ":
            return step.get("content")
    return None


def byte_level_alphabet() -> dict[str, int]:
    """Character -> byte of the ByteLevel pre-tokenizer, which spells each byte as one printable character
    (GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the rest are moved to 256+)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(BYTE_ALPHABET_SIZE) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(BYTE_ALPHABET_SIZE + n): b for n, b in enumerate(moved)})
    return table


def token_bytes_table(raw: dict[str, Any], vocab: dict[str, int], vocab_size: int) -> list[bytes]:
    """The bytes of text each id spells (b"" for special tokens, the unknown token and unused ids)."""
    model = raw.get("model") or {}
    added = {token["content"]: bool(token.get("special")) for token in raw.get("added_tokens") or []}
    unknown = model.get("unk_token")
    byte_level, marker = is_byte_level(raw), space_marker(raw)
    byte_of = byte_level_alphabet()
    prefix = model.get("continuing_subword_prefix") or ""
    suffix = model.get("end_of_word_suffix") or ""
    table = [b""] * vocab_size
    for token, token_id in vocab.items():
        if added.get(token) or token == unknown:
            continue
        if token in added:  # an added ordinary token matches its own text
            table[token_id] = token.encode("utf-8")
            continue
        if prefix and token.startswith(prefix):
            token = token[len(prefix):]
        if suffix and token.endswith(suffix):  # the end of a word: the decoder turns it into a space
            token = token[:-len(suffix)] + " "
        if byte_level and all(char in byte_of for char in token):
            table[token_id] = bytes(byte_of[char] for char in token)
        elif model.get("byte_fallback") and (match := BYTE_TOKEN.fullmatch(token)):
            table[token_id] = bytes([int(match.group(1), 16)])
        else:
            table[token_id] = (token.replace(marker, " ") if marker else token).encode("utf-8")
    return table


def spells_every_text(raw: dict[str, Any], vocab: dict[str, int]) -> bool:
    """Whether no text can lose a character: every byte has a token (byte level or byte fallback), no BPE
    dropout, and no step of the pipeline that removes characters."""
    model = raw.get("model") or {}
    if model.get("dropout"):
        return False
    if any(step.get("type") not in KEEPING_NORMALIZERS and not _space_replace(step)
           for step in steps(raw.get("normalizer"))):
        return False
    if any(step.get("type") not in KEEPING_PRE_TOKENIZERS or step.get("behavior") == "Removed"
           for step in steps(raw.get("pre_tokenizer"))):
        return False
    if is_byte_level(raw):
        return all(char in vocab for char in byte_level_alphabet())
    if model.get("byte_fallback"):
        return all(f"<0x{b:02X}>" in vocab for b in range(BYTE_ALPHABET_SIZE))
    return False


def _space_replace(step: dict[str, Any]) -> bool:
    """A normalizer that writes the space as a marker (Llama-2's Replace(" " -> "▁")): it keeps every character."""
    pattern = step.get("pattern") or {}
    return step.get("type") == "Replace" and pattern.get("String") == " " and bool(step.get("content"))
