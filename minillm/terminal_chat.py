"""`minillm chat RUN`: a conversation with a chat run in the terminal.

The history is kept and sent whole each turn (rendered by the run's chat template); answers stream as they
are made. Commands: /system TEXT sets the system message (/system alone removes it), /reset starts the
conversation over (the system message stays); Ctrl-C stops an answer (what it said so far stays in the
history), Ctrl-C at the prompt clears the line, Ctrl-D quits. When the history no longer fits the model's
context with room for an answer, its oldest turns are left out for good, and the chat says so.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import TextIO

from minillm.checkpoint import Run
from minillm.engine import Engine
from minillm.errors import MiniLLMError, describe_error
from minillm.generation import stream_reply
from minillm.models import count_parameters
from minillm.sampling import SamplingConfig
from minillm.tokenizers.chat_template import Message

USER_PROMPT = "you> "
ANSWER_PROMPT = "bot> "
SYSTEM_COMMAND, RESET_COMMAND = "/system", "/reset"
HELP = (f"{SYSTEM_COMMAND} TEXT sets the system message, {RESET_COMMAND} starts over, Ctrl-C stops an answer, "
        "Ctrl-D quits")


class TerminalChat:
    """One conversation with a run: its history and the loop that reads the user's lines (`read`, like input())
    and writes the answers to `out`."""

    def __init__(self, run: Run, sampling: SamplingConfig, engine: Engine | None = None, system: str | None = None,
                 read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
        if run.tokenizer.chat_template is None:
            raise MiniLLMError(f"{run.folder.path} has no chat template: it was not trained on conversations; "
                               "train one on a JSONL file of {\"messages\": [...]} lines (--task chat), or use "
                               "`minillm generate` to continue text")
        self.run, self.sampling, self.engine = run, sampling, engine or Engine(run.model)
        self.system = system or ""
        self.turns: list[Message] = []  # the user's and the assistant's messages, oldest first
        self.read, self.out = read, out

    @property
    def messages(self) -> list[Message]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.turns]

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def loop(self) -> None:
        """Read, answer, until Ctrl-D (end of input)."""
        c = self.run.config
        self.say(f"chatting with {self.run.folder.path} ({count_parameters(self.run.model) / 1e6:.2f}M parameters, "
                 f"context {c.max_seq_len} tokens); {HELP}")
        if self.system:
            self.say(f"(system: {self.system})")
        while True:
            try:
                line = self.read(USER_PROMPT)
            except EOFError:
                self.say("")
                return
            except KeyboardInterrupt:
                self.say("\n(Ctrl-D quits)")
                continue
            self.handle(line.strip())

    def handle(self, line: str) -> None:
        """One line of the user's: a command, or a message to answer."""
        if not line:
            return
        if line == RESET_COMMAND:
            self.turns = []
            self.say("(the conversation starts over" + (", with the same system message)" if self.system else ")"))
        elif line == SYSTEM_COMMAND or line.startswith(SYSTEM_COMMAND + " "):
            self.system = line[len(SYSTEM_COMMAND):].strip()
            self.say(f"(system: {self.system})" if self.system else "(no system message)")
        elif line.startswith("/"):
            self.say(f"(unknown command {line.split()[0]}: {HELP})")
        else:
            self.answer(line)

    def answer(self, text: str) -> None:
        """Add the user's message, stream the answer into the history (Ctrl-C stops it where it is)."""
        self.turns.append({"role": "user", "content": text})
        try:
            tokens = stream_reply(self.run.model, self.run.tokenizer, self.messages, self.sampling, self.engine)
        except MiniLLMError as e:
            self.turns.pop()
            self.say(f"error: {describe_error(e)}")
            return
        if tokens.dropped:
            self.turns = self.turns[tokens.dropped:]
            self.say(f"(the conversation no longer fits the model's {self.run.config.max_seq_len}-token context: "
                     f"its {tokens.dropped} oldest message(s) are left out)")
        self.out.write(ANSWER_PROMPT)
        self.out.flush()
        reply, stopped = "", False
        try:
            for _, chunk in tokens:
                reply += chunk
                self.out.write(chunk)
                self.out.flush()
        except KeyboardInterrupt:
            stopped = True
        finally:
            with contextlib.suppress(KeyboardInterrupt):
                tokens.close()
        self.turns.append({"role": "assistant", "content": reply})
        self.say(" (stopped)" if stopped else "")


def enable_line_editing() -> None:
    """Arrow keys and a history of the lines typed, where the terminal has them (readline)."""
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (importing it is what makes input() edit lines)
