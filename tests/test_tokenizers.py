"""Tokenizers: round trips, reserved special tokens, save/load, Hugging Face compatibility, clear errors."""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
import unicodedata

import pytest
from conftest import import_dev_dependency, save_gpt2_style_tokenizer, save_llama_style_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.errors import MiniLLMError
from minillm.tokenizers import (
    BPETokenizer,
    CharacterTokenizer,
    Tokenizer,
    import_tokenizer,
    load_tokenizer,
    save_special_tokens,
)

# Small multilingual text: enough for a few hundred merges, and multi-byte characters of every UTF-8 length.
TRAIN_TEXTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n\n",
    "héllo wörld, ça va? naïve café. 世界你好，这是一个测试。 こんにちは 😀🎉 Привет мир\n",
    "Text may spell <|pad|>, <|bos|>, <|eos|> or <|unk|>: they stay text. x\n",
] * 20
BPE_VOCAB = 320
MULTIBYTE_TEXT = "Hi 😀🎉 世界你好 — café naïve Привет 👩‍👩‍👧 \U0001F9D1\u200d\U0001F4BB!"
SPECIAL_SPELLINGS = "a <|pad|> b <|bos|> c <|eos|> d <|unk|> e"
FAST = settings(max_examples=200, deadline=None)


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(TRAIN_TEXTS, vocab_size=BPE_VOCAB)


@pytest.fixture(scope="module")
def char() -> CharacterTokenizer:
    return CharacterTokenizer.train(TRAIN_TEXTS)


@pytest.fixture(scope="module", params=["bpe", "char"])
def tok(request, bpe, char) -> Tokenizer:
    return {"bpe": bpe, "char": char}[request.param]


# --- training and ids ------------------------------------------------------------------------------------


def test_special_ids_are_the_same_in_both_kinds(bpe, char):
    assert (bpe.kind, char.kind) == ("bpe", "char")
    for t in (bpe, char):
        assert (t.pad_id, t.bos_id, t.eos_id) == (0, 1, 2)
        assert t.decode([0, 1, 2], skip_special_tokens=False) == "<|pad|><|bos|><|eos|>"
    assert bpe.unk_id is None
    assert char.unk_id == 3


def test_bpe_vocab_is_learned_up_to_the_requested_size(bpe):
    assert 256 + 3 < bpe.vocab_size <= BPE_VOCAB
    ids = bpe.encode("".join(TRAIN_TEXTS))
    assert max(ids) < bpe.vocab_size
    assert len(ids) < 0.7 * len("".join(TRAIN_TEXTS).encode("utf-8"))  # the merges do compress


def test_char_vocab_is_the_sorted_training_characters(char):
    chars = sorted(set("".join(TRAIN_TEXTS)))
    assert char.vocab_size == 4 + len(chars)
    assert char.encode("".join(chars)) == list(range(4, 4 + len(chars)))


def test_training_streams_lines_from_a_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(TRAIN_TEXTS), encoding="utf-8")
    with open(path, encoding="utf-8") as f:
        from_file = BPETokenizer.train(f, vocab_size=BPE_VOCAB)
    assert from_file.decode(from_file.encode(MULTIBYTE_TEXT)) == MULTIBYTE_TEXT
    with open(path, encoding="utf-8") as f:
        assert CharacterTokenizer.train(f).alphabet == CharacterTokenizer.train(TRAIN_TEXTS).alphabet


def test_a_single_string_is_one_training_text():
    assert CharacterTokenizer.train("ba").alphabet == "ab"
    assert BPETokenizer.train("hello hello hello", vocab_size=300).encode("hello") == \
        BPETokenizer.train(["hello hello hello"], vocab_size=300).encode("hello")


# --- round trips -----------------------------------------------------------------------------------------


# Text that a Unicode normalizer would change (NFC, NFD, NFKC or NFKD), each a few code points: random
# st.text() almost never draws one, so the property test mixes them in.
UNNORMALISED = ["e\u0301", "\xe9", "\u212b", "A\u030a", "\ufb01", "\uff21", "\u1e9b\u0323", "n\u0303",
                "\u0958", "\u2460", "\u00bd", "\u3000", "\uac00", "\u1100\u1161"]
any_text = st.lists(st.one_of(st.text(), st.sampled_from(UNNORMALISED)), max_size=8).map("".join)


@FAST
@given(text=any_text)
def test_bpe_round_trips_any_unicode(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size and i > bpe.eos_id for i in ids)
    assert bpe.decode(ids) == text


@pytest.mark.parametrize("text", UNNORMALISED)
def test_bpe_keeps_text_unnormalised(bpe, text):
    """No Unicode normalizer: a decomposed "e\u0301" stays two code points, a ligature stays one."""
    assert bpe.decode(bpe.encode(text)) == text
    for form in ("NFC", "NFD", "NFKC", "NFKD"):
        other = unicodedata.normalize(form, text)
        if other != text:
            assert bpe.encode(other) != bpe.encode(text), f"{text!r} and its {form} {other!r} must differ"


@FAST
@given(text=st.text())
def test_bpe_token_bytes_add_up_to_the_texts_utf8(bpe, text):
    table = bpe.token_bytes()
    assert b"".join(table[i] for i in bpe.encode(text)) == text.encode("utf-8")
    assert table[:3] == [b"", b"", b""] and len(table) == bpe.vocab_size


@FAST
@given(data=st.data())
def test_char_token_bytes_add_up_to_the_texts_utf8(char, data):
    text = data.draw(st.text(alphabet=st.sampled_from(char.alphabet)))
    table = char.token_bytes()
    assert b"".join(table[i] for i in char.encode(text, add_special_tokens=True)) == text.encode("utf-8")
    assert table[char.unk_id] == b""  # it spells no character of the text (bits per byte count those apart)


@FAST
@given(data=st.data())
def test_char_round_trips_text_over_its_alphabet(char, data):
    text = data.draw(st.text(alphabet=st.sampled_from(char.alphabet)))
    assert char.decode(char.encode(text)) == text
    assert char.count_unknown(text) == 0


@FAST
@given(text=st.text())
def test_char_encode_matches_a_plain_dict_lookup(char, text):
    # An independent, obviously correct encoder, to hold the vectorised one against.
    table = {c: i + 4 for i, c in enumerate(char.alphabet)}
    expected = [table.get(c, char.unk_id) for c in text]
    assert char.encode(text) == expected
    assert char.count_unknown(text) == expected.count(char.unk_id)


def test_char_unknown_characters_count_and_decode_visibly(char):
    text = "héllo ∑ 🦀 x"  # ∑ and 🦀 never appear in training
    assert char.count_unknown(text) == 2
    ids = char.encode(text)
    assert ids.count(char.unk_id) == 2
    assert char.decode(ids) == "héllo \ufffd \ufffd x"
    assert char.decode(ids, skip_special_tokens=False) == "héllo \ufffd \ufffd x"
    assert char.count_unknown("") == 0
    assert char.count_unknown("\ud800") == 1  # a lone surrogate is just another unseen character


def test_encode_batch_equals_encode_one_by_one(tok):
    texts = ["", "hello", MULTIBYTE_TEXT, SPECIAL_SPELLINGS, "∑ unseen 🦀", *TRAIN_TEXTS[:3]]
    for flags in ({}, {"add_special_tokens": True}, {"allow_special": True}):
        assert tok.encode_batch(texts, **flags) == [tok.encode(t, **flags) for t in texts]
    assert tok.encode_batch(iter(texts)) == [tok.encode(t) for t in texts]


# --- special tokens ---------------------------------------------------------------------------------------


def test_special_spellings_in_text_are_ordinary_text(tok):
    ids = tok.encode(SPECIAL_SPELLINGS)
    assert not {tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id} & set(ids)
    assert tok.decode(ids) == SPECIAL_SPELLINGS
    assert tok.encode("<|eos|>") != [tok.eos_id]


def test_allow_special_reads_special_spellings_as_special_tokens(tok):
    ids = tok.encode("hi<|eos|>", allow_special=True)
    assert ids[-1] == tok.eos_id and ids[:-1] == tok.encode("hi")
    assert tok.encode("<|pad|><|bos|>", allow_special=True) == [tok.pad_id, tok.bos_id]


def test_add_special_tokens_wraps_in_bos_and_eos(tok):
    plain = tok.encode("hello")
    assert tok.encode("hello", add_special_tokens=True) == [tok.bos_id, *plain, tok.eos_id]
    assert tok.encode("", add_special_tokens=True) == [tok.bos_id, tok.eos_id]
    wrapped = tok.encode("hello", add_special_tokens=True)
    assert tok.decode(wrapped) == "hello"
    assert tok.decode(wrapped, skip_special_tokens=False) == "<|bos|>hello<|eos|>"


# --- streaming decode -------------------------------------------------------------------------------------


def test_bpe_decode_stream_emits_whole_characters_only(bpe):
    ids = bpe.encode(MULTIBYTE_TEXT, add_special_tokens=True)
    stream = bpe.decode_stream()
    chunks = [stream.step(i) for i in ids]
    # Some emoji/CJK characters span several byte tokens: the stream must have waited on them.
    assert None in chunks
    text = "".join(c for c in chunks if c is not None)
    assert text == bpe.decode(ids) == MULTIBYTE_TEXT
    assert "\ufffd" not in text


def test_decode_stream_keeps_special_tokens_when_asked(tok):
    ids = tok.encode("a 世界", add_special_tokens=True)
    stream = tok.decode_stream(skip_special_tokens=False)
    text = "".join(c for c in map(stream.step, ids) if c is not None)
    assert text == tok.decode(ids, skip_special_tokens=False) == "<|bos|>a 世界<|eos|>"


@settings(max_examples=50, deadline=None)
@given(text=any_text)
def test_decode_stream_concatenates_to_decode(tok, text):
    ids = tok.encode(text)
    stream = tok.decode_stream()
    assert "".join(c for c in map(stream.step, ids) if c is not None) == tok.decode(ids)


# --- save and load ----------------------------------------------------------------------------------------


def test_save_then_load_gives_an_identical_tokenizer(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    loaded = load_tokenizer(path)
    assert type(loaded) is type(tok)
    assert (loaded.kind, loaded.vocab_size, loaded.unk_id) == (tok.kind, tok.vocab_size, tok.unk_id)
    texts = [MULTIBYTE_TEXT, SPECIAL_SPELLINGS, "∑ unseen 🦀", *TRAIN_TEXTS[:3]]
    for text in texts:
        for flags in ({}, {"add_special_tokens": True}, {"allow_special": True}):
            assert loaded.encode(text, **flags) == tok.encode(text, **flags)
    ids = list(range(tok.vocab_size))
    assert loaded.decode(ids, skip_special_tokens=False) == tok.decode(ids, skip_special_tokens=False)
    # A folder works too (the run folder holds tokenizer.json); saving is repeatable and leaves no temp files.
    loaded.save(tmp_path)
    assert load_tokenizer(tmp_path).encode(MULTIBYTE_TEXT) == tok.encode(MULTIBYTE_TEXT)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]


def test_pickle_and_deepcopy_keep_special_tokens_reserved(tok):
    # DataLoader workers and multiprocessing receive tokenizers by pickling.
    for copied in (pickle.loads(pickle.dumps(tok)), copy.deepcopy(tok)):
        for allow_special in (False, True):
            expected = tok.encode(SPECIAL_SPELLINGS, allow_special=allow_special)
            assert copied.encode(SPECIAL_SPELLINGS, allow_special=allow_special) == expected


def test_char_file_says_its_kind(char, tmp_path):
    char.save(tmp_path / "tokenizer.json")
    raw = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert raw["type"] == "minillm-char"
    assert raw["alphabet"] == char.alphabet


def test_huggingface_tokenizers_loads_the_bpe_file_with_the_same_ids(bpe, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    path = tmp_path / "tokenizer.json"
    bpe.save(path)
    hf = HFTokenizer.from_file(str(path))
    for text in (MULTIBYTE_TEXT, *TRAIN_TEXTS[:3]):
        assert hf.encode(text, add_special_tokens=False).ids == bpe.encode(text)
        assert hf.encode(text).ids == bpe.encode(text, add_special_tokens=True)
        assert hf.decode(bpe.encode(text)) == text
    # HF's own convention matches special spellings; its documented flag gives our reserved behaviour.
    hf_ids = hf.encode(SPECIAL_SPELLINGS, add_special_tokens=False).ids
    assert hf_ids == bpe.encode(SPECIAL_SPELLINGS, allow_special=True)
    hf.encode_special_tokens = True
    assert hf.encode(SPECIAL_SPELLINGS, add_special_tokens=False).ids == bpe.encode(SPECIAL_SPELLINGS)


def test_the_char_tokenizers_hugging_face_form_gives_every_character_its_id(char):
    """Every character of the vocabulary, the alphabet's last ones included, encodes to our id and decodes back
    in Hugging Face's tokenizers (what the HF export writes)."""
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_str(json.dumps(char.hugging_face_json()))
    assert hf.get_vocab_size() == char.vocab_size
    alphabet = char.alphabet
    assert len(alphabet) > 50 and any(len(c.encode("utf-8")) == 4 for c in alphabet)
    ids = char.encode(alphabet)
    assert hf.encode(alphabet, add_special_tokens=False).ids == ids == list(range(4, char.vocab_size))
    assert [hf.id_to_token(i) for i in ids] == list(alphabet)
    assert [hf.decode([i]) for i in ids] == list(alphabet)
    assert hf.decode(ids) == alphabet and hf.decode(list(reversed(ids))) == alphabet[::-1]


def test_transformers_loads_the_bpe_file_with_the_same_ids(bpe, tmp_path):
    transformers = import_dev_dependency("transformers")

    path = tmp_path / "tokenizer.json"
    bpe.save(path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path), split_special_tokens=True)
    for text in (MULTIBYTE_TEXT, SPECIAL_SPELLINGS, *TRAIN_TEXTS[:3]):
        assert hf.encode(text, add_special_tokens=False) == bpe.encode(text)
        assert hf(text)["input_ids"] == bpe.encode(text, add_special_tokens=True)
    ids = bpe.encode(MULTIBYTE_TEXT, add_special_tokens=True)
    assert hf.decode(ids, skip_special_tokens=True) == bpe.decode(ids) == MULTIBYTE_TEXT


# --- bad input: one clear MiniLLMError each ----------------------------------------------------------------


@pytest.mark.parametrize("texts", ["", [], ["", "  \n\t "], "   "])
@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_training_on_blank_text_is_refused(kind, texts):
    with pytest.raises(MiniLLMError, match="empty or only whitespace"):
        if kind == "bpe":
            BPETokenizer.train(texts, vocab_size=300)
        else:
            CharacterTokenizer.train(texts)


def test_training_on_non_strings_is_refused():
    with pytest.raises(MiniLLMError, match="must be strings, got bytes"):
        CharacterTokenizer.train([b"bytes"])
    with pytest.raises(MiniLLMError, match="must be strings, got int"):
        BPETokenizer.train(["ok", 3], vocab_size=300)


@pytest.mark.parametrize("vocab_size", [0, 256, 258, 300.0])
def test_bpe_vocab_below_bytes_plus_specials_is_refused(vocab_size):
    with pytest.raises(MiniLLMError, match="at least 259"):
        BPETokenizer.train(TRAIN_TEXTS, vocab_size=vocab_size)
    assert BPETokenizer.train(TRAIN_TEXTS, vocab_size=259).vocab_size == 259


def test_missing_tokenizer_file_is_refused(tmp_path):
    with pytest.raises(MiniLLMError, match="not found"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(MiniLLMError, match="not found"):
        load_tokenizer(tmp_path)  # a folder without tokenizer.json


def test_tokenizer_file_that_is_not_json_is_refused(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"type": "minillm-char", "alph', encoding="utf-8")
    with pytest.raises(MiniLLMError, match="not valid JSON"):
        load_tokenizer(path)
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(MiniLLMError, match="not valid JSON"):
        load_tokenizer(path)


@pytest.mark.parametrize("content", [[1, 2], "x", {"type": "sentencepiece"}, {"model": {"type": "Unigram"}}])
def test_tokenizer_file_of_unknown_kind_is_refused(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(MiniLLMError, match="unknown kind"):
        load_tokenizer(path)


def test_damaged_tokenizer_files_are_refused(bpe, char, tmp_path):
    path = tmp_path / "tokenizer.json"
    char.save(path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    for broken, message in [({**raw, "alphabet": "aa"}, "twice"), ({**raw, "alphabet": 5}, "damaged"),
                            ({**raw, "version": 99}, "version 99")]:
        path.write_text(json.dumps(broken), encoding="utf-8")
        with pytest.raises(MiniLLMError, match=message):
            load_tokenizer(path)
    bpe.save(path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**raw, "model": {"type": "BPE", "vocab": 3}}), encoding="utf-8")
    with pytest.raises(MiniLLMError, match="broken BPE"):
        load_tokenizer(path)


def test_a_foreign_bpe_file_without_special_tokens_is_refused_by_load_and_completed_by_import(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, trainers

    foreign = HFTokenizer(models.BPE())
    foreign.train_from_iterator(TRAIN_TEXTS, trainers.BpeTrainer(vocab_size=100, show_progress=False))
    foreign.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(MiniLLMError, match="has no pad/bos/eos token .* --tokenizer-file"):
        load_tokenizer(tmp_path / "tokenizer.json")
    tok, added = import_tokenizer(tmp_path / "tokenizer.json")
    size = foreign.get_vocab_size()
    assert added == ["<|pad|>", "<|bos|>", "<|eos|>"]
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (size, size + 1, size + 2) and tok.vocab_size == size + 3


def test_a_gpt2_style_tokenizer_keeps_its_ids_and_gets_a_padding_token(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    path = save_gpt2_style_tokenizer(tmp_path / "tokenizer.json", TRAIN_TEXTS)
    original = HFTokenizer.from_file(str(path))
    endoftext = original.token_to_id("<|endoftext|>")
    assert endoftext == original.get_vocab_size() - 1  # last, as in GPT-2
    tok, added = import_tokenizer(path)
    assert added == ["<|pad|>"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (endoftext, endoftext, endoftext + 1)
    assert tok.encode(MULTIBYTE_TEXT) == original.encode(MULTIBYTE_TEXT).ids  # no id changed
    assert tok.decode(tok.encode(MULTIBYTE_TEXT)) == MULTIBYTE_TEXT
    assert tok.encode("hi", add_special_tokens=True) == [endoftext, *tok.encode("hi"), endoftext]
    assert tok.decode([endoftext, *tok.encode("hi"), tok.pad_id]) == "hi"  # the roles are special: skipped

    run = tmp_path / "run"
    run.mkdir()
    tok.save(run / "tokenizer.json")
    save_special_tokens(tok, run / "special_tokens.json", added, str(path))
    loaded = load_tokenizer(run)
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (tok.pad_id, tok.bos_id, tok.eos_id)
    assert loaded.fingerprint() == tok.fingerprint() and import_tokenizer(run / "tokenizer.json")[1] == []
    assert pickle.loads(pickle.dumps(loaded)).role_tokens() == loaded.role_tokens()


def test_a_llama_style_tokenizer_fills_the_roles_from_its_own_tokens(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, trainers

    llama = HFTokenizer(models.BPE(unk_token="<unk>"))
    llama.train_from_iterator(TRAIN_TEXTS, trainers.BpeTrainer(vocab_size=120, show_progress=False,
                                                               special_tokens=["<unk>", "<s>", "</s>"]))
    llama.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(MiniLLMError, match="has no pad token"):  # Llama has none
        load_tokenizer(tmp_path / "tokenizer.json")
    tok, added = import_tokenizer(tmp_path / "tokenizer.json")
    size = llama.get_vocab_size()
    assert added == ["<|pad|>"]
    assert tok.role_tokens() == {"pad": ("<|pad|>", size), "bos": ("<s>", 1), "eos": ("</s>", 2)}


def test_special_tokens_recorded_beside_a_tokenizer_must_match_it(bpe, tmp_path):
    bpe.save(tmp_path / "tokenizer.json")
    save_special_tokens(bpe, tmp_path / "special_tokens.json", [], "trained")
    assert load_tokenizer(tmp_path).role_tokens() == bpe.role_tokens()
    record = json.loads((tmp_path / "special_tokens.json").read_text(encoding="utf-8"))
    (tmp_path / "special_tokens.json").write_text(json.dumps({**record, "eos": {"token": "<|eos|>", "id": 7}}))
    with pytest.raises(MiniLLMError, match="not in it at the recorded ids"):
        load_tokenizer(tmp_path)
    (tmp_path / "special_tokens.json").write_text(json.dumps({"pad": 0}))
    with pytest.raises(MiniLLMError, match="special_tokens.json is damaged"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("content, message", [
    ({"model": {"type": "WordPiece", "vocab": {"a": 0}}}, "is a Hugging Face WordPiece tokenizer"),
    ({"model_type": "llama", "hidden_size": 4096}, "unknown kind"),
    ([1, 2, 3], "unknown kind"),
])
def test_importing_a_file_that_is_not_a_bpe_tokenizer_is_one_clear_error(tmp_path, content, message):
    (tmp_path / "config.json").write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(MiniLLMError, match=message):
        import_tokenizer(tmp_path / "config.json")


@pytest.mark.parametrize("bad_id", [-1, "vocab_size", "vocab_size+5"])
def test_decoding_ids_outside_the_vocabulary_is_refused(tok, bad_id):
    bad_id = {"vocab_size": tok.vocab_size, "vocab_size+5": tok.vocab_size + 5}.get(bad_id, bad_id)
    with pytest.raises(MiniLLMError, match=f"token id {bad_id} is outside the vocabulary"):
        tok.decode([5, bad_id])
    with pytest.raises(MiniLLMError, match="outside the vocabulary"):
        tok.decode_stream().step(bad_id)
    assert tok.decode([tok.vocab_size - 1]) == tok.decode(iter([tok.vocab_size - 1]))


def test_encoding_non_text_is_refused(tok):
    with pytest.raises(MiniLLMError, match="can only encode text"):
        tok.encode(b"bytes")
    with pytest.raises(MiniLLMError, match="can only encode text"):
        tok.encode_batch(["ok", None])


def test_bpe_refuses_lone_surrogates_clearly(bpe):
    with pytest.raises(MiniLLMError, match="lone surrogate"):
        bpe.encode("a\ud800b")
    with pytest.raises(MiniLLMError, match="lone surrogate"):
        bpe.encode_batch(["ok", "a\udfffb"])


def test_a_failure_that_is_not_a_surrogate_is_reported_as_what_it_is(tmp_path):
    """The Rust library calls every failure to read a str "must be str": under a memory limit, valid text is
    out of memory, not a lone surrogate (a real limit, in a process of its own)."""
    script = """
import resource
from minillm.errors import MiniLLMError
from minillm.tokenizers import BPETokenizer
tok = BPETokenizer.train(["h\u00e9llo w\u00f6rld " * 100], vocab_size=300)
text = "\u00e9" * 30_000_000  # 30 MB as a str, 60 MB more once copied as UTF-8
size = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (size + 20 * 2**20, size + 20 * 2**20))
for encode in (tok.encode, lambda t: tok.encode_batch(["ok", t])):
    try:
        encode(text)
    except MiniLLMError as e:
        print(e)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout + result.stderr
    for line in lines:
        assert "out of memory while tokenizing" in line and "surrogate" not in line


# --- imported tokenizers that spell text otherwise ------------------------------------------------------

@pytest.fixture(scope="module", params=["llama2", "metaspace"])
def llama_style(request, tmp_path_factory) -> BPETokenizer:
    path = save_llama_style_tokenizer(tmp_path_factory.mktemp(request.param) / "tokenizer.json", TRAIN_TEXTS,
                                      style=request.param)
    return import_tokenizer(path)[0]


@FAST
@given(text=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581")))
def test_a_llama_style_tokenizer_spells_any_text_in_its_token_bytes(llama_style, text):
    """Bits per byte count what the tokens spell: "▁" is a space, <0xNN> the byte NN (no KeyError), and the
    space these tokenizers put before a text (SentencePiece's dummy prefix) is spelled too. (Any text but one
    holding "▁" itself: these tokenizers write a space as "▁", so a "▁" in the text reads back as a space, in
    SentencePiece as here.)"""
    table = llama_style.token_bytes()
    ids = llama_style.encode(text)
    spelled = b"".join(table[i] for i in ids)
    assert spelled in (text.encode("utf-8"), b" " + text.encode("utf-8"))  # (no prefix before a space in Mistral's)
    decoded = llama_style.decode(ids)  # (Mistral's decoder drops the space a text begins with: its way, kept)
    assert decoded in (text, text.removeprefix(" ")) and not llama_style.unspelled(text)
    assert "".join(filter(None, map(llama_style.decode_stream().step, ids))) == decoded


def test_a_llama_style_tokenizer_falls_back_to_bytes(llama_style):
    assert llama_style.spells_every_text and llama_style.role_tokens()["bos"] == ("<s>", 1)
    ids = llama_style.encode("🦀")  # (not in its training text)
    assert [llama_style.token_text(i) for i in ids][-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x80>"]


def word_level_bpe(path, with_unknown: bool):
    """A BPE that splits on whitespace and knows only the characters of its training text: no byte fallback,
    no byte level. With an unknown token, other characters become it; without, they are dropped."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE(unk_token="<unk>") if with_unknown else models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator(["the cat sees the moon"] * 20, trainers.BpeTrainer(
        vocab_size=60, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False))
    hf.save(str(path))
    return import_tokenizer(path)[0]


@pytest.mark.parametrize("with_unknown", [True, False])
def test_what_a_tokenizer_cannot_spell_is_counted(tmp_path, char, with_unknown):
    tok = word_level_bpe(tmp_path / "tokenizer.json", with_unknown)
    assert not tok.spells_every_text
    text = "the cat sees 世界, the moon"
    # Spaces are split away, and 世, 界 and "," are not in its alphabet.
    assert tok.unspelled(text) == {" ": 5, "世": 1, "界": 1, ",": 1}
    assert tok.count_unknown(text) == 8
    table = tok.token_bytes()
    spelled = b"".join(table[i] for i in tok.encode(text))
    assert spelled == b"thecatseesthemoon" and (not with_unknown or table[tok.unk_id] == b"")
    assert char.unspelled("héllo ∑ 🦀 x") == {"∑": 1, "🦀": 1}


def test_bpe_dropout_is_turned_off_when_a_tokenizer_is_loaded(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    path = save_gpt2_style_tokenizer(tmp_path / "gpt2" / "tokenizer.json", TRAIN_TEXTS)
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw["model"]["dropout"] = 0.5
    path.write_text(json.dumps(raw), encoding="utf-8")
    with_dropout = HFTokenizer.from_file(str(path))
    text = TRAIN_TEXTS[0] * 3
    assert len({tuple(with_dropout.encode(text).ids) for _ in range(10)}) > 1  # as written: random merges
    tok, _ = import_tokenizer(path)
    assert len({tuple(tok.encode(text)) for _ in range(10)}) == 1
    assert len(tok.encode(text)) < len(with_dropout.encode(text).ids)  # every merge, as without dropout
    assert tok.notes and "dropout 0.5" in tok.notes[0] and "turned off" in tok.notes[0]
    tok.save(tmp_path / "tokenizer.json")  # the run's copy
    assert json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))["model"]["dropout"] is None
