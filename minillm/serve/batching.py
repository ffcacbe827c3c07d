"""Many clients' generations from one run, decoded together: a `BatchScheduler` per loaded run drives its
minillm.batch_engine.BatchEngine in a thread of its own.

    scheduler = BatchScheduler(model, BatchSettings(max_rows=16, max_waiting=64))
    ticket = scheduler.submit([generation], [deliver])[0]  # deliver(update) is called from the thread
    ticket.cancel()                                           # the client went away: its row leaves
    for token in scheduler.stream(prompt_ids, sampling, eos_id=eos_id): ...  # one generation, as Engine.stream


Between two decode steps, rows that ended or were cancelled leave and waiting generations join (each
prefilled into a free slot), so a short generation that arrives while a long one runs is served at once,
not after it. Beyond `max_rows` rows in flight, generations wait in a bounded queue (first come, first
served); beyond that a submit is refused (QueueFull) rather than left to wait without end. The thread runs
while there is work and ends when there is none, so a run that the cache unloads holds no thread.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch

from minillm.batch_engine import BatchEngine, Generation, Row, Token
from minillm.errors import MiniLLMError, describe_error, log
from minillm.models.decoding import DecodingModel
from minillm.sampling import SamplingConfig

DEFAULT_MAX_ROWS = 16  # generations decoded together per run (--max-batch)
WAITING_PER_ROW = 4  # the queue holds this many generations per row in flight, by default


class QueueFull(MiniLLMError):
    """The run's batch and its queue are full: the client should retry later (HTTP 429)."""


@dataclass(frozen=True)
class BatchSettings:
    """How many generations of one run are decoded together, how many may wait for a row, and whether the
    batched decode step is compiled (in the background: steps run eagerly until it is ready)."""

    max_rows: int = DEFAULT_MAX_ROWS
    max_waiting: int = DEFAULT_MAX_ROWS * WAITING_PER_ROW
    compile: bool = False

    def __post_init__(self) -> None:
        if self.max_rows < 1 or self.max_waiting < 0:
            raise MiniLLMError(f"--max-batch must be at least 1 (got {self.max_rows}) and --max-queue at least 0 "
                               f"(got {self.max_waiting})")


class CompileState(str, Enum):
    """Where a scheduler's background compile of its decode steps is (BatchScheduler.compile_state)."""

    OFF = "off"  # not asked for: every step runs eagerly
    COMPILING = "compiling"  # in the background: steps run eagerly until it is ready
    COMPILED = "compiled"  # every batch size has its compiled step
    FAILED = "failed"  # compile_error says why; steps go on eagerly


@dataclass
class Update:
    """What a generation made since its last update, delivered from the scheduler's thread.

    tokens: its new tokens (a stop id that ended it is not among them); done: it ended (stopped_by: the stop
    id, or None when it made its max_new_tokens); prompt_logprobs: with the first update of a generation
    that asked for them; error: it failed (one line), and is done."""

    tokens: list[Token] = field(default_factory=list)
    done: bool = False
    stopped_by: int | None = None
    prompt_logprobs: list[Token] = field(default_factory=list)
    error: str | None = None


Deliver = Callable[[Update], None]


class Ticket:
    """A submitted generation, as its submitter holds it: cancel() makes its row leave at the next step."""

    def __init__(self, generation: Generation, deliver: Deliver) -> None:
        self.generation, self.deliver = generation, deliver
        self.cancelled = False
        self.row: Row | None = None

    def cancel(self) -> None:
        self.cancelled = True  # read by the scheduler's thread between steps


class BatchScheduler:
    """Decodes the generations submitted for one model, up to max_rows at a time, in a thread of its own."""

    def __init__(self, model: DecodingModel, limits: BatchSettings | None = None) -> None:
        self.limits = limits or BatchSettings()
        self.model = model
        self.engine = BatchEngine(model, self.limits.max_rows)
        self._waiting: deque[Ticket] = deque()
        self._running: list[Ticket] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps made (a step decodes every row in flight)
        self.compile_error: str | None = None
        if self.limits.compile:
            threading.Thread(target=self._compile, name="minillm-compile", daemon=True).start()

    def _compile(self) -> None:
        """Compile the engine's decode steps (in the background: steps run eagerly meanwhile)."""
        try:
            self.engine.compile_steps()
        except Exception as e:  # a missing C++ compiler, an unsupported op: the eager steps go on serving
            self.compile_error = describe_error(e)
            log.warning("compiling the batched decode step failed; serving without it: %s", self.compile_error)

    @property
    def compile_state(self) -> CompileState:
        if not self.limits.compile:
            return CompileState.OFF
        if self.compile_error is not None:
            return CompileState.FAILED
        return CompileState.COMPILED if self.engine.compiled else CompileState.COMPILING

    def load(self) -> tuple[int, int]:
        """(rows in flight, generations waiting) now."""
        with self._lock:
            return len(self._running), len(self._waiting)

    def submit(self, generations: Sequence[Generation], delivers: Sequence[Deliver]) -> list[Ticket]:
        """Queue generations (all or none: one request's choices); QueueFull when they do not fit."""
        tickets = [Ticket(g, d) for g, d in zip(generations, delivers, strict=True)]
        with self._lock:
            room = self.limits.max_rows - len(self._running) + self.limits.max_waiting - len(self._waiting)
            if len(tickets) > room:
                raise QueueFull(f"the server is busy: {len(self._running)} generations are running and "
                                f"{len(self._waiting)} waiting for this model; retry in a moment")
            self._waiting.extend(tickets)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="minillm-batch", daemon=True)
                self._thread.start()
        return tickets

    def stream(self, prompt_ids: torch.Tensor, sampling: SamplingConfig, *, source_ids: torch.Tensor | None = None,
               eos_id: int | Sequence[int] | None = None) -> Iterator[torch.Tensor]:
        """One generation decoded in the batch, yielded as Engine.stream yields a batch of one: a (1,) tensor
        of each new token id, the stop id that ended it last. So minillm.generation's stream_tokens and
        stream_reply take the scheduler as their engine. prompt_ids (1, T), source_ids (1, S): as
        Engine.stream's. Closing the iterator makes its row leave the batch; QueueFull when it cannot wait."""
        if prompt_ids.shape[0] != 1 or (source_ids is not None and source_ids.shape[0] != 1):
            raise MiniLLMError("a scheduler streams one generation at a time: give a batch of one prompt")
        stops = () if eos_id is None else (eos_id,) if isinstance(eos_id, int) else tuple(eos_id)
        source = None if source_ids is None else source_ids[0].tolist()
        return self._stream(Generation(prompt_ids[0].tolist(), sampling, source, tuple(int(i) for i in stops)))

    def _stream(self, generation: Generation) -> Iterator[torch.Tensor]:
        updates: queue.SimpleQueue[Update] = queue.SimpleQueue()
        [ticket] = self.submit([generation], [updates.put])
        try:
            while True:
                update = updates.get()  # delivered by the scheduler's thread, which ends every row it takes
                if update.error is not None:
                    raise MiniLLMError(update.error)
                for token in update.tokens:
                    yield torch.tensor([token.id])
                if update.done:
                    if update.stopped_by is not None:
                        yield torch.tensor([update.stopped_by])
                    return
        finally:
            ticket.cancel()  # a caller that stopped early: the row leaves at the next step

    def _run(self) -> None:
        while True:
            with self._lock:
                left = [t for t in self._running if t.cancelled]
                self._running = [t for t in self._running if not t.cancelled]
                self._waiting = deque(t for t in self._waiting if not t.cancelled)
                joining = []  # counted as running from here: submit's room is right while they prefill
                while self._waiting and len(self._running) < self.limits.max_rows:
                    joining.append(self._waiting.popleft())
                    self._running.append(joining[-1])
                if not self._running and not joining and not left:
                    self._thread = None  # submit starts another when work comes
                    return
            try:
                self._work(left, joining)
            except Exception as e:  # a failed step: its rows end with the error, the next ones get a new batch
                self._fail(e)

    def _work(self, left: list[Ticket], joining: list[Ticket]) -> None:
        for ticket in left:
            if ticket.row is not None:
                self.engine.remove(ticket.row)
        for ticket in joining:
            try:
                ticket.row, made = self.engine.add(ticket.generation)
            except MiniLLMError as e:  # this generation's input: it alone fails
                with self._lock:
                    self._running.remove(ticket)
                _send(ticket, Update(done=True, error=describe_error(e)))
                continue
            self._deliver(ticket, made, first=True)
        if self.engine.rows:
            by_row = {id(t.row): t for t in self._running}
            made = self.engine.step()
            self.steps += 1
            for row, tokens in made:
                self._deliver(by_row[id(row)], tokens)
        with self._lock:
            self._running = [t for t in self._running if not t.row.done]

    @staticmethod
    def _deliver(ticket: Ticket, made: list[Token], first: bool = False) -> None:
        row = ticket.row
        tokens = made[:-1] if row.stopped_by is not None else made  # the stop id is not text
        _send(ticket, Update(tokens, row.done, row.stopped_by, row.prompt_logprobs if first else []))

    def _fail(self, error: Exception) -> None:
        """A step failed: its rows end with the error (one line; a bug's traceback goes to the log) and leave,
        and the next generations start afresh."""
        line = describe_error(error)
        with self._lock:
            failed, self._running = self._running, []
        try:
            for row in list(self.engine.rows):
                self.engine.remove(row)
        except Exception:  # the batch's state is beyond repair: a new one
            self.engine = BatchEngine(self.engine.model, self.limits.max_rows)
        for ticket in failed:
            _send(ticket, Update(done=True, error=line))


def _send(ticket: Ticket, update: Update) -> None:
    try:
        ticket.deliver(update)
    except Exception:  # its receiver is gone (a closed connection's loop): only its row stops
        ticket.cancel()
