"""`minillm chat RUN` in a real pseudo-terminal: a subprocess whose controlling terminal is the pty, driven by
typing into it (Ctrl-C is the terminal's own interrupt character, Ctrl-D its end of input)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import torch

from minillm.checkpoint import load_run, read_model_config, save_best
from minillm.generation import stream_reply
from minillm.models import build_model
from minillm.run_folder import RunFolder
from minillm.sampling import SamplingConfig
from minillm.tokenizers.chat_template import END_OF_TURN

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 60  # the longest a step may take (the first one imports torch)
CTRL_C, CTRL_D = b"\x03", b"\x04"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")
MAX_NEW_TOKENS = 12
ENDLESS_LOGIT_SCALE = 10.0
PROMPT_PAUSE_S = 1.0
PROMPT_CTRL_C_TRIES = 5  # Ctrl-Cs at the prompt before the test gives up (see interrupt_at_prompt)
SYSTEM = "You are a calculator."


def _controlling_terminal() -> None:
    """In the child, after setsid: the pty (its stdin) becomes its controlling terminal, so Ctrl-C signals it;
    and Ctrl-C is not ignored, as a terminal's shell leaves it (a test run started in the background of a
    non-interactive shell ignores SIGINT, and Python then installs no KeyboardInterrupt for it)."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """A subprocess on a pseudo-terminal: what it wrote (escapes dropped, "\\r\\n" as "\\n"), and typing."""

    def __init__(self, args: list[str]) -> None:
        master, slave = pty.openpty()
        env = {**os.environ, "TERM": "dumb"}  # (no bracketed-paste escapes from readline)
        self.process = subprocess.Popen([sys.executable, "-m", "minillm", *args], stdin=slave, stdout=slave,
                                        stderr=slave, cwd=REPO, env=env, start_new_session=True,
                                        preexec_fn=_controlling_terminal)
        os.close(slave)
        self.master, self.raw, self.seen = master, b"", 0

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode("utf-8", "replace")).replace("\r\n", "\n").replace("\r", "")

    def read_until(self, pattern: str, wait: float = WAIT_S) -> str:
        """Read until `pattern` appears after what was read before (within `wait` seconds); returns the text
        up to its end."""
        deadline = time.monotonic() + wait
        while True:
            found = re.search(pattern, self.text[self.seen:])
            if found:
                chunk = self.text[self.seen:self.seen + found.end()]
                self.seen += found.end()
                return chunk
            if time.monotonic() > deadline or not self._read(0.2):
                raise AssertionError(f"no {pattern!r} in the chat's output:\n{self.text[-2000:]}")

    def _read(self, timeout: float) -> bool:
        """Read what is there (False once the terminal is closed and drained)."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return self.process.poll() is None or time.sleep(0) is None
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed its end
            return False
        self.raw += data
        return bool(data)

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> int:
        """Wait for the process to end (killed after WAIT_S); its exit status."""
        deadline = time.monotonic() + WAIT_S
        while self.process.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        if self.process.poll() is None:
            self.process.kill()
        status = self.process.wait()
        os.close(self.master)
        return status


def interrupt_at_prompt(terminal: Terminal) -> str:
    """Ctrl-C at the prompt, typed a moment after it shows, as a person would, and again if the chat did not
    react: CPython's readline misses a SIGINT that comes between its prompt and its wait for keys (it waits
    on select() with no timeout and looks at signals only when select() is interrupted), which a loaded
    machine makes likely; a person then presses Ctrl-C again. What the chat wrote up to its next prompt."""
    for _ in range(PROMPT_CTRL_C_TRIES):
        time.sleep(PROMPT_PAUSE_S)
        terminal.type(CTRL_C)
        with contextlib.suppress(AssertionError):
            return terminal.read_until("you> ", wait=3 * PROMPT_PAUSE_S)
    raise AssertionError(f"{PROMPT_CTRL_C_TRIES} Ctrl-Cs at the prompt had no effect:\n{terminal.text[-2000:]}")


def answer_to(run, messages: list[dict]) -> str:
    sampling = SamplingConfig(temperature=0, max_new_tokens=MAX_NEW_TOKENS)
    return "".join(text for _, text in stream_reply(run.model, run.tokenizer, messages, sampling))


@pytest.fixture
def untrained_chat_run(chat_run, tmp_path) -> Path:
    """The chat run with an untrained model, scaled up for peaked logits: its answers depend on the whole
    conversation, and it never ends a turn (all-zero rows for the special tokens in its tied output layer: the
    end of a turn, of the text, the role markers, which show no text; greedy decoding never picks them)."""
    config, meta = read_model_config(RunFolder(chat_run).best_config)
    tokenizer = load_run(chat_run).tokenizer
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(ENDLESS_LOGIT_SCALE)
        for spelling, token_id in tokenizer.special_tokens().items():
            if spelling != "<|unk|>":  # (it shows, as U+FFFD)
                model.lm_head.weight[token_id] = 0.0
    endless = tmp_path / "endless"
    save_best(endless, model, config, meta["tokenizer_type"], {"step": 0, "val_loss": None})
    for name in ("tokenizer.json", "special_tokens.json", "chat_template.jinja"):
        shutil.copy(RunFolder(chat_run).path / name, endless / name)
    assert END_OF_TURN in tokenizer.special_tokens()
    return endless


def test_three_turns_keep_the_history_and_reset_starts_over(untrained_chat_run):
    run = load_run(untrained_chat_run)
    terminal = Terminal(["chat", str(untrained_chat_run), "--system", SYSTEM, "--temperature", "0", "--max-new-tokens",
                         str(MAX_NEW_TOKENS)])
    try:
        assert "/reset starts over" in terminal.read_until("you> ")
        history = [{"role": "system", "content": SYSTEM}]
        for question in ("What is 2 + 3?", "Add 10 and 4.", "How many m are 3 km?"):
            terminal.type(question.encode() + b"\n")
            said = terminal.read_until(r"bot> (.*)\nyou> ")
            answer = re.search(r"bot> (.*)\nyou> ", said).group(1)
            history.append({"role": "user", "content": question})
            assert answer == answer_to(run, history)  # the answer to the whole history, streamed as it came
            assert len(history) == 2 or answer != answer_to(run, [history[0], history[-1]])  # (it tells)
            history.append({"role": "assistant", "content": answer})
        terminal.type(b"/reset\n")
        assert "(the conversation starts over, with the same system message)" in terminal.read_until("you> ")
        terminal.type(b"Add 10 and 4.\n")
        said = terminal.read_until(r"bot> (.*)\nyou> ")
        assert re.search(r"bot> (.*)\nyou> ", said).group(1) == answer_to(run, [history[0], history[3]])
        terminal.type(CTRL_D)
    finally:
        status = terminal.close()
    assert status == 0


def test_ctrl_c_stops_an_answer_and_ctrl_d_quits(untrained_chat_run):
    terminal = Terminal(["chat", str(untrained_chat_run), "--temperature", "0", "--max-new-tokens", "1000000"])
    try:
        terminal.read_until("you> ")
        # At the prompt: the line is dropped, the chat goes on.
        assert "(Ctrl-D quits)" in interrupt_at_prompt(terminal)
        terminal.type(b"What is 2 + 3?\n")
        terminal.read_until(r"bot> .{20}")  # the answer is streaming (it would go on for a million tokens)
        terminal.type(CTRL_C)
        said = terminal.read_until(r" \(stopped\)\nyou> ")
        assert len(said) < 100_000
        terminal.type(b"/reset\n")
        assert "(the conversation starts over)" in terminal.read_until("you> ")
        terminal.type(CTRL_D)
    finally:
        status = terminal.close()
    assert status == 0


def test_a_history_longer_than_the_context_loses_its_oldest_turns_and_says_so(untrained_chat_run):
    """(The loop itself, without a terminal: typed lines from a list, the output in a string.)"""
    import io

    from minillm.terminal_chat import TerminalChat

    run = load_run(untrained_chat_run)
    lines = iter(["What is 2 + 3?", "Add 10 and 4.", "How many m are 3 km?", "Take 6 from 19."])

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    chat = TerminalChat(run, SamplingConfig(temperature=0, max_new_tokens=MAX_NEW_TOKENS), system=SYSTEM,
                        read=read, out=out)
    chat.loop()
    said = out.getvalue()
    # Each exchange is about 30 tokens, and the 128-token context keeps 116 for the prompt.
    assert "(the conversation no longer fits the model's 128-token context: its 2 oldest message(s) are left out)" \
        in said
    assert chat.turns[0] == {"role": "user", "content": "Add 10 and 4."} and len(chat.turns) == 6
    assert said.count("bot> ") == 4
