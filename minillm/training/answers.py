"""Scores of a model's answers on a split of (prompt, answer) pairs (a pair task's test; data.batches.AnswerPairs):
the model answers each prompt greedily, and its answers are compared with the references as text.

    exact_match  the share of answers equal to their reference, character for character
    cer          character error rate: the edits (insertions, deletions, substitutions) that turn the answers
                 into the references, over the references' characters (0 = perfect; can exceed 1)
    chrf         chrF (character n-gram F-score, 0-100), sacrebleu's standard implementation
    bleu         BLEU (0-100), sacrebleu's, for translation-like data only: references of at least
                 BLEU_MIN_WORDS words on average (shorter answers, such as labels, leave its 4-grams empty)

chrF and BLEU need the optional `sacrebleu` (pip install 'mini-llm[scores]'); without it they are left out.
"""

from __future__ import annotations

import importlib
import math
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from minillm.data.batches import AnswerPairs
from minillm.engine import Engine
from minillm.models import is_encoder_decoder
from minillm.sampling import SamplingConfig
from minillm.tokenizers import Tokenizer

# An answer may run to this many times its reference's tokens (and one more, for EOS) before it is cut: a
# longer one is wrong anyway, and its error rate already shows it. (Per pair, so that an answer does not
# depend on the pairs it was decoded with.)
ANSWER_LENGTH_FACTOR = 2
BLEU_MIN_WORDS = 4  # BLEU's longest n-gram: shorter references have none
SCORES_HINT = "pip install 'mini-llm[scores]'"


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between two texts, by characters (one numpy row of the table at a time)."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    columns = np.arange(len(b) + 1)
    b_chars = np.array([ord(c) for c in b])
    row = columns.copy()
    for i, char in enumerate(a, start=1):
        substituted = row[:-1] + (b_chars != ord(char))
        deleted = row[1:] + 1
        best = np.concatenate(([i], np.minimum(substituted, deleted)))
        # An insertion carries a cell's value to the right at +1 each step: a running minimum of best - j.
        row = np.minimum.accumulate(best - columns) + columns
    return int(row[-1])


def answer_groups(model: nn.Module, pairs: AnswerPairs, indices: list[int],
                  batch_size: int) -> list[list[int]]:
    """The pairs `indices` in batches the engine can decode together: a decoder-only model continues prompts
    of one length per batch (it has no padding mask); an encoder-decoder takes sources of any length."""
    if is_encoder_decoder(model.config):
        return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    by_length: dict[int, list[int]] = defaultdict(list)
    for index in indices:
        by_length[len(pairs.prompt_ids(index))].append(index)
    return [group[i:i + batch_size] for group in by_length.values() for i in range(0, len(group), batch_size)]


def answer_limit(pairs: AnswerPairs, pair: int) -> int:
    """The tokens (EOS included) the model may make to answer pair `pair`."""
    return ANSWER_LENGTH_FACTOR * len(pairs.answer_ids(pair)) + 1


def greedy_answers(model: nn.Module, pairs: AnswerPairs, indices: list[int], stop_ids: list[int], batch_size: int,
                   progress: bool = False) -> dict[int, list[int]]:
    """pair index -> the model's greedy answer: its tokens before the first of `stop_ids` (EOS; a chat run's
    end of turn too), at most answer_limit of them."""
    engine, answers = Engine(model), {}
    encoder_decoder = is_encoder_decoder(model.config)
    groups = answer_groups(model, pairs, indices, batch_size)
    for group in tqdm(groups, unit="batch", leave=False, dynamic_ncols=True, desc="answering", disable=not progress):
        prompts = [pairs.prompt_ids(i) for i in group]
        sampling = SamplingConfig(max_new_tokens=max(answer_limit(pairs, i) for i in group), temperature=0)
        if encoder_decoder:
            width = max(1, max(map(len, prompts)))
            pad = model.config.pad_id
            source = torch.tensor([p + [pad] * (width - len(p)) for p in prompts], dtype=torch.long)
            mask = torch.tensor([[j < max(1, len(p)) for j in range(width)] for p in prompts])
            made = engine.generate(None, sampling, source_ids=source, source_mask=mask, eos_id=stop_ids)
        else:
            made = engine.generate(torch.tensor(prompts, dtype=torch.long), sampling, eos_id=stop_ids)
        for index, row in zip(group, made.tolist(), strict=True):
            row = row[:answer_limit(pairs, index)]
            answers[index] = row[:next((i for i, token in enumerate(row) if token in stop_ids), len(row))]
    return answers


def text_scores(answers: list[str], references: list[str]) -> dict[str, Any]:
    """Exact match, character error rate, and (with sacrebleu) chrF and BLEU of answers against references."""
    chars = sum(len(reference) for reference in references)
    scores: dict[str, Any] = {
        "answers": len(answers),
        "exact_match": sum(a == r for a, r in zip(answers, references, strict=True)) / len(answers)
        if answers else math.nan,
        "cer": sum(edit_distance(a, r) for a, r in zip(answers, references, strict=True)) / chars
        if chars else math.nan}
    try:
        sacrebleu = importlib.import_module("sacrebleu")
    except ImportError:
        return {**scores, "chrf_missing": f"chrF and BLEU need sacrebleu: {SCORES_HINT}"}
    scores["chrf"] = sacrebleu.corpus_chrf(answers, [references]).score
    words = sum(len(reference.split()) for reference in references) / max(1, len(references))
    if words >= BLEU_MIN_WORDS:
        scores["bleu"] = sacrebleu.corpus_bleu(answers, [references]).score
    return scores


def score_answers(model: nn.Module, tokenizer: Tokenizer, pairs: AnswerPairs, max_pairs: int | None, seed: int,
                  batch_size: int, progress: bool = False, unit: str = "pairs") -> dict[str, Any]:
    """The model's greedy answers to the pairs (all of them, or a seeded random sample of `max_pairs`)
    scored as text (see the module docstring); "answers_of": the pairs of the split when sampled;
    "answers_to": what a pair is, in words (`unit`)."""
    n = pairs.n_pairs
    indices = list(range(n))
    if max_pairs is not None and n > max_pairs:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        indices = sorted(order[:max_pairs].tolist())
    stop_ids = tokenizer.chat_stop_ids() if tokenizer.chat_template is not None else [tokenizer.eos_id]
    answers = greedy_answers(model, pairs, indices, stop_ids, batch_size, progress)
    scores = text_scores([tokenizer.decode(answers[i]) for i in indices],
                         [tokenizer.decode(pairs.answer_ids(i)) for i in indices])
    return {**scores, "answers_to": unit, **({"answers_of": n} if len(indices) < n else {})}


def describe_answers(metrics: dict[str, Any]) -> str:
    """"greedy answers to 500 test pairs: exact match 41.2%, character error rate 0.183, chrF 71.3, BLEU 52.0"
    ("" when the metrics have no answer scores)."""
    if "exact_match" not in metrics:
        return ""
    n = f"{metrics['answers']:,}" + (f" (a random sample of the {metrics['answers_of']:,}; --test-pairs sets it)"
                                     if "answers_of" in metrics else "")
    text = (f"greedy answers to {n} {metrics.get('answers_to', 'pairs')}: exact match "
            f"{100 * metrics['exact_match']:.1f}%, character error rate {metrics['cer']:.3f}")
    text += f", chrF {metrics['chrf']:.1f}" if "chrf" in metrics else ""
    text += f", BLEU {metrics['bleu']:.1f}" if "bleu" in metrics else ""
    return text + (f" ({metrics['chrf_missing']})" if "chrf_missing" in metrics else "")
