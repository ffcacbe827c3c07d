"""Stop strings (matched on the decoded text, across tokens, left out), several samples as one batch, and
prompt files: the library pieces that `minillm generate` and a server's `stop` / `n` parameters share."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_generation import CHAR_TEXT, UNICODE_SNIPPET, UNICODE_TEXT, ScriptedEngine, first_eos_cut, tiny_model

from minillm.completions import (
    MAX_SAMPLES,
    Completion,
    complete,
    read_prompt_file,
    stop_note,
    with_stop_strings,
)
from minillm.engine import Engine
from minillm.errors import MiniLLMError
from minillm.generation import GenerationStop, stream_tokens
from minillm.sampling import SamplingConfig
from minillm.stop_strings import StopMatcher
from minillm.tokenizers import BPETokenizer, CharacterTokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLED = SamplingConfig(max_new_tokens=30, temperature=1.0, top_k=None, seed=11)


@pytest.fixture(scope="module")
def char_tokenizer() -> CharacterTokenizer:
    return CharacterTokenizer.train([CHAR_TEXT])


def cut_at_first(text: str, stops: list[str]) -> str:
    """The text before the stop string that completes first, as a generation meets them character by character
    (the whole text when none occurs)."""
    for end in range(len(text) + 1):
        ending = [stop for stop in stops if text[:end].endswith(stop)]
        if ending:
            return text[:end - max(map(len, ending))]
    return text


# ---- the stop-string matcher ------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.text("ab\n", max_size=30), st.lists(st.text("ab\n", min_size=1, max_size=4), min_size=1, max_size=3),
       st.lists(st.integers(0, 30), max_size=8))
def test_the_matcher_shows_exactly_the_text_before_the_first_completed_stop_string_however_chunked(text, stops, cuts):
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    matcher, shown = StopMatcher(stops), ""
    for start, end in zip(bounds, bounds[1:], strict=False):
        shown += matcher.feed(text[start:end])
        assert cut_at_first(text, stops).startswith(shown), "it showed text that a stop string will cut"
    shown += matcher.flush()
    assert shown == cut_at_first(text, stops)
    assert matcher.stopped == any(stop in text for stop in stops)


def test_the_matcher_holds_back_only_what_may_start_a_stop_string():
    matcher = StopMatcher(["THE END", "\n\n"])
    assert matcher.feed("once upon a time TH") == "once upon a time "  # "TH" may begin "THE END"
    assert matcher.feed("E E") == ""
    assert matcher.feed("NDING") == "" and matcher.matched == "THE END"
    matcher = StopMatcher(["THE END", "\n\n"])
    assert matcher.feed("and THE") == "and "
    assert matcher.feed("N they") == "THEN they"  # it was not the stop string after all
    assert matcher.feed(" left.\n") == " left."
    assert matcher.feed("\nmore") == "" and matcher.matched == "\n\n" and matcher.feed("anything") == ""
    assert matcher.flush() == ""
    # One chunk or many, the stop string that completes first wins (here "a", inside the longer "\naa").
    assert StopMatcher(["\naa", "a"]).feed("\naa") == "\n"


@pytest.mark.parametrize("stops", [[""], [None], ["ok", ""]])
def test_an_empty_stop_string_is_refused(stops):
    with pytest.raises(MiniLLMError, match="a stop string must be some text"):
        StopMatcher(stops)


# ---- a stream with stop strings ---------------------------------------------------------------------------

def test_a_stream_stops_at_a_stop_string_spread_over_tokens_and_leaves_it_out(char_tokenizer):
    ids = char_tokenizer.encode("the cat sees the moon. a dog")
    engine = ScriptedEngine(ids, vocab_size=char_tokenizer.vocab_size)
    tokens = with_stop_strings(stream_tokens(engine.model, char_tokenizer, "x", engine=engine), ["moon.", "dog"])
    assert "".join(text for _, text in tokens) == "the cat sees the "
    assert tokens.stop_reason == GenerationStop.STOP_STRING and tokens.stop_string == "moon."
    assert tokens.n_tokens == len("the cat sees the moon.")  # the stop string's tokens were generated
    assert engine.closed and engine.pulled == tokens.n_tokens, "the model must stop at the stop string"


def test_a_stream_without_a_stop_string_in_its_text_is_unchanged(char_tokenizer):
    ids = char_tokenizer.encode("the cat th") + [char_tokenizer.eos_id]
    engine = ScriptedEngine(ids, vocab_size=char_tokenizer.vocab_size)
    tokens = with_stop_strings(stream_tokens(engine.model, char_tokenizer, "x", engine=engine), ["the end"])
    assert "".join(text for _, text in tokens) == "the cat th"  # the held-back "th" comes out at the end
    assert tokens.stop_reason == GenerationStop.END_OF_TEXT and tokens.stop_string is None


def test_a_stop_string_inside_a_multibyte_character_sequence_is_matched_on_text():
    tokenizer = BPETokenizer.train([UNICODE_TEXT], vocab_size=270)
    engine = ScriptedEngine(tokenizer.encode(UNICODE_SNIPPET), vocab_size=tokenizer.vocab_size)
    tokens = with_stop_strings(stream_tokens(engine.model, tokenizer, "x", engine=engine), ["🎉"])
    assert "".join(text for _, text in tokens) == "猫は😀が好き"
    assert tokens.stop_reason == GenerationStop.STOP_STRING


# ---- several samples as one batch -------------------------------------------------------------------------

def test_samples_are_the_rows_of_one_batch_each_its_seeds_text_cut_at_eos_or_its_stop_string(char_tokenizer):
    model = tiny_model(char_tokenizer)
    stops = ["e", "o "]
    result = complete(model, char_tokenizer, "the cat", SAMPLED, num_samples=3, stops=stops)
    # Sample i is the generation alone with seed + i: each row's text, to EOS, cut at its first stop string.
    prompt = torch.tensor([char_tokenizer.encode("the cat")])
    rows = [Engine(model).generate(prompt, SAMPLED.replace(seed=SAMPLED.seed + i),
                                   eos_id=char_tokenizer.eos_id)[0].tolist() for i in range(3)]
    expected = []
    for row in rows:
        ids = first_eos_cut(row, char_tokenizer.eos_id)
        text = char_tokenizer.decode(ids)
        cut = cut_at_first(text, stops)
        if cut != text:
            stop = next(s for s in stops if text[len(cut):].startswith(s))
            # (tokens made: up to the one that completes the stop string; a special token decodes to nothing)
            made = next(k for k in range(1, len(ids) + 1)
                        if cut_at_first(char_tokenizer.decode(ids[:k]), stops) != char_tokenizer.decode(ids[:k]))
            expected.append(Completion(cut, made, GenerationStop.STOP_STRING, stop))
        elif len(ids) < len(row):
            expected.append(Completion(text, len(ids), GenerationStop.END_OF_TEXT))
        else:
            expected.append(Completion(text, len(ids), GenerationStop.MAX_NEW_TOKENS))
    assert result.samples == expected
    assert len({sample.text for sample in result.samples}) > 1, "the rows must draw different tokens"
    assert result.prompt_tokens == len("the cat") and result.tokens == sum(s.tokens for s in expected)
    again = complete(model, char_tokenizer, "the cat", SAMPLED, num_samples=3, stops=stops)
    assert again.samples == result.samples, "the same seed must give the same samples"


def test_a_greedy_batch_is_the_greedy_stream_in_every_row_for_both_model_kinds(char_tokenizer):
    greedy = SamplingConfig(max_new_tokens=12, temperature=0)
    for model_type, prompt, source in [("decoder_only", "a dog", None), ("transformer", "", "a dog runs")]:
        model = tiny_model(char_tokenizer, model_type)
        single = "".join(text for _, text in stream_tokens(model, char_tokenizer, prompt, greedy, source))
        result = complete(model, char_tokenizer, prompt, greedy, num_samples=2, source=source)
        assert [sample.text for sample in result.samples] == [single, single], model_type


@pytest.mark.parametrize("n", [0, -1, MAX_SAMPLES + 1, 1.5])
def test_a_bad_number_of_samples_is_refused(char_tokenizer, n):
    with pytest.raises(MiniLLMError, match=f"number of samples must be a whole number from 1 to {MAX_SAMPLES}"):
        complete(tiny_model(char_tokenizer), char_tokenizer, "a", SAMPLED, num_samples=n)


def test_stop_notes_say_why_and_after_how_many_tokens():
    assert stop_note(GenerationStop.END_OF_TEXT, 3) == "stopped at end of text after 3 tokens"
    assert stop_note(GenerationStop.STOP_STRING, 1, "\n") == "stopped at the stop string '\\n' after 1 token"
    assert stop_note(GenerationStop.MAX_NEW_TOKENS, 200) == "stopped at the limit of 200 tokens (max_new_tokens)"


# ---- prompt files -----------------------------------------------------------------------------------------

def test_a_prompt_file_is_one_prompt_a_line_blank_lines_skipped(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"the cat \r\n\n  \na dog\n")
    assert read_prompt_file(path) == [(1, "the cat "), (4, "a dog")]


@pytest.mark.parametrize("content, needle", [(None, "prompt file not found"), (b"\n \n", "has no prompt"),
                                             (b"\xff\xfe", "is not UTF-8 text")])
def test_a_bad_prompt_file_is_one_clear_error(tmp_path, content, needle):
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(MiniLLMError, match=needle):
        read_prompt_file(path)
