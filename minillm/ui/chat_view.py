"""The chat view of the Generate tab, shown for a run with a chat template (trained on conversations): a
conversation (gr.Chatbot) with its history, the answers streaming in, Stop (ends an answer between two
tokens, the text so far stays) and Clear (starts over).

Each answer is the library's `stream_reply` through the run's scheduler (ServedRun.reply), with the tab's
sampling settings: the history (the chatbot's messages, after an optional system message) rendered by the
run's chat template, cut from its oldest turns when it no longer fits the context (the note under the
conversation says so), stopped at the end of the turn. The session's stop flag and generation limit are the Generate
tab's: one generation per client at a time, whichever box started it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from minillm.errors import MiniLLMError
from minillm.sampling import SamplingConfig
from minillm.serve.limits import ServerLimits
from minillm.serve.sessions import Session, Sessions
from minillm.ui.shared import client_of, error_box, no_error

SEND_LABEL, ANSWERING_LABEL = "Send", "Answering…"
NO_CHAT_MESSAGE = "this run has no chat template: it was not trained on conversations; use the Generate box"


def message_text(content: Any) -> str:
    """The text of a chatbot message's content (a string, or Gradio's list of {"type": "text", ...} parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return ""


def conversation(history: list[dict], system: str) -> list[dict[str, str]]:
    """The messages a chatbot's history stands for, after the system message (if any)."""
    messages = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    return messages + [{"role": m["role"], "content": message_text(m.get("content"))} for m in history or []
                       if m.get("role") in ("user", "assistant")]


class ChatView:
    """The view's components (made inside the Generate tab's column) and its handlers. `read_settings`: the
    tab's sampling inputs as a SamplingConfig; `error`: the tab's error box."""

    def __init__(self, sessions: Sessions, limits: ServerLimits, read_settings: Callable[..., SamplingConfig],
                 error: gr.Markdown, stream_interval: float) -> None:
        self.sessions, self.limits, self.read_settings = sessions, limits, read_settings
        self.error, self.stream_interval = error, stream_interval
        self._cleared: set[str] = set()  # clients that pressed Clear during an answer: it is not shown again
        self._cleared_lock = threading.Lock()
        with gr.Column(visible=False, elem_id="chat_view") as self.column:
            gr.Markdown("## Chat\nThis run was trained on conversations: talk with it (the sampling settings below "
                        "apply).")
            self.chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=320, buttons=["copy"])
            self.note = gr.Markdown(elem_id="chat_note")
            self.system = gr.Textbox(label="System message (optional, as in the training data)", max_lines=2,
                                     elem_id="chat_system")
            self.message = gr.Textbox(label="Message", placeholder="Write a message and press Enter", max_lines=4,
                                      elem_id="chat_message")
            with gr.Row():
                self.send_button = gr.Button(SEND_LABEL, variant="primary", elem_id="chat_send")
                self.stop_button = gr.Button("Stop", variant="stop", elem_id="chat_stop")
                self.clear_button = gr.Button("Clear", elem_id="chat_clear")

    def wire(self, quick: dict[str, Any], settings: list[gr.Component]) -> None:
        """The view's events; `settings`: the tab's sampling inputs (the order read_settings takes them)."""
        for trigger, api_name in ((self.send_button.click, "chat"), (self.message.submit, False)):
            trigger(self.start, None, self.send_button, api_name=False, **quick).then(
                self.answer, [self.message, self.chatbot, self.system, *settings],
                [self.chatbot, self.message, self.note, self.error], api_name=api_name, show_progress="minimal",
            ).then(self.finish, None, self.send_button, api_name=False, **quick)
        self.stop_button.click(self.stop, None, None, api_name="chat_stop", **quick)
        self.clear_button.click(self.clear, None, [self.chatbot, self.note], api_name="chat_clear", **quick)

    # ---- handlers -------------------------------------------------------------------------------------

    def start(self, request: gr.Request | None = None) -> dict:
        """At the click: a Stop pressed from now on ends the answer; Send waits for it."""
        session = self.sessions.get(client_of(request))
        session.stop.clear()
        session.generating = True
        with self._cleared_lock:
            self._cleared.discard(session.id)
        return gr.update(value=ANSWERING_LABEL, interactive=False)

    def finish(self) -> dict:
        return gr.update(value=SEND_LABEL, interactive=True)

    def stop(self, request: gr.Request | None = None) -> None:
        """End this client's answer after its current token (what it said stays in the conversation)."""
        session = self.sessions.get(client_of(request))
        if session.generating:
            session.stop.set()

    def clear(self, request: gr.Request | None = None) -> dict:
        """Start the conversation over (an answer still running is stopped, and not shown again)."""
        session = self.sessions.get(client_of(request))
        if session.generating:
            with self._cleared_lock:
                self._cleared.add(session.id)
            session.stop.set()
        return {self.chatbot: [], self.note: ""}

    def answer(self, message: str, history: list[dict], system: str, max_new_tokens: Any, temperature: Any,
               top_k: Any, top_p: Any, repetition_penalty: Any, seed: Any,
               request: gr.Request | None = None) -> Iterator[dict]:
        """Add the user's message to the conversation and stream the answer into it (the settings: the tab's
        sampling inputs; named, not *args, so that Gradio passes the request)."""
        session = self.sessions.get(client_of(request))
        if not session.begin_generation(self.limits.generations_per_client):
            yield {self.error: error_box("this session is already generating: wait for it, or press Stop")}
            return
        settings = (max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
        try:
            yield from self._answer_steps(session, message, history or [], system, settings)
        finally:
            session.end_generation()

    def _answer_steps(self, session: Session, message: str, history: list[dict], system: str,
                      settings: tuple) -> Iterator[dict]:
        tokens = None
        try:
            served = session.run
            if served is None:
                raise MiniLLMError("no model loaded yet: pick a chat run, then press Load model")
            if served.run.tokenizer.chat_template is None:
                raise MiniLLMError(NO_CHAT_MESSAGE)
            if not message or not message.strip():
                raise MiniLLMError("write a message first")
            sampling = self.limits.check_generation(message, None, self.read_settings(*settings))
            messages = [*conversation(history, system), {"role": "user", "content": message}]
            tokens = served.reply(messages, sampling)
        except Exception as e:
            yield {self.error: error_box(e)}
            return
        shown = [*history, {"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        note = (f"The {tokens.dropped} oldest message(s) no longer fit the model's {served.run.config.max_seq_len}"
                "-token context: the answer does not see them." if tokens.dropped else "")
        yield {self.chatbot: list(shown), self.message: "", self.note: note, self.error: no_error()}
        reply, last_update = "", time.perf_counter()
        try:
            for _, chunk in tokens:
                reply += chunk
                if time.perf_counter() - last_update >= self.stream_interval:
                    shown[-1] = {"role": "assistant", "content": reply}
                    yield {self.chatbot: list(shown)}  # (a copy: each update is its own value)
                    last_update = time.perf_counter()
                if session.stop.is_set():  # (Stop, or Clear, of this client)
                    break
        except Exception as e:
            yield {self.error: error_box(e)}
        finally:
            tokens.close()
        with self._cleared_lock:
            cleared = session.id in self._cleared
            self._cleared.discard(session.id)
        shown[-1] = {"role": "assistant", "content": reply}
        yield {self.chatbot: [] if cleared else shown}
