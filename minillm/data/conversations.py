"""Conversation files: JSON lines in OpenAI's fine-tuning format (what Hugging Face TRL and most tools read),
one conversation a line:

    {"messages": [{"role": "system", "content": "You add numbers."},
                  {"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]}

Roles are system, user and assistant; an assistant message may carry "weight": 0 to be left out of the loss.
A bad line (not JSON, no "messages", a message without a role or content, an unknown role, no assistant
message to learn) is one error naming its line number, or, with `skip_bad_lines`, left out and counted.
"""

from __future__ import annotations

import json
from pathlib import Path

from minillm.errors import MiniLLMError
from minillm.tokenizers.chat_template import Message, check_messages, learned_turns

MESSAGES_KEY = "messages"
MIN_CONVERSATIONS = 3  # one for each of train, val and test
SKIPPED_SHOWN = 3  # the bad lines a warning names (the rest are counted)
SKIP_HINT = "fix or remove that line, or pass --skip-bad-lines to leave bad lines out"

Conversation = list[Message]


def is_conversation_line(line: str) -> bool:
    """Whether a line is a JSON object with a "messages" key (the mark of a conversation file)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and MESSAGES_KEY in obj


def looks_like_conversations(text: str) -> bool:
    """Whether a JSON-lines text holds conversations: its first line that is a JSON object has "messages"."""
    for line in text.split("\n"):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return MESSAGES_KEY in obj
    return False


def read_conversation(line: str, where: str) -> Conversation:
    """The checked messages of one line; a MiniLLMError says what is wrong with it (starting with `where`)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise MiniLLMError(f"{where} is not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get(MESSAGES_KEY), list):
        raise MiniLLMError(f"{where} has no \"{MESSAGES_KEY}\" list (a conversation line is "
                           "{\"messages\": [{\"role\": ..., \"content\": ...}, ...]})")
    messages = check_messages(obj[MESSAGES_KEY], where)
    if not learned_turns(messages):
        raise MiniLLMError(f"{where} has no assistant message to learn (with weight 1): nothing to train on")
    return messages


def parse_conversations(path: str | Path, text: str, skip_bad_lines: bool = False,
                        notes: list[str] | None = None) -> list[Conversation]:
    """The conversations of a JSON-lines text (blank lines skipped). A bad line is a MiniLLMError naming it,
    or with `skip_bad_lines` it is left out, and a warning in `notes` counts and names them."""
    conversations, skipped = [], []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            conversations.append(read_conversation(line, f"{path} line {number}"))
        except MiniLLMError as e:
            if not skip_bad_lines:
                raise MiniLLMError(f"{e}; {SKIP_HINT}") from None
            skipped.append(str(e).removeprefix(f"{path} "))
    if skipped and notes is not None:
        shown = "; ".join(skipped[:SKIPPED_SHOWN]) + ("; ..." if len(skipped) > SKIPPED_SHOWN else "")
        notes.append(f"warning: left out {len(skipped):,} bad line(s) of {path} (--skip-bad-lines): {shown}")
    if len(conversations) < MIN_CONVERSATIONS:
        left = f" ({len(skipped):,} bad lines left out)" if skipped else ""
        raise MiniLLMError(f"{path} has {len(conversations)} conversation(s){left}; at least {MIN_CONVERSATIONS} "
                           "are needed (train, val, test)")
    return conversations


def conversation_chars(conversation: Conversation) -> int:
    """The characters of a conversation's messages."""
    return sum(len(m["content"]) for m in conversation)
