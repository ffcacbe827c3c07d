"""stream_text / generate_text: text chunks from a model, real tokenizers, never a broken character."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minillm.config import ModelConfig
from minillm.engine import Engine
from minillm.errors import MiniLLMError
from minillm.generation import (
    GenerationStop,
    generate_text,
    generation_inputs,
    stream_text,
    stream_tokens,
    unknown_characters_warning,
)
from minillm.models import build_model
from minillm.sampling import SamplingConfig
from minillm.tokenizers import BPETokenizer, CharacterTokenizer

CHAR_TEXT = "the cat sees the moon.\na dog runs to the river.\n" * 4
# CJK and emoji are 3 and 4 bytes in UTF-8: with this small BPE vocabulary the emoji stay split over
# several byte tokens, so a streaming decoder must hold partial characters back.
UNICODE_TEXT = "猫は😀が好き🎉。Hello 世界! " * 20
BPE_VOCAB = 270
UNICODE_SNIPPET = "猫は😀が好き🎉。世界"


# Tiny models run on one CPU thread (see conftest.single_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def char_tokenizer() -> CharacterTokenizer:
    return CharacterTokenizer.train([CHAR_TEXT])


@pytest.fixture(scope="module")
def bpe_tokenizer() -> BPETokenizer:
    tokenizer = BPETokenizer.train([UNICODE_TEXT], vocab_size=BPE_VOCAB)
    assert len(tokenizer.encode("😀")) > 1, "the fixture must split a character over several tokens"
    return tokenizer


def tiny_model(tokenizer, model_type: str = "decoder_only", seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    values = dict(model_type=model_type, vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4,
                  max_seq_len=32)
    return build_model(ModelConfig(**{**values, **overrides})).eval()


class ScriptedEngine:
    """Stands in for the engine: "generates" a fixed list of ids for a model that is never run, and
    records how it was called (the text layer's own logic is what these tests look at)."""

    def __init__(self, ids: list[int], model_type: str = "decoder_only", vocab_size: int = 300):
        self.model = nn.Module()
        self.model.config = ModelConfig(model_type=model_type, vocab_size=vocab_size, d_model=8, n_heads=2)
        self.ids = ids
        self.calls: list[dict] = []
        self.pulled = 0
        self.closed = False

    def stream(self, prompt_ids, sampling, source_ids=None, eos_id=None):
        self.calls.append(dict(prompt_ids=prompt_ids.tolist(), eos_id=eos_id,
                               source_ids=None if source_ids is None else source_ids.tolist()))
        return self._steps(sampling.max_new_tokens)

    def _steps(self, max_new_tokens):
        try:
            for token_id in self.ids[:max_new_tokens]:
                self.pulled += 1
                yield torch.tensor([token_id])
        finally:
            self.closed = True


def scripted_text(engine: ScriptedEngine, tokenizer, prompt, sampling=None, source=None):
    return "".join(stream_text(engine.model, tokenizer, prompt, sampling, source, engine))


def scripted_tokens(engine: ScriptedEngine, tokenizer, prompt, sampling=None):
    return stream_tokens(engine.model, tokenizer, prompt, sampling, engine=engine)


def first_eos_cut(ids: list[int], eos_id: int) -> list[int]:
    return ids[:ids.index(eos_id)] if eos_id in ids else ids


# ---- decoder-only ---------------------------------------------------------------------------------------

def test_stream_text_is_the_decoded_generate_of_the_same_seed(char_tokenizer):
    model = tiny_model(char_tokenizer)
    prompt = "the cat"
    prompt_ids = torch.tensor([char_tokenizer.encode(prompt)])
    sampling = SamplingConfig(max_new_tokens=40, temperature=1.0, top_k=None, top_p=0.95, repetition_penalty=1.1,
                              seed=3)
    out = Engine(model).generate(prompt_ids, sampling, eos_id=char_tokenizer.eos_id)
    new_ids = first_eos_cut(out[0].tolist(), char_tokenizer.eos_id)
    chunks = list(stream_text(model, char_tokenizer, prompt, sampling))
    assert "".join(chunks) == char_tokenizer.decode(new_ids)
    assert len(chunks) == len(new_ids), "a character tokenizer streams one chunk per token"
    assert generate_text(model, char_tokenizer, prompt, sampling) == "".join(chunks)


def test_same_seed_same_text_different_seed_different_text(char_tokenizer):
    model = tiny_model(char_tokenizer)
    sampling = SamplingConfig(max_new_tokens=40, temperature=1.0, top_k=None, seed=7)
    first = generate_text(model, char_tokenizer, "a dog", sampling)
    assert generate_text(model, char_tokenizer, "a dog", sampling) == first
    assert generate_text(model, char_tokenizer, "a dog", sampling.replace(seed=8)) != first


def test_prompt_is_not_repeated_and_an_empty_prompt_starts_from_bos(char_tokenizer):
    continuation = char_tokenizer.encode(" sees the moon")
    engine = ScriptedEngine(continuation, vocab_size=char_tokenizer.vocab_size)
    assert scripted_text(engine, char_tokenizer, "the cat") == " sees the moon"
    assert engine.calls[-1]["prompt_ids"] == [char_tokenizer.encode("the cat")]
    assert engine.calls[-1]["eos_id"] == char_tokenizer.eos_id
    scripted_text(engine, char_tokenizer, "")
    assert engine.calls[-1]["prompt_ids"] == [[char_tokenizer.bos_id]]


def test_generation_stops_at_eos(char_tokenizer):
    ids = char_tokenizer.encode("the") + [char_tokenizer.eos_id] + char_tokenizer.encode("moon")
    engine = ScriptedEngine(ids, vocab_size=char_tokenizer.vocab_size)
    assert scripted_text(engine, char_tokenizer, "a") == "the"
    assert engine.closed and engine.pulled == 4


def test_the_stream_says_whether_the_model_ended_the_text(char_tokenizer):
    ids = char_tokenizer.encode("the") + [char_tokenizer.eos_id] + char_tokenizer.encode("moon")
    engine = ScriptedEngine(ids, vocab_size=char_tokenizer.vocab_size)
    tokens = scripted_tokens(engine, char_tokenizer, "a")
    assert tokens.end_note() == "" and tokens.stop_reason is None  # not ended yet
    assert "".join(text for _, text in tokens) == "the"
    assert (tokens.stop_reason, tokens.n_tokens) == (GenerationStop.END_OF_TEXT, 3)
    assert tokens.end_note() == "stopped at end of text after 3 tokens"
    cut = scripted_tokens(engine, char_tokenizer, "a", SamplingConfig(max_new_tokens=2))
    assert len(list(cut)) == 2 and cut.stop_reason == GenerationStop.MAX_NEW_TOKENS and cut.end_note() == ""


def test_closing_the_stream_stops_the_model(char_tokenizer):
    ids = char_tokenizer.encode("the cat sees the moon")
    engine = ScriptedEngine(ids, vocab_size=char_tokenizer.vocab_size)
    chunks = stream_text(engine.model, char_tokenizer, "a", engine=engine)
    assert next(chunks) == "t"
    chunks.close()
    assert engine.closed and engine.pulled == 1


def test_bad_input_is_a_clear_error(char_tokenizer):
    model = tiny_model(char_tokenizer)
    with pytest.raises(MiniLLMError, match="text"):
        generate_text(model, char_tokenizer, None)
    with pytest.raises(MiniLLMError, match="another model"):
        generate_text(model, char_tokenizer, "a", engine=Engine(tiny_model(char_tokenizer)))


# ---- no broken characters -------------------------------------------------------------------------------

def test_bpe_stream_never_emits_a_broken_character(bpe_tokenizer):
    ids = bpe_tokenizer.encode(UNICODE_SNIPPET)
    engine = ScriptedEngine(ids, vocab_size=bpe_tokenizer.vocab_size)
    chunks = list(stream_text(engine.model, bpe_tokenizer, "Hello", SamplingConfig(max_new_tokens=len(ids)),
                              engine=engine))
    assert all(chunks), "no empty chunks"
    assert not any("\ufffd" in chunk for chunk in chunks)
    assert "".join(chunks) == bpe_tokenizer.decode(ids) == UNICODE_SNIPPET
    assert len(chunks) < len(ids), "some tokens completed no character and were held back"


def test_stream_tokens_gives_one_item_per_token_and_the_same_text(bpe_tokenizer):
    ids = bpe_tokenizer.encode(UNICODE_SNIPPET)
    engine = ScriptedEngine(ids, vocab_size=bpe_tokenizer.vocab_size)
    sampling = SamplingConfig(max_new_tokens=len(ids))
    items = list(scripted_tokens(engine, bpe_tokenizer, "Hello", sampling))
    assert [token_id for token_id, _ in items] == ids  # every token, also those that end mid-character
    assert "" in [text for _, text in items]
    assert "".join(text for _, text in items) == scripted_text(engine, bpe_tokenizer, "Hello", sampling)


def test_stream_tokens_ends_with_the_cut_off_character(bpe_tokenizer):
    ids = bpe_tokenizer.encode("猫😀")[:-1]
    engine = ScriptedEngine(ids, vocab_size=bpe_tokenizer.vocab_size)
    items = list(scripted_tokens(engine, bpe_tokenizer, "x", SamplingConfig(max_new_tokens=len(ids))))
    assert [token_id for token_id, _ in items] == [*ids, None]
    assert "".join(text for _, text in items) == bpe_tokenizer.decode(ids)


def test_a_character_cut_off_at_the_end_is_still_yielded(bpe_tokenizer):
    ids = bpe_tokenizer.encode("猫😀")
    ids = ids[:-1]  # stop in the middle of the emoji's bytes
    engine = ScriptedEngine(ids, vocab_size=bpe_tokenizer.vocab_size)
    chunks = list(stream_text(engine.model, bpe_tokenizer, "x", SamplingConfig(max_new_tokens=len(ids)),
                              engine=engine))
    assert chunks[0] == "猫"
    assert "".join(chunks) == bpe_tokenizer.decode(ids)


def test_bpe_with_a_trained_model_streams_whole_characters(bpe_tokenizer):
    """A tiny model that memorised the Unicode text reproduces it greedily, in whole characters."""
    data = torch.tensor([bpe_tokenizer.encode(UNICODE_TEXT)[:49]])
    model = tiny_model(bpe_tokenizer, max_seq_len=48).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(100):
        _, loss = model(data[:, :-1], targets=data[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    prompt = "猫は😀が好き🎉。Hello"  # ends where the pre-tokenizer splits, so its ids start the data
    n = len(bpe_tokenizer.encode(prompt))
    assert bpe_tokenizer.encode(prompt) == data[0, :n].tolist()
    # Generate up to the last whole character of the memorised data (stopping in the middle of one would
    # end, by design, with a final chunk holding U+FFFD: see test_a_character_cut_off_at_the_end...).
    m = max(m for m in range(1, data.size(1) - n + 1)
            if "\ufffd" not in bpe_tokenizer.decode(data[0, n:n + m].tolist()))
    chunks = list(stream_text(model, bpe_tokenizer, prompt, SamplingConfig(max_new_tokens=m, temperature=0)))
    expected = bpe_tokenizer.decode(data[0, n:n + m].tolist())
    assert "".join(chunks) == expected
    assert "😀" in expected and "🎉" in expected
    assert not any("\ufffd" in chunk for chunk in chunks)


# ---- encoder-decoder ------------------------------------------------------------------------------------

def test_encoder_decoder_needs_a_source(char_tokenizer):
    model = tiny_model(char_tokenizer, "transformer")
    with pytest.raises(MiniLLMError, match="source"):
        generate_text(model, char_tokenizer, "a")
    with pytest.raises(MiniLLMError, match="source"):
        generate_text(model, char_tokenizer, "", source="   ")
    with pytest.raises(MiniLLMError, match="shorten"):
        generate_text(model, char_tokenizer, "", source="the moon " * 10)


def test_encoder_decoder_encodes_the_source_plainly_and_the_prompt_as_a_target_prefix(char_tokenizer):
    engine = ScriptedEngine(char_tokenizer.encode("moon"), "transformer", char_tokenizer.vocab_size)
    assert scripted_text(engine, char_tokenizer, "the ", source="a dog") == "moon"
    assert engine.calls[-1]["source_ids"] == [char_tokenizer.encode("a dog")]
    assert engine.calls[-1]["prompt_ids"] == [char_tokenizer.encode("the ")]


def test_encoder_decoder_stream_is_the_decoded_generate_of_the_same_seed(char_tokenizer):
    model = tiny_model(char_tokenizer, "transformer")
    source = "the cat sees"
    sampling = SamplingConfig(max_new_tokens=30, temperature=0.9, top_k=10, seed=4)
    out = Engine(model).generate(None, sampling, source_ids=torch.tensor([char_tokenizer.encode(source)]),
                                 eos_id=char_tokenizer.eos_id)
    expected = char_tokenizer.decode(first_eos_cut(out[0].tolist(), char_tokenizer.eos_id))
    assert generate_text(model, char_tokenizer, "", sampling, source=source) == expected


# ---- reading the user's input (shared by the CLI and the UI) --------------------------------------------

def test_generation_inputs_read_prompt_and_source_by_model_kind():
    assert generation_inputs(False, "ROMEO:", None) == ("ROMEO:", None)
    assert generation_inputs(False, None, "  ") == ("", None)
    assert generation_inputs(True, "the ", "a dog") == ("the ", "a dog")
    assert generation_inputs(True, "a dog", None) == ("", "a dog")  # the prompt is the source
    with pytest.raises(MiniLLMError, match="decoder-only model: it takes no source"):
        generation_inputs(False, "x", "y")
    with pytest.raises(MiniLLMError, match="encoder-decoder model: give a source"):
        generation_inputs(True, " ", "")


def test_unknown_characters_are_counted_in_the_warning(char_tokenizer):
    assert unknown_characters_warning(char_tokenizer, "the cat") == ""
    assert unknown_characters_warning(char_tokenizer, "the ĉat 😀").startswith("2 character(s)")
