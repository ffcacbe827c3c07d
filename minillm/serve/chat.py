"""A chat request's prompt: the conversation rendered with the run's chat template, and the ids that end the
assistant's turn. The one place the HTTP API meets the chat templates (minillm.tokenizers' `chat_template`).

SEAM (issue 22 builds the templates on another branch): this reads the template through three members of
the run's tokenizer, `chat_template` (None for a run trained on plain text), `apply_chat_template(messages,
add_generation_prompt=True)` (the token ids) and `chat_stop_ids()` (end of turn, end of text). Until a
tokenizer has them every run counts as one without a template, and a chat request is refused as such.
"""

from __future__ import annotations

from minillm.checkpoint import Run
from minillm.errors import MiniLLMError
from minillm.serve.api_requests import APIError


def has_chat_template(run: Run) -> bool:
    return getattr(run.tokenizer, "chat_template", None) is not None


def chat_prompt(run: Run, model: str, messages: list[dict[str, str]]) -> tuple[list[int], tuple[int, ...]]:
    """(prompt ids, stop ids) of `messages` for the run served as `model`; APIError 400 when the run has no
    chat template (it was not trained on conversations) or the template refuses the messages."""
    if not has_chat_template(run):
        raise APIError(400, f"model {model!r} has no chat template: it was trained on plain text, not on "
                            "conversations, so it cannot take chat messages; use /v1/completions with a text "
                            "prompt, or train a run on a conversation file to chat with it", "messages",
                       "no_chat_template")
    tokenizer = run.tokenizer
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        stops = tuple(tokenizer.chat_stop_ids())
    except MiniLLMError as e:
        raise APIError(400, str(e), "messages") from None
    return list(ids), stops
