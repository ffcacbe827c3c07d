"""A run's chat template: how a conversation (OpenAI's messages, {"role", "content"}) becomes token ids.

The template is a Jinja string, stored beside the run's tokenizer.json as chat_template.jinja and rendered
as Hugging Face `transformers` renders a tokenizer's `chat_template` (a sandboxed environment with
trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `tojson`, `strftime_now`, and the
`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `pad_token` variables), so an exported run's
`apply_chat_template` gives the same ids as `Tokenizer.apply_chat_template` here.

Mini LLM's own template (DEFAULT_TEMPLATE) marks each turn with special tokens that are added to the run's
tokenizer (either kind) after its last id, never split and never produced from ordinary text:

    <|bos|><|system|>You add numbers.<|end|><|user|>2+3?<|end|><|assistant|>5<|end|>
                                                         (the generation prompt: <|assistant|>)

From text to ids: the template is rendered with every special-token spelling inside a message's content
defused (replaced by a private marker), the rendered text is cut at the special-token spellings the template
wrote, and the text between them is encoded as ordinary text with the markers put back, so a user who types
"<|end|>" gets those seven characters, never the token. (transformers reads such a spelling in a message as
the token itself, unless `sanitize_control_tokens=True`; for every other text the ids are the same.)

Training learns the assistant turns only: the tokens that rendering the conversation up to and including an
assistant message adds to rendering it up to that message with the generation prompt (its content and its
end-of-turn token). Generation stops at the end-of-turn token (`stop_ids`) and at the end-of-text token.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, Protocol

from minillm.errors import MiniLLMError

ROLES = ("system", "user", "assistant")  # OpenAI's fine-tuning format's roles (the ones Mini LLM trains on)
ASSISTANT = "assistant"
# Mini LLM's role markers and end-of-turn token, added to a run's tokenizer as special tokens.
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
END_OF_TURN = "<|end|>"
CHAT_TOKENS = (*ROLE_TOKENS.values(), END_OF_TURN)
# Every tag trims the whitespace around it ("-"), so the lines and indents are for the reader only.
DEFAULT_TEMPLATE = """\
{{- bos_token -}}
{%- for message in messages -%}
    {%- if message['role'] not in ['system', 'user', 'assistant'] -%}
        {{- raise_exception('unknown role ' ~ message['role'] ~ ': the roles are system, user and assistant') -}}
    {%- endif -%}
    {{- '<|' ~ message['role'] ~ '|>' ~ message['content'] ~ '<|end|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|assistant|>' -}}
{%- endif -%}
"""
# A message's special-token spelling is replaced by MARK_OPEN + its index + MARK_CLOSE while the template
# renders (Unicode noncharacters, meant for a program's internal use); MARK_OPEN itself becomes
# MARK_OPEN + MARK_CLOSE, so every text comes back exactly.
MARK_OPEN, MARK_CLOSE = "\ufdd0", "\ufdd1"
_MARK = re.compile(f"{MARK_OPEN}([0-9]*){MARK_CLOSE}")
# The conversation that finds a template's end-of-turn token (the first special token after an answer).
PROBE = ({"role": "user", "content": "1"}, {"role": ASSISTANT, "content": "2"})

Message = dict[str, Any]


class ChatTokenizer(Protocol):
    """What rendering needs of a tokenizer (minillm.tokenizers.base.Tokenizer has it)."""

    eos_id: int
    unk_id: int | None

    def encode(self, text: str, add_special_tokens: bool = False, allow_special: bool = False) -> list[int]: ...

    def special_tokens(self) -> dict[str, int]: ...

    def role_tokens(self) -> dict[str, tuple[str, int]]: ...


def check_messages(messages: Any, where: str = "the conversation") -> list[Message]:
    """`messages` as a list of {"role", "content"} dicts (and "weight", 0 or 1, on an assistant message, as in
    OpenAI's format: 0 leaves it out of the loss); anything else is a MiniLLMError naming the message."""
    if not isinstance(messages, list) or not messages:
        raise MiniLLMError(f"{where} needs a non-empty \"messages\" list")
    checked = []
    for number, message in enumerate(messages, start=1):
        name = f"{where}, message {number}"
        if not isinstance(message, dict):
            raise MiniLLMError(f"{name} is not a JSON object with \"role\" and \"content\"")
        role, content = message.get("role"), message.get("content")
        if role is None or content is None:
            missing = " or ".join(f'"{key}"' for key in ("role", "content") if message.get(key) is None)
            raise MiniLLMError(f"{name} has no {missing}")
        if role not in ROLES:
            raise MiniLLMError(f"{name} has the unknown role {role!r}; the roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise MiniLLMError(f"{name}: its \"content\" must be text, got {type(content).__name__}")
        weight = message.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool) or (role != ASSISTANT and "weight" in message):
            raise MiniLLMError(f"{name}: \"weight\" is 0 or 1, on assistant messages only, got {weight!r}")
        checked.append({"role": role, "content": content, **({"weight": 0} if weight == 0 else {})})
    return checked


def learned_turns(messages: list[Message]) -> int:
    """How many assistant messages of a (checked) conversation are learned (weight 1)."""
    return sum(m["role"] == ASSISTANT and m.get("weight", 1) == 1 for m in messages)


class ChatTemplate:
    """A chat template: its Jinja `source`, compiled once; `where` names it in errors (a file)."""

    def __init__(self, source: str, where: str = "the chat template") -> None:
        if not isinstance(source, str) or not source.strip():
            raise MiniLLMError(f"{where} is empty; it must be a Jinja chat template")
        self.source, self.where = source, where
        self._template = _compile(source, where)

    def __repr__(self) -> str:
        return f"ChatTemplate({self.where!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChatTemplate) and other.source == self.source

    def __hash__(self) -> int:
        return hash(self.source)

    def __reduce__(self) -> tuple:  # pickled as its source (a compiled template is not picklable)
        return ChatTemplate, (self.source, self.where)

    @property
    def is_default(self) -> bool:
        return self.source == DEFAULT_TEMPLATE

    def render(self, messages: Sequence[Message], add_generation_prompt: bool, tokenizer: ChatTokenizer) -> str:
        """The template's text for `messages` (what transformers' apply_chat_template(tokenize=False) gives)."""
        names = {f"{role}_token": token for role, (token, _) in tokenizer.role_tokens().items()}
        try:
            return self._template.render(messages=[dict(m) for m in messages],
                                         add_generation_prompt=add_generation_prompt, **names)
        except Exception as e:  # jinja2's TemplateError, or a template that misuses a value
            raise MiniLLMError(f"{self.where} could not render the conversation ({type(e).__name__}: "
                               f"{str(e)[:200]}); check its messages, or the template") from None

    def render_ids(self, messages: Sequence[Message], add_generation_prompt: bool,
                   tokenizer: ChatTokenizer) -> list[int]:
        """The token ids of `messages` (and the generation prompt): the template's special tokens as their ids,
        everything else, messages' contents included, as ordinary text (see the module docstring)."""
        specials = tokenizer.special_tokens()
        split = _splitter(tuple(sorted(specials, key=len, reverse=True)))
        index = {spelling: str(i) for i, spelling in enumerate(specials)}
        spellings = list(specials)

        def defuse(text: str) -> str:
            text = text.replace(MARK_OPEN, MARK_OPEN + MARK_CLOSE)
            return split.sub(lambda m: MARK_OPEN + index[m.group(0)] + MARK_CLOSE, text) if specials else text

        def restore(text: str) -> str:
            return _MARK.sub(lambda m: spellings[int(m.group(1))] if m.group(1) else MARK_OPEN, text)

        safe = [{**m, "content": defuse(m["content"])} for m in messages]
        text = self.render(safe, add_generation_prompt, tokenizer)
        ids: list[int] = []
        for n, piece in enumerate(split.split(text) if specials else [text]):
            if n % 2:  # a special token the template wrote
                ids.append(specials[piece])
            elif piece:
                ids += tokenizer.encode(restore(piece))
        return ids

    def training_ids(self, messages: Sequence[Message], tokenizer: ChatTokenizer) -> tuple[list[int], list[bool]]:
        """(ids of the conversation, which of them the model learns): the tokens of each learned assistant turn
        (weight 1), its end-of-turn token included."""
        ids = self.render_ids(messages, False, tokenizer)
        learned = [False] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != ASSISTANT or message.get("weight", 1) == 0:
                continue
            start, end = self._turn_span(messages, i, ids, tokenizer)
            learned[start:end] = [True] * (end - start)
        return ids, learned

    def _turn_span(self, messages: Sequence[Message], i: int, ids: list[int],
                   tokenizer: ChatTokenizer) -> tuple[int, int]:
        """Where message `i` (an assistant's) lies in `ids`, the whole conversation's: after the rendering of
        the messages before it with the generation prompt, up to the end of the rendering through it."""
        before = self.render_ids(messages[:i], True, tokenizer)
        through = self.render_ids(messages[:i + 1], False, tokenizer)
        if through[:len(before)] != before or ids[:len(through)] != through or len(through) == len(before):
            raise MiniLLMError(f"{self.where} does not render a conversation as its beginning plus each new "
                               "message, so Mini LLM cannot tell which tokens are the assistant's; use a template "
                               "that does (Mini LLM's own: train without the imported tokenizer's template)")
        return len(before), len(through)

    def stop_ids(self, tokenizer: ChatTokenizer) -> list[int]:
        """The ids that end an answer: the template's end-of-turn token (the first special token it writes
        after an assistant's text) and the end-of-text token."""
        before = self.render_ids(PROBE[:1], True, tokenizer)
        through = self.render_ids(PROBE, False, tokenizer)
        not_turn_ends = {tokenizer.unk_id, *(i for _, i in tokenizer.role_tokens().values())} - {tokenizer.eos_id}
        ends = set(tokenizer.special_tokens().values()) - not_turn_ends
        end_of_turn = next((i for i in through[len(before):] if i in ends), None)
        return sorted({tokenizer.eos_id} | ({end_of_turn} if end_of_turn is not None else set()))


@lru_cache(maxsize=64)
def _splitter(spellings: tuple[str, ...]) -> re.Pattern:
    """A pattern whose split() keeps the special-token spellings (longest first) as the odd pieces."""
    return re.compile("(" + "|".join(map(re.escape, spellings)) + ")") if spellings else re.compile("(?!)")


def _compile(source: str, where: str) -> Any:
    """The template compiled in an environment like transformers' (see the module docstring)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """transformers' {% generation %} ... {% endgeneration %} (marks the assistant's text): rendered as is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Callable[[], str]) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise MiniLLMError(f"{where} is not a valid Jinja template (line {e.lineno}: {e.message}); fix it or "
                           "remove it") from None
