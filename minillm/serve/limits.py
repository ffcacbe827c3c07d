"""What one server lets its clients ask for: its own caps, tighter than the sampler's (which say what is
computable at all), so that one client cannot hold the machine. The web UI applies them to every request
from its page or its API; an HTTP server takes the same ones (and may set them from its options).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from minillm.errors import MiniLLMError
from minillm.sampling import SamplingConfig

# A request without a seed gets one drawn from [0, MAX_DRAWN_SEED] and is told which, so any output can be
# made again (small enough to read and type back; the sampler takes any seed up to its own MAX_SEED).
MAX_DRAWN_SEED = 2**31 - 1


@dataclass(frozen=True)
class ServerLimits:
    """A server's caps. A request beyond one is refused with a line that names the cap."""

    max_new_tokens: int = 1000  # per generation
    max_prompt_chars: int = 20_000  # per text a request sends (a prompt, a source)
    max_loaded_runs: int = 4  # distinct runs kept in memory (each costs its weights: 4 bytes per parameter)
    # Generations one client (a page's tab, an API client) may run at once; beyond it a request is refused
    # at once, so a client that queues many cannot hold the server's few workers while others wait.
    generations_per_client: int = 1
    # An API request's generations (its prompts times n): each takes a row of the batch or a place in its queue.
    max_choices: int = 16
    max_body_bytes: int = 1_000_000  # an API request's body (the prompt limit, in JSON, with room to spare)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MiniLLMError(f"the server limit {field.name} must be a whole number of at least 1, "
                                   f"got {value!r}")

    def check_generation(self, prompt: str, source: str | None, sampling: SamplingConfig) -> SamplingConfig:
        """The request's settings once they are within these caps (refused otherwise, MiniLLMError); a
        missing seed is drawn, so the caller can report it."""
        for name, text in (("prompt", prompt), ("source", source)):
            if len(text or "") > self.max_prompt_chars:
                raise MiniLLMError(f"the {name} is {len(text):,} characters; the limit is "
                                   f"{self.max_prompt_chars:,}")
        if sampling.max_new_tokens > self.max_new_tokens:
            raise MiniLLMError(f"max_new_tokens is at most {self.max_new_tokens} on this server, got "
                               f"{sampling.max_new_tokens}")
        if sampling.seed is None:
            sampling = dataclasses.replace(sampling, seed=random.randint(0, MAX_DRAWN_SEED))
        return sampling
