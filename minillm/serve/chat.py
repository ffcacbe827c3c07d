"""A chat request's prompt: the conversation rendered with the run's chat template, and the ids that end the
assistant's turn. The one place the HTTP API meets the chat templates (minillm.tokenizers' `chat_template`).

The template comes from the run (a chat run's chat_template.jinja, see minillm.tokenizers); a run trained on
plain text has none, and a chat request to it is refused as such.
"""

from __future__ import annotations

from minillm.checkpoint import Run
from minillm.errors import MiniLLMError
from minillm.serve.api_requests import APIError


def has_chat_template(run: Run) -> bool:
    return run.tokenizer.chat_template is not None


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
