"""Scores of a pair task's greedy answers (exact match, character error rate, chrF, BLEU): held against a
hand count, a plain edit distance and sacrebleu called directly, on hand-made answers and on tiny runs of
both model kinds, whose batched answers must be the answers `generate` gives one pair at a time."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import OBJECTS, SUBJECTS, VERBS, tiny_configs
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.checkpoint import load_run
from minillm.cli import main
from minillm.data.split_record import read_split_record
from minillm.data.streams import read_stream
from minillm.generation import generate_text
from minillm.models import is_encoder_decoder
from minillm.sampling import SamplingConfig
from minillm.training import evaluate_run, train
from minillm.training.answers import (
    ANSWER_LENGTH_FACTOR,
    describe_answers,
    edit_distance,
    text_scores,
)

sacrebleu = pytest.importorskip("sacrebleu")
pytestmark = pytest.mark.usefixtures("one_thread")

TEST_PAIRS = 10  # of the test split's 15 pairs: a sample


def plain_edit_distance(a: str, b: str) -> int:
    """The textbook dynamic programme, one cell at a time."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


@settings(max_examples=200, deadline=None)
@given(st.text("abc ", max_size=12), st.text("abc ", max_size=12))
def test_edit_distance_is_the_textbook_one(a, b):
    assert edit_distance(a, b) == plain_edit_distance(a, b)


def test_text_scores_against_a_hand_count_and_sacrebleu():
    references = ["the cat sees the moon.", "a dog runs to the river.", "the old king waits for a tree."]
    answers = ["the cat sees the moon.", "a dog runs to the rover.", "the king waits for a small tree."]
    scores = text_scores(answers, references)
    assert scores["answers"] == 3 and scores["exact_match"] == pytest.approx(1 / 3)  # the first only
    # By hand: rover/river is 1 substitution; "old " deleted is 4 and "small " inserted 6.
    assert scores["cer"] == pytest.approx((0 + 1 + 10) / sum(map(len, references)))
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(answers, [references]).score)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(answers, [references]).score)
    assert describe_answers(scores) == (f"greedy answers to 3 pairs: exact match 33.3%, character error rate "
                                        f"{scores['cer']:.3f}, chrF {scores['chrf']:.1f}, BLEU {scores['bleu']:.1f}")


def test_bleu_is_left_out_for_answers_too_short_for_its_4_grams():
    scores = text_scores(["yes", "no", "no"], ["yes", "no", "yes"])
    assert scores["exact_match"] == pytest.approx(2 / 3) and scores["cer"] == pytest.approx(3 / 8)
    assert "bleu" not in scores and scores["chrf"] == pytest.approx(
        sacrebleu.corpus_chrf(["yes", "no", "no"], [["yes", "no", "yes"]]).score)


def test_without_sacrebleu_chrf_and_bleu_are_left_out_and_it_says_how_to_get_them(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    scores = text_scores(["a b c d"], ["a b c d"])
    assert scores["exact_match"] == 1 and "chrf" not in scores and "bleu" not in scores
    assert describe_answers(scores).endswith("(chrF and BLEU need sacrebleu: pip install 'mini-llm[scores]')")


def word_order_pairs(path, n: int = 300):
    """Sentences of the corpus grammar and the same words backwards: translation-like (5+ words a target)."""
    rng = random.Random(0)
    lines = []
    for _ in range(n):
        words = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}".split()
        lines.append(f"{' '.join(words)}\t{' '.join(reversed(words))}\n")
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=["decoder_only", "transformer"])
def pair_run(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"answers-{request.param}")
    data = word_order_pairs(root / "pairs.tsv")
    model_config, train_config = tiny_configs(request.param, "char", data, max_steps=150, eval_interval=50,
                                              test_pairs=TEST_PAIRS, learning_rate=3e-3)
    result = train(model_config.replace(max_seq_len=96), train_config, root / "run", progress=False,
                   log=lambda message: None)
    return root / "run", result


def one_by_one(run_dir):
    """(answers, references) of every test pair (read from the run's token files), each answered alone the
    way `generate` answers: a decoder-only model the prompt "source\n", an encoder-decoder the source."""
    run = load_run(run_dir)
    dtype = read_split_record(run_dir).dtype
    offsets = np.load(run_dir / "test.offsets.npy")
    sources, targets = (read_stream(run_dir / f"test.{side}.bin", dtype) for side in ("src", "tgt"))
    answers, references = [], []
    for i in range(offsets.shape[1] - 1):
        source = run.tokenizer.decode(sources[offsets[0, i]:offsets[0, i + 1]].tolist())
        reference = targets[offsets[1, i]:offsets[1, i + 1]].tolist()
        greedy = SamplingConfig(max_new_tokens=ANSWER_LENGTH_FACTOR * len(reference) + 1, temperature=0)
        if is_encoder_decoder(run.config):
            answers.append(generate_text(run.model, run.tokenizer, "", greedy, source=source))
        else:
            answers.append(generate_text(run.model, run.tokenizer, source + "\n", greedy))
        references.append(run.tokenizer.decode(reference))
    return answers, references


def test_the_final_test_and_evaluate_score_the_greedy_answers_of_a_sample_of_test_pairs(pair_run, capsys):
    run_dir, result = pair_run
    answers, references = one_by_one(run_dir)
    n = len(answers)
    test = result.test_metrics
    assert test["answers"] == TEST_PAIRS < n and test["answers_of"] == n  # a sample, as --test-pairs said
    everything = evaluate_run(run_dir, max_pairs=None)
    assert everything["answers"] == n and "answers_of" not in everything
    # All: the batched answers are the ones `generate` gives one at a time, scored as by hand and sacrebleu.
    exact = sum(a == r for a, r in zip(answers, references, strict=True))
    assert everything["exact_match"] == pytest.approx(exact / n)
    assert everything["cer"] == pytest.approx(sum(map(plain_edit_distance, answers, references))
                                              / sum(map(len, references)))
    assert everything["chrf"] == pytest.approx(sacrebleu.corpus_chrf(answers, [references]).score)
    assert everything["bleu"] == pytest.approx(sacrebleu.corpus_bleu(answers, [references]).score)
    assert everything["chrf"] > 0, "the model must have learnt something, or the comparison says little"
    # The run's own setting and the saved test metrics agree; the CLI prints the same line.
    assert {k: evaluate_run(run_dir)[k] for k in ("exact_match", "cer", "chrf")} == {
        k: test[k] for k in ("exact_match", "cer", "chrf")}
    assert json.loads((run_dir / "test_metrics.json").read_text())["answers"] == TEST_PAIRS
    assert main(["evaluate", str(run_dir), "--test-pairs", "none"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == f"{run_dir} test split: {describe_answers(everything)}"
