"""The requests of Mini LLM's OpenAI-compatible API, read and checked: a JSON body in, a typed request out, or
an `APIError` that names the parameter (HTTP 400), never a silently ignored setting.

The parameters and their defaults are OpenAI's (a completion's max_tokens 16, temperature 1, top_p 1);
Mini LLM's own sampling settings `top_k` and `repetition_penalty` are extra fields, off by default, and so is
`ignore_eos` (vLLM's name: generate max_tokens whatever the model says, for benchmarks). A
parameter OpenAI defines that Mini LLM cannot honour (presence_penalty other than 0, tools, ...) is refused
by name, as is a parameter nobody defines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from minillm.errors import MiniLLMError
from minillm.sampling import MAX_SEED, SamplingConfig
from minillm.serve.limits import ServerLimits

COMPLETION_MAX_TOKENS = 16  # OpenAI's default for a completion
MAX_STOPS = 4  # stop strings per request (OpenAI's limit)
MAX_STOP_CHARS = 200  # characters per stop string
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's chat limit)
MAX_MESSAGES = 1000  # messages per chat request (their text is bounded by max_prompt_chars)
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

# Parameters OpenAI defines that Mini LLM does not support, with the values that mean "not used" (accepted).
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
    "best_of": (None, 1), "suffix": (None, ""),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None,), "response_format": (None, {"type": "text"}), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,), "reasoning_effort": (None,),
    "web_search_options": (None,), "store": (None, False), "service_tier": (None, "auto", "default"),
}
IGNORED = {"user", "metadata"}  # identifiers for the caller's own records: they change nothing generated
COMPLETION_ONLY = {"prompt", "echo", "best_of", "suffix"}
CHAT_ONLY = {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
             "function_call", "parallel_tool_calls", "response_format", "audio", "modalities", "prediction",
             "reasoning_effort", "web_search_options", "store", "service_tier", "metadata"}
COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "logprobs", "stop",
          "seed", "user", "top_k", "repetition_penalty", "ignore_eos", "presence_penalty", "frequency_penalty",
          "logit_bias"}


class APIError(MiniLLMError):
    """A request the server refuses, as OpenAI's error object: HTTP status, message, the parameter at fault."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error",
             500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, message, param, "invalid_value")


@dataclass(frozen=True)
class GenerationRequest:
    """What a completion and a chat request share: the model, how to sample, how many choices, the output."""

    model: str
    sampling: SamplingConfig  # seed None: the server draws one
    max_tokens: int | None  # None: the server's default (a chat: up to its limit)
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # alternatives per token (0: the chosen token's logprob only); None: no logprobs
    stops: list[str]
    ignore_eos: bool


@dataclass(frozen=True)
class CompletionRequest(GenerationRequest):
    prompts: tuple[str, ...] = ()
    echo: bool = False


@dataclass(frozen=True)
class ChatRequest(GenerationRequest):
    messages: tuple[dict[str, str], ...] = ()


def parse_completion(body: Any, limits: ServerLimits) -> CompletionRequest:
    """A /v1/completions body, checked."""
    _check_names(body, COMMON | COMPLETION_ONLY, "/v1/completions")
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise bad("prompt", "prompt must be a string or a non-empty list of strings (token ids are not supported: "
                            "send text)")
    for text in prompts:
        _check_chars("prompt", text, limits)
    echo = _boolean(body, "echo")
    shared = _shared(body, limits, len(prompts), allow_zero_tokens=echo)
    if shared["max_tokens"] is None:
        shared["max_tokens"] = COMPLETION_MAX_TOKENS
    logprobs = _whole(body, "logprobs", 0, MAX_LOGPROBS)
    return CompletionRequest(**shared, logprobs=logprobs, prompts=tuple(prompts), echo=echo)


def parse_chat(body: Any, limits: ServerLimits) -> ChatRequest:
    """A /v1/chat/completions body, checked."""
    _check_names(body, COMMON | CHAT_ONLY, "/v1/chat/completions")
    messages = _messages(body.get("messages"), limits)
    shared = _shared(body, limits, 1, allow_zero_tokens=False, tokens_name="max_completion_tokens")
    wants = body.get("logprobs")
    if wants is not None and not isinstance(wants, bool):
        raise bad("logprobs", f"logprobs must be true or false for a chat completion, got {wants!r}")
    top = _whole(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top is not None and not wants:
        raise bad("top_logprobs", "top_logprobs needs logprobs: true")
    return ChatRequest(**shared, logprobs=(top or 0) if wants else None, messages=tuple(messages))


def _check_names(body: Any, known: set[str], where: str) -> None:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name in body:
        if name not in known:
            raise bad(name, f"unrecognized request argument supplied: {name} ({where} does not take it)")
        if name in NEUTRAL_VALUES and body[name] not in NEUTRAL_VALUES[name]:
            raise bad(name, f"{name} is not supported by Mini LLM (got {body[name]!r}); leave it out")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "model is required: the name of a model from GET /v1/models")


def _shared(body: dict, limits: ServerLimits, prompts: int, allow_zero_tokens: bool,
            tokens_name: str = "max_tokens") -> dict[str, Any]:
    """The fields of a GenerationRequest (but logprobs), checked."""
    tokens_key = tokens_name if body.get(tokens_name) is not None else "max_tokens"
    max_tokens = _whole(body, tokens_key, 0 if allow_zero_tokens else 1, limits.max_new_tokens,
                        hint="" if allow_zero_tokens else " (0 only with echo, to score a prompt)")
    n = _whole(body, "n", 1, limits.max_choices) or 1
    if n * prompts > limits.max_choices:
        raise bad("n", f"{prompts} prompts times n={n} is {n * prompts} generations; at most "
                       f"{limits.max_choices} per request on this server")
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}
                                or not isinstance(options.get("include_usage", False), bool)):
        raise bad("stream_options", "stream_options is {\"include_usage\": true|false}, with stream: true only")
    settings = {"temperature": _number(body, "temperature", 1.0), "top_p": _number(body, "top_p", None),
                "top_k": _whole(body, "top_k", 0, None), "seed": _whole(body, "seed", 0, MAX_SEED),
                "repetition_penalty": _number(body, "repetition_penalty", 1.0)}
    try:  # the sampler checks its own ranges (max_new_tokens is set per generation)
        sampling = SamplingConfig(**settings)
    except MiniLLMError as e:
        name = next((key for key in settings if str(e).startswith(key)), None)
        raise bad(name, str(e)) from None
    return {"model": body["model"], "sampling": sampling, "max_tokens": max_tokens, "n": n, "stream": stream,
            "include_usage": bool(options and options.get("include_usage")), "stops": _stops(body.get("stop")),
            "ignore_eos": _boolean(body, "ignore_eos")}


def _whole(body: dict, name: str, low: int, high: int | None, hint: str = "") -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < low or (
            high is not None and value > high):
        upper = f" to {high:,}" if high is not None else " or more"
        raise bad(name, f"{name} must be a whole number from {low}{upper}{hint}, got {value!r}")
    return int(value)


def _number(body: dict, name: str, default: float | None) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(name, f"{name} must be a number, got {value!r}")
    return value


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad(name, f"{name} must be true or false, got {value!r}")
    return bool(value)


def _stops(stop: Any) -> list[str]:
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise bad("stop", f"stop must be a string or a list of up to {MAX_STOPS} non-empty strings of at most "
                          f"{MAX_STOP_CHARS} characters, got {stop!r}")
    return stops


def _check_chars(param: str, text: str, limits: ServerLimits) -> None:
    if len(text) > limits.max_prompt_chars:
        raise bad(param, f"the {param} is {len(text):,} characters; the limit is {limits.max_prompt_chars:,}")


def _messages(messages: Any, limits: ServerLimits) -> list[dict[str, str]]:
    """The chat's messages as {"role", "content"} with plain-text content (text parts joined)."""
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
        raise bad("messages", f"messages must be a list of 1 to {MAX_MESSAGES} {{\"role\", \"content\"}} objects")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad(where, f"{where} must be an object with a \"role\" and a \"content\"")
        role = CHAT_ROLES.get(message["role"])
        if role is None:
            raise bad(where, f"{where} has role {message['role']!r}; Mini LLM supports "
                             f"{', '.join(CHAT_ROLES)} (no tools)")
        extra = set(message) - {"role", "content", "name"}
        if extra:
            raise bad(where, f"{where} has {', '.join(sorted(extra))}, which Mini LLM does not support")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(where, f"{where}: only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(where, f"{where} must have text content")
        checked.append({"role": role, "content": content})
    _check_chars("messages", "".join(m["content"] for m in checked), limits)
    return checked
