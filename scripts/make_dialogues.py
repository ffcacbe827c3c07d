"""Write a small conversation data set: arithmetic and unit-conversion dialogues with a system prompt, in
OpenAI's fine-tuning format (one {"messages": [...]} per line), generated from a seed (nothing downloaded).

Each conversation is the system prompt and 1 to --max-turns questions, each answered with its working and
the result last ("27 + 15 = 42", "4 km = 4000 m"): the exact final answer is the last number of the
assistant's last message (`final_answer`). The tests train on a few hundred of them; bench/chat.py trains
on a few thousand and scores held-out ones.

Run: .venv/bin/python scripts/make_dialogues.py --out dialogues.jsonl [--n 3000] [--seed 0] [--max-turns 3]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

SYSTEM = "You are a calculator."
MAX_OPERAND = 20  # sums and differences of whole numbers up to this (a table a small model learns in minutes)
MAX_AMOUNT = 999  # the amounts converted
# (question phrasings, the operation's symbol, the function)
OPERATIONS = {
    "+": (("What is {a} + {b}?", "{a} plus {b}?", "Add {a} and {b}."), lambda a, b: a + b),
    "-": (("What is {a} - {b}?", "{a} minus {b}?", "Take {b} from {a}."), lambda a, b: a - b),
}
# (unit, smaller unit, how many of the smaller one make the unit)
CONVERSIONS = (("km", "m", 1000), ("m", "cm", 100), ("cm", "mm", 10), ("kg", "g", 1000), ("l", "ml", 1000))
CONVERSION_PHRASES = ("How many {small} are {n} {unit}?", "Convert {n} {unit} to {small}.", "{n} {unit} in {small}?")
KINDS = ("+", "-", "convert")
_NUMBER = re.compile(r"-?\d+")
_AMOUNT = re.compile(r"\d+ (?:" + "|".join(unit for unit, _, _ in CONVERSIONS) + r")\b")


def exchange(rng: random.Random) -> tuple[str, str, str]:
    """(kind, question, answer) of one random question."""
    kind = rng.choice(KINDS)
    if kind == "convert":
        unit, small, factor = rng.choice(CONVERSIONS)
        n = rng.randint(1, MAX_AMOUNT)
        question = rng.choice(CONVERSION_PHRASES).format(n=n, unit=unit, small=small)
        return kind, question, f"{n} {unit} = {n * factor} {small}"
    phrases, apply = OPERATIONS[kind]
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    if kind == "-" and a < b:
        a, b = b, a
    return kind, rng.choice(phrases).format(a=a, b=b), f"{a} {kind} {b} = {apply(a, b)}"


def conversation(rng: random.Random, max_turns: int) -> dict:
    """One conversation: the system prompt and 1 to max_turns question-answer exchanges."""
    messages = [{"role": "system", "content": SYSTEM}]
    for _ in range(rng.randint(1, max_turns)):
        _, question, answer = exchange(rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def make_dialogues(n: int, seed: int = 0, max_turns: int = 3) -> list[dict]:
    """`n` conversations from `seed` (the same seed, the same conversations)."""
    rng = random.Random(seed)
    return [conversation(rng, max_turns) for _ in range(n)]


def final_answer(text: str) -> str | None:
    """The last number of a text (an answer's result), or None."""
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def kind_of(question: str) -> str:
    """Which kind of question a user's message is ("+", "-" or "convert")."""
    if _AMOUNT.search(question):
        return "convert"
    return "-" if ("-" in question or "minus" in question or "Take" in question) else "+"


def write_jsonl(conversations: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(c) + "\n" for c in conversations), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    parser.add_argument("--n", type=int, default=3000, help="conversations (default 3000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-turns", type=int, default=3, help="questions per conversation, at most")
    args = parser.parse_args(argv)
    if args.n < 1 or args.max_turns < 1:
        parser.error("--n and --max-turns must be at least 1")
    write_jsonl(make_dialogues(args.n, args.seed, args.max_turns), args.out)
    print(f"wrote {args.n:,} conversations to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
