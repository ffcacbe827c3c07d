"""Teach it to answer: a decoder-only model trained on generated dialogues (scripts/make_dialogues.py: arithmetic
and unit conversions with a system prompt) with the loss on the assistant's turns only, scored on held-out
conversations by its exact final answer, and a transcript of a conversation with it.

Run: .venv/bin/python bench/chat.py [--conversations 3000] [--held-out 100] [--max-time 240] [--threads 1]

The held-out conversations come from another seed, none identical to a training one; each is given up to its
last user message (the earlier answers are the data's) and the model's greedy answer counts when its last
number is the right result. The model is the cpu preset's (QK-norm, Muon + warm-down) with a context that
holds a whole conversation, trained for --max-time seconds: on a shared or slower machine it gets fewer
steps in the same time, and its accuracy with them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from minillm.checkpoint import load_run
from minillm.config import preset_configs
from minillm.generation import stream_reply
from minillm.models import count_parameters
from minillm.sampling import SamplingConfig
from minillm.training import train

REPO = Path(__file__).resolve().parents[1]
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=32)
CONTEXT = 192  # a conversation of the data set (1-3 questions) is at most about 170 characters
# The cpu preset's recipe on a smaller model and batch: a 2-core CPU makes a few hundred steps in minutes.
MODEL = dict(d_model=96, n_layers=3, n_heads=4, max_seq_len=CONTEXT)
TRAINING = dict(batch_size=16, eval_interval=100)
TRANSCRIPT_QUESTIONS = ("What is 17 + 8?", "How many g are 7 kg?", "Take 6 from 19.")


def dialogues_module():
    """scripts/make_dialogues.py, imported by its path (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_dialogues", REPO / "scripts" / "make_dialogues.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def held_out(dialogues, training: list[dict], n: int, seed: int) -> list[dict]:
    """`n` conversations from another seed, none identical to a training one."""
    seen = {json.dumps(c) for c in training}
    found = []
    for conversation in dialogues.make_dialogues(n * 4, seed=seed):
        if json.dumps(conversation) not in seen:
            found.append(conversation)
        if len(found) == n:
            return found
    raise SystemExit("could not find enough held-out conversations; use another --seed")


def answer(run, messages: list[dict]) -> str:
    return "".join(text for _, text in stream_reply(run.model, run.tokenizer, messages, GREEDY))


def seen_questions(conversations: list[dict]) -> set[str]:
    """Every user message of the conversations."""
    return {m["content"] for c in conversations for m in c["messages"] if m["role"] == "user"}


def score(run, dialogues, conversations: list[dict], seen: set[str]) -> tuple[Counter, Counter]:
    """(right answers, questions) by kind of the last question, and by whether the training data has it
    ("seen", "new")."""
    right, total = Counter(), Counter()
    for conversation in conversations:
        *given, expected = conversation["messages"]
        question = given[-1]["content"]
        groups = (dialogues.kind_of(question), "seen" if question in seen else "new")
        ok = dialogues.final_answer(answer(run, given)) == dialogues.final_answer(expected["content"])
        for group in groups:
            total[group] += 1
            right[group] += ok
    return right, total


def transcript(run, system: str) -> list[str]:
    """A conversation with the model: the questions in turn, each answered after the model's own answers."""
    messages, lines = [{"role": "system", "content": system}], [f"system: {system}"]
    for question in TRANSCRIPT_QUESTIONS:
        messages.append({"role": "user", "content": question})
        reply = answer(run, messages)
        messages.append({"role": "assistant", "content": reply})
        lines += [f"you> {question}", f"bot> {reply}"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=3000, help="training data (before the split)")
    parser.add_argument("--held-out", type=int, default=100)
    parser.add_argument("--max-time", type=float, default=240.0, help="training budget in seconds")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (1 on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dialogues = dialogues_module()
    training = dialogues.make_dialogues(args.conversations, seed=args.seed)
    tests = held_out(dialogues, training, args.held_out, seed=args.seed + 1)
    with tempfile.TemporaryDirectory(prefix="minillm-bench-chat-") as tmp:
        data, out = Path(tmp) / "dialogues.jsonl", Path(tmp) / "run"
        dialogues.write_jsonl(training, data)
        model_config, train_config = preset_configs(
            "cpu", MODEL, {**TRAINING, "data": str(data), "max_time": args.max_time, "threads": args.threads,
                           "seed": args.seed})
        start = time.perf_counter()
        result = train(model_config, train_config, out, progress=False, log=lambda m: None)
        seconds = time.perf_counter() - start
        run = load_run(out)
        right, total = score(run, dialogues, tests, seen_questions(training))
        lines = transcript(run, dialogues.SYSTEM)
    by_kind = ", ".join(f"{kind} {right[kind]}/{total[kind]}" for kind in dialogues.KINDS if total[kind])
    accuracy = sum(right[kind] for kind in dialogues.KINDS) / len(tests)
    print(f"Dialogues (scripts/make_dialogues.py): {args.conversations:,} conversations, the chat task (loss on "
          f"the assistant's turns only), {args.max_time:g} s budget; {args.held_out} held-out conversations\n")
    print("| model | parameters | steps | seconds | best val loss | exact final answers (held out) | by kind | "
          "question seen in training / new |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    shape = f"d_model {MODEL['d_model']}, {MODEL['n_layers']} layers, context {CONTEXT}"
    print(f"| decoder_only ({shape}), cpu preset's recipe | {count_parameters(run.model):,} | {result.steps:,} | "
          f"{seconds:.0f} | {result.best_val_loss:.3f} | {accuracy:.1%} | {by_kind} | {right['seen']}/{total['seen']} "
          f"/ {right['new']}/{total['new']} |")
    print(f"\n(The held-out conversations are all new; {total['seen']} of their last questions also occur word "
          "for word in a training conversation.)")
    print("\nA conversation with it (greedy; each answer sees the ones before it):\n")
    print("\n".join(lines))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
