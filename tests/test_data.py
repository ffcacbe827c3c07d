"""Data preparation: reading files, splitting, token streams and batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.config import IGNORE_INDEX, TrainConfig
from minillm.data import prepare, streams
from minillm.data.batches import LMBatches, PairBatches
from minillm.data.corpus import (
    AUTO_TASK,
    JSONL_FILE,
    PAIRS,
    TEXT,
    TEXT_FILE,
    TSV_FILE,
    contiguous_split,
    detect_format,
    parse_pairs,
    read_text_file,
    shuffled_split,
    split_data,
    split_samples,
)
from minillm.data.sources import describe_samples, load_samples
from minillm.data.split_record import SplitRecord
from minillm.data.streams import read_stream, token_dtype, write_pair_streams, write_token_stream
from minillm.data.tasks import task_for
from minillm.errors import MiniLLMError
from minillm.tokenizers import CharacterTokenizer, train_tokenizer

CPU = torch.device("cpu")


# -- reading -----------------------------------------------------------------------------------------------


def test_read_text_file_drops_bom_and_normalises_line_ends(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffhello\r\nworld\r\n".encode())
    assert read_text_file(path) == "hello\nworld\n"


@pytest.mark.parametrize("content, needle", [
    (None, "not found"),
    (b"", "empty"),
    (b"  \n\t\n", "empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
    ("caf\u00e9 cr\u00e8me".encode("latin-1"), "not UTF-8"),
])
def test_unreadable_files_are_clear_errors_naming_the_file(tmp_path, content, needle):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(MiniLLMError, match=needle) as info:
        read_text_file(path)
    assert str(path) in str(info.value)


# -- samples and splits ------------------------------------------------------------------------------------


def test_split_samples_modes():
    text = "a b\nc\n\n\n  \nd\n\ne<SEP>f"
    assert split_samples(text, "paragraph") == ["a b\nc", "d", "e<SEP>f"]
    assert split_samples(text, "line") == ["a b", "c", "d", "e<SEP>f"]
    assert split_samples(text, "separator", "<SEP>") == ["a b\nc\n\n\n  \nd\n\ne", "f"]


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab \n\t"), max_size=200))
def test_paragraph_split_keeps_every_visible_character_in_order(text):
    samples = split_samples(text, "paragraph")
    assert all(s.strip() for s in samples)
    assert all("\n\n" not in s for s in samples)
    visible = "".join(text.split())
    assert "".join("".join(s.split()) for s in samples) == visible


def test_shuffled_split_is_a_seeded_partition():
    split = shuffled_split(100, 0.05, 0.05, seed=1)
    assert sorted(split["train"] + split["val"] + split["test"]) == list(range(100))
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (90, 5, 5)
    assert split == shuffled_split(100, 0.05, 0.05, seed=1)
    assert split != shuffled_split(100, 0.05, 0.05, seed=2)


def test_small_splits_still_get_one_sample_each():
    split = shuffled_split(3, 0.05, 0.05, seed=0)
    assert [len(split[name]) for name in ("train", "val", "test")] == [1, 1, 1]
    with pytest.raises(MiniLLMError, match="too few"):
        shuffled_split(2, 0.05, 0.05, seed=0)


def test_few_huge_samples_fall_back_to_contiguous_chunks():
    text = "".join(f"line {i}\n" for i in range(1000))  # one paragraph
    splits, record = split_data(TEXT, [text], "f.txt", 0.1, 0.1, seed=0)
    assert record.contiguous
    joined = {name: "".join(pieces) for name, pieces in splits.items()}
    assert joined["train"] + joined["val"] + joined["test"] == text
    assert joined["val"].startswith("line ") and joined["test"].startswith("line ")  # cut at line ends
    assert 0.75 < len(joined["train"]) / len(text) < 0.85


def test_contiguous_split_of_too_little_text_is_an_error():
    with pytest.raises(MiniLLMError, match="too short"):
        contiguous_split("ab", 0.05, 0.05)


# -- pair files --------------------------------------------------------------------------------------------


def test_detect_format_by_extension_and_content(tmp_path):
    assert detect_format(tmp_path / "x.tsv", "anything")[0] == TSV_FILE
    assert detect_format(tmp_path / "x.jsonl", "anything") == (JSONL_FILE, "by its .jsonl extension")
    jsonl = "\n".join(json.dumps({"input": str(i), "output": str(-i)}) for i in range(5))
    assert detect_format(tmp_path / "x.txt", jsonl)[0] == JSONL_FILE
    assert detect_format(tmp_path / "x.txt", "abc\tcba\nxy\tyx\n")[0] == TSV_FILE
    three = detect_format(tmp_path / "x.txt", "Hi.\tSalut.\tCC-BY\nRun!\tCours !\tCC-BY\n")
    assert three == (TSV_FILE, "by its content: every line has 3 tab-separated columns")
    assert detect_format(tmp_path / "x.txt", "Just some prose.\nWith\ttabs\there.\n")[0] == TEXT_FILE
    assert detect_format(tmp_path / "x.txt", "\tindented\n\tverse\n")[0] == TEXT_FILE


def test_parse_pairs_tsv_and_jsonl(tmp_path):
    pairs = parse_pairs("p.tsv", "ab\tba\n\ncd\tdc\nef\tfe\n", TSV_FILE)
    assert pairs == [("ab", "ba"), ("cd", "dc"), ("ef", "fe")]
    jsonl = "\n".join(json.dumps({"input": f"q{i}", "output": f"a{i}"}) for i in range(3))
    assert parse_pairs("p.jsonl", jsonl, JSONL_FILE)[2] == ("q2", "a2")
    with pytest.raises(MiniLLMError, match="line 2 has 1 tab-separated columns, line 1 has 2"):
        parse_pairs("p.tsv", "ab\tba\nno tab here\ncd\tdc\n", TSV_FILE)
    with pytest.raises(MiniLLMError, match="line 1 has no tab.*--format text"):
        parse_pairs("p.tsv", "no tab\nat all\nhere\n", TSV_FILE)
    with pytest.raises(MiniLLMError, match="line 3: column 'input' holds 1, not text"):
        parse_pairs("p.jsonl", '{"input": "a", "output": "b"}\n\n{"input": 1, "output": "c"}\n', JSONL_FILE)
    with pytest.raises(MiniLLMError, match="line 1 is not a JSON object"):
        parse_pairs("p.jsonl", '["input", "output"]\n', JSONL_FILE)
    with pytest.raises(MiniLLMError, match=r"no column 'output'; its columns are \['input'\]"):
        parse_pairs("p.jsonl", '{"input": "a"}\n', JSONL_FILE)


TATOEBA = "Hi.\tSalut.\tCC-BY 2.0 (France) Attribution: tatoeba.org #538123\n" * 3 + "Run!\tCours !\tCC-BY\n"


def test_extra_tsv_columns_are_left_out_with_a_warning_or_chosen():
    notes = []
    pairs = parse_pairs("fra.tsv", TATOEBA, TSV_FILE, notes=notes)
    assert pairs[-1] == ("Run!", "Cours !")
    [warning] = notes
    assert warning.startswith("warning: fra.tsv has 3 tab-separated columns") and "--target-column" in warning
    notes = []
    assert parse_pairs("fra.tsv", TATOEBA, TSV_FILE, 2, 1, notes)[-1] == ("Cours !", "Run!")
    assert notes == []  # columns chosen: nothing to warn about
    with pytest.raises(MiniLLMError, match="--target-column 4 is not a column of fra.tsv.*3 tab-separated"):
        parse_pairs("fra.tsv", TATOEBA, TSV_FILE, target_column=4)
    with pytest.raises(MiniLLMError, match="both 1"):
        parse_pairs("fra.tsv", TATOEBA, TSV_FILE, 1, 1)
    assert parse_pairs("fra.tsv", TATOEBA, TSV_FILE, "2", "1")[-1] == ("Cours !", "Run!")  # (as the option gives it)
    for column in ("0", "first"):
        with pytest.raises(MiniLLMError, match=f"--source-column of a TSV file is a column number from 1.*'{column}'"):
            parse_pairs("fra.tsv", TATOEBA, TSV_FILE, column)


def test_every_target_empty_is_refused():
    with pytest.raises(MiniLLMError, match=r"every target \(column 2\) in p.tsv is empty.*--target-column"):
        parse_pairs("p.tsv", "a\t\nb\t \nc\t\n", TSV_FILE)
    jsonl = "\n".join(json.dumps({"input": f"q{i}", "output": ""}) for i in range(3))
    with pytest.raises(MiniLLMError, match="every target"):
        parse_pairs("p.jsonl", jsonl, JSONL_FILE)


def test_a_training_split_of_empty_targets_is_refused(tmp_path):
    config = TrainConfig(data=str(tmp_path / "p.tsv"), val_fraction=0.2, test_fraction=0.2)
    held_out = {i for name in ("val", "test") for i in shuffled_split(10, 0.2, 0.2, config.seed)[name]}
    (tmp_path / "p.tsv").write_text("".join(f"s{i}\t{'t' if i in held_out else ''}\n" for i in range(10)))
    with pytest.raises(MiniLLMError, match="every target of the 6 training pairs .* is empty"):
        prepare.read_data(config, encoder_decoder=True, log=print)


def test_a_training_split_of_0_tokens_is_refused_before_the_run_is_written(tmp_path):
    pairs = {"train": [("a", ""), ("b", "")], "val": [("c", "d")], "test": [("e", "f")]}
    data = prepare.SplitData(path=tmp_path / "p.tsv", task=task_for(PAIRS, True), splits=pairs,
                             record=SplitRecord(PAIRS))
    with pytest.raises(MiniLLMError, match="training split of .*p.tsv has 0 tokens"):
        prepare.write_data(tmp_path / "run", data, "char", 300)
    assert not (tmp_path / "run" / "split.json").exists()


def test_the_format_is_said_and_can_be_overridden(tmp_path):
    path = tmp_path / "pairs.txt"  # a pair file without the .tsv extension
    path.write_text("ab\tba\ncd\tdc\nef\tfe\n", encoding="utf-8")
    loaded = load_samples(path, AUTO_TASK, "paragraph", "")
    assert (loaded.task, loaded.file_format) == (PAIRS, TSV_FILE)
    said = describe_samples(loaded, "paragraph")
    assert said == ("data file: pairs.txt read as tab-separated pairs (by its content: every line has 2 tab-separated "
                    "columns; --format text|tsv|jsonl overrides): 3 pairs, 12 characters")
    as_text = load_samples(path, AUTO_TASK, "line", "", file_format=TEXT_FILE)
    assert (as_text.task, as_text.samples, as_text.how) == (TEXT, ["ab\tba", "cd\tdc", "ef\tfe"], "as --format says")
    tsv = tmp_path / "prose.tsv"
    tsv.write_text("no tabs\n\nin here\n", encoding="utf-8")
    assert load_samples(tsv, AUTO_TASK, "paragraph", "", file_format=TEXT_FILE).samples == ["no tabs", "in here"]
    with pytest.raises(MiniLLMError, match="are for pair files"):
        load_samples(tsv, AUTO_TASK, "paragraph", "", file_format=TEXT_FILE, target_column=2)


def test_a_pair_file_is_pairs_by_default_and_text_samples_for_the_text_task(tmp_path):
    path = tmp_path / "p.tsv"
    path.write_text("ab\tba\ncd\tdc\nef\tfe\n", encoding="utf-8")
    assert load_samples(path, AUTO_TASK, "paragraph", "").task == PAIRS
    assert load_samples(path, PAIRS, "paragraph", "").task == PAIRS
    loaded = load_samples(path, TEXT, "paragraph", "")
    assert loaded.task == TEXT and loaded.samples[0] == "ab\nba"
    assert "3 pairs, as text samples" in describe_samples(loaded, "paragraph")
    text = tmp_path / "prose.txt"
    text.write_text("a paragraph\n\nanother one\n", encoding="utf-8")
    assert load_samples(text, AUTO_TASK, "paragraph", "").task == TEXT
    with pytest.raises(MiniLLMError, match="--task pairs needs a file of .*pairs, but .*prose.txt is read as plain"):
        load_samples(text, PAIRS, "paragraph", "")


# -- token streams -----------------------------------------------------------------------------------------


@pytest.fixture
def char_tokenizer():
    return CharacterTokenizer.train(["abcdefgh \n"])


def test_token_dtype_fits_the_vocabulary():
    assert token_dtype(65) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_token_stream_is_samples_between_bos_and_eos_and_streaming_changes_nothing(tmp_path, char_tokenizer,
                                                                             monkeypatch):
    samples = ["abc", "de f", "gh\nab"] * 50
    expected = []
    for sample in samples:
        expected += [char_tokenizer.bos_id, *char_tokenizer.encode(sample), char_tokenizer.eos_id]
    count = write_token_stream(tmp_path / "a.bin", char_tokenizer, iter(samples), np.dtype(np.uint16))
    monkeypatch.setattr(streams, "ENCODE_CHUNK_CHARS", 7)  # many small encode_batch calls
    write_token_stream(tmp_path / "b.bin", char_tokenizer, iter(samples), np.dtype(np.uint16))
    a, b = read_stream(tmp_path / "a.bin", "uint16"), read_stream(tmp_path / "b.bin", "uint16")
    assert count == len(expected)
    assert a.tolist() == expected
    assert b.tolist() == expected


def test_lm_batches_are_shifted_windows_of_the_stream():
    tokens = np.arange(100, dtype=np.uint16)
    batches = LMBatches(tokens, max_seq_len=8)
    batch = batches.sample(4, torch.Generator().manual_seed(0), CPU)
    x, y = batch["input_ids"], batch["targets"]
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.long
    assert torch.equal(y, x + 1)  # y is x shifted by one position in the stream
    again = batches.sample(4, torch.Generator().manual_seed(0), CPU)
    assert torch.equal(again["input_ids"], x)


def test_sequential_windows_score_every_token_once():
    tokens = np.arange(0, 53, dtype=np.uint16)  # 53 tokens: 52 predictions (0 is the pad id: scored like any)
    batches = LMBatches(tokens, max_seq_len=8)
    scored = []
    total = 0
    for batch, n in batches.sequential(3, CPU):
        targets = batch["targets"]
        scored += targets[targets != IGNORE_INDEX].tolist()
        total += n
    assert sorted(scored) == list(range(1, 53))
    assert total == 52
    for batch, _ in batches.sequential(3, CPU):  # the inputs are the stream's own tokens, the tail's too
        assert (batch["input_ids"][:, 1:] - batch["input_ids"][:, :-1] == 1).all()


def test_a_split_shorter_than_the_block_gets_shorter_windows():
    batches = LMBatches(np.arange(1, 6, dtype=np.uint16), max_seq_len=32)
    batch = batches.sample(2, torch.Generator().manual_seed(0), CPU)
    assert batch["input_ids"].shape == (2, 4)


def test_encoder_decoder_windows_split_into_source_and_continuation():
    tokens = np.arange(10, 60, dtype=np.uint16)
    batches = LMBatches(tokens, max_seq_len=8, encoder_decoder=True, source_fraction=0.5, bos_id=1)
    batch = batches.sample(2, torch.Generator().manual_seed(0), CPU)
    src, tgt_in, targets = batch["src_ids"], batch["tgt_ids"], batch["targets"]
    assert src.shape[1] + targets.shape[1] == 9  # one window of max_seq_len + 1 tokens
    assert torch.equal(targets[:, 0], src[:, -1] + 1)  # the continuation follows the source
    assert (tgt_in[:, 0] == 1).all() and torch.equal(tgt_in[:, 1:], targets[:, :-1])


def test_pair_batches_pad_and_shift(tmp_path, char_tokenizer):
    pairs = [("abc", "cba"), ("a", "hgfe"), ("de", "")]
    write_pair_streams(tmp_path, "train", char_tokenizer, pairs, np.dtype(np.uint16))
    offsets = np.load(tmp_path / "train.offsets.npy")
    tok = char_tokenizer
    batches = PairBatches(read_stream(tmp_path / "train.src.bin", "uint16"),
                          read_stream(tmp_path / "train.tgt.bin", "uint16"), offsets, max_seq_len=16,
                          pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
    batch = batches.batch_of([0, 1, 2], CPU)
    assert batch["src_ids"][0].tolist() == tok.encode("abc")
    assert batch["src_ids"][1].tolist() == tok.encode("a") + [tok.pad_id] * 2
    assert batch["src_mask"].tolist()[1] == [True, False, False]
    assert batch["tgt_ids"][1].tolist() == [tok.bos_id] + tok.encode("hgfe")
    assert batch["targets"][1].tolist() == tok.encode("hgfe") + [tok.eos_id]
    assert batch["targets"][2].tolist() == [tok.eos_id] + [IGNORE_INDEX] * 4  # empty target: just EOS
    assert batch["tgt_mask"][2].tolist() == [True, False, False, False, False]


def test_damaged_prepared_files_are_clear_errors(tmp_path, tiny_run):
    import shutil

    from minillm.checkpoint import load_run
    from minillm.data.prepare import open_split
    from minillm.models import is_encoder_decoder
    from minillm.run_folder import RunFolder
    from minillm.training import resume

    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    files = RunFolder(run_dir)
    config = load_run(run_dir).config

    def open_train():
        return open_split(run_dir, "train", config, is_encoder_decoder(config), 0.5)

    data = files.tokens("train").read_bytes()
    files.tokens("train").write_bytes(data[:-1])  # half a token
    with pytest.raises(MiniLLMError, match="damaged or truncated .*bytes.*--overwrite"):
        open_train()
    files.tokens("train").write_bytes(data[:-200])  # whole tokens, but fewer than split.json says
    with pytest.raises(MiniLLMError, match="damaged or truncated .*tokens, .* expected"):
        open_train()
    files.tokens("train").write_bytes(data)
    files.split_record.write_text('{"format": "text"}', encoding="utf-8")
    with pytest.raises(MiniLLMError, match="split record .* is damaged"):
        open_train()
    files.last_checkpoint.write_bytes(files.last_checkpoint.read_bytes()[:100])
    with pytest.raises(MiniLLMError, match="corrupt"):
        resume(run_dir, progress=False, log=lambda m: None)


def test_the_split_record_round_trips_and_an_older_one_still_loads(tmp_path, tiny_run):
    import shutil

    from minillm.data.prepare import open_split
    from minillm.data.split_record import read_split_record
    from minillm.run_folder import RunFolder

    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    record = read_split_record(run_dir)
    record.save(tmp_path)
    assert read_split_record(tmp_path) == record
    # Before 0.2: the task was called "format", and there was no separator.
    raw = json.loads(RunFolder(run_dir).split_record.read_text(encoding="utf-8"))
    old = {("format" if k == "task" else k): v for k, v in raw.items() if k != "separator"}
    RunFolder(run_dir).split_record.write_text(json.dumps(old), encoding="utf-8")
    assert read_split_record(run_dir) == record
    from minillm.checkpoint import load_run

    config = load_run(run_dir).config
    assert open_split(run_dir, "test", config, False, 0.5).sequential_tokens == record.tokens["test"] - 1


def test_damaged_pair_offsets_are_a_clear_error(tmp_path):
    from minillm.data.streams import read_offsets

    path = tmp_path / "train.offsets.npy"
    np.save(path, np.array([[0, 5, 3], [0, 1, 2]]))  # a source that ends before it starts
    with pytest.raises(MiniLLMError, match="damaged"):
        read_offsets(path)
    path.write_bytes(b"not numpy")
    with pytest.raises(MiniLLMError, match="damaged"):
        read_offsets(path)


# -- the tokenizer -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["char", "bpe"])
@pytest.mark.parametrize("pairs", [False, True])
def test_the_tokenizer_learns_from_the_training_split_only(tmp_path, kind, pairs):
    # Every sample has a character and a word of its own, so held-out samples hold text the training split lacks.
    samples = [(f"{chr(0x4E00 + i)} common words", f"{f'w{i}x' * 6} more words") for i in range(60)]
    path = tmp_path / ("data.tsv" if pairs else "data.txt")
    path.write_text("".join(f"{a}\t{b}\n" for a, b in samples) if pairs else
                    "".join(f"{a}\n{b}\n\n" for a, b in samples), encoding="utf-8")
    config = TrainConfig(data=str(path), split_mode="paragraph", val_fraction=0.1, test_fraction=0.1, seed=0)
    data = prepare.read_data(config, True, log=lambda message: None)
    tokenizer, _ = prepare.write_data(tmp_path / "run", data, kind, 300)

    def texts(split: str) -> list[str]:
        return [text for sample in data.splits[split] for text in (sample if pairs else [sample])]

    held_out = "".join(texts("val") + texts("test"))
    if kind == "char":
        assert set(tokenizer.alphabet) == set("".join(texts("train")))
        assert set(held_out) - set(tokenizer.alphabet), "held-out text has characters the tokenizer never saw"
    else:
        from_train = train_tokenizer(kind, texts("train"), 300)
        from_all = train_tokenizer(kind, texts("train") + texts("val") + texts("test"), 300)
        assert tokenizer.encode(held_out) == from_train.encode(held_out)
        assert from_all.encode(held_out) != from_train.encode(held_out), "the held-out words would be merges"


def test_pairs_longer_than_the_context_are_cut_and_counted(tmp_path, char_tokenizer):
    pairs = [("abc", "cba"), ("abcdefgh" * 2, "hgfedcba" * 3), ("de", "")]  # 16 and 24 tokens
    write_pair_streams(tmp_path, "train", char_tokenizer, pairs, np.dtype(np.uint16))
    tok = char_tokenizer
    batches = PairBatches(read_stream(tmp_path / "train.src.bin", "uint16"),
                          read_stream(tmp_path / "train.tgt.bin", "uint16"), np.load(tmp_path / "train.offsets.npy"),
                          max_seq_len=10, pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
    batch = batches.batch_of([1], CPU)
    target = tok.encode("hgfedcba" * 3)
    assert batch["src_ids"][0].tolist() == tok.encode("abcdefgh" * 2)[:10]
    assert batch["targets"][0].tolist() == target[:10]  # cut: no EOS, the text does not end there
    assert batch["tgt_ids"][0].tolist() == [tok.bos_id, *target[:9]]
    fit = batches.fit()
    assert (fit.sources_cut, fit.source_tokens_cut, fit.targets_cut, fit.target_tokens_cut) == (1, 6, 1, 15)
    assert fit.kept_target_tokens == 4 + 10 + 1  # what a pass trains on: target + EOS within the context
    assert batches.sequential_tokens == sum(n for _, n in batches.sequential(2, CPU)) == 15
    assert fit.fit_all == 32  # 25 (24 + EOS) rounded up to a multiple of 8
    warning = fit.warning("training", 10)
    assert warning.startswith("warning: 1 of 3 training pairs are longer than the context of 10 tokens")
    assert "1 source(s) lose 6 tokens" in warning and "lose 15 of 30 target tokens (50%" in warning
    assert "--max-seq-len 32" in warning


@pytest.mark.parametrize("encoder_decoder", [False, True])
def test_sequential_rows_choose_windows_and_count_their_tokens(encoder_decoder):
    batches = LMBatches(np.arange(1, 54, dtype=np.uint16), max_seq_len=8, encoder_decoder=encoder_decoder)
    every = list(batches.sequential(3, CPU))
    assert batches.sequential_tokens == sum(n for _, n in every)
    assert sum(len(batch["targets"]) for batch, _ in every) == batches.n_sequential
    some = list(batches.sequential(2, CPU, rows=[0, batches.n_sequential - 1]))
    assert len(some) == 1
    assert torch.equal(some[0][0]["targets"][0], every[0][0]["targets"][0])
    assert torch.equal(some[0][0]["targets"][1], every[-1][0]["targets"][-1])  # the tail window, as in full


def test_a_tail_holdout_keeps_the_end_of_the_file_in_order():
    samples = [f"paragraph {i}" for i in range(100)]
    splits, record = split_data(TEXT, samples, "x.txt", 0.1, 0.1, seed=0, holdout="tail")
    assert record.holdout == "tail" and record.contiguous
    train_text, val_text, test_text = ("".join(splits[name]) for name in ("train", "val", "test"))
    assert "paragraph 0" in train_text and "paragraph 99" in test_text
    assert train_text + val_text + test_text == "\n\n".join(samples)  # in order, nothing lost
    pairs = [(f"s{i}", f"t{i}") for i in range(50)]
    splits, record = split_data(PAIRS, pairs, "x.tsv", 0.1, 0.1, seed=0, holdout="tail")
    assert splits["test"] == pairs[-5:] and splits["val"] == pairs[-10:-5] and splits["train"] == pairs[:40]
    shuffled, _ = split_data(PAIRS, pairs, "x.tsv", 0.1, 0.1, seed=0)
    assert shuffled["test"] != pairs[-5:]


def test_pair_batches_equal_a_row_by_row_construction(tmp_path, char_tokenizer):
    """The whole-array batch against the obvious per-row one, over random pairs (empty, cut, ordinary)."""
    rng = np.random.default_rng(0)
    letters = "abcdefgh"
    pairs = [("".join(rng.choice(list(letters), rng.integers(0, 14))),
              "".join(rng.choice(list(letters), rng.integers(0, 14)))) for _ in range(40)]
    write_pair_streams(tmp_path, "train", char_tokenizer, pairs, np.dtype(np.uint16))
    tok = char_tokenizer
    batches = PairBatches(read_stream(tmp_path / "train.src.bin", "uint16"),
                          read_stream(tmp_path / "train.tgt.bin", "uint16"), np.load(tmp_path / "train.offsets.npy"),
                          max_seq_len=10, pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)
    rows = rng.integers(0, 40, 16)
    batch = batches.batch_of(rows, CPU)
    for row, i in enumerate(rows):
        source, target = pairs[i]
        src = tok.encode(source)[:10]
        predicted = (tok.encode(target) + [tok.eos_id])[:10]
        width, tgt_width = batch["src_ids"].shape[1], batch["targets"].shape[1]
        assert batch["src_ids"][row].tolist() == src + [tok.pad_id] * (width - len(src))
        assert batch["src_mask"][row].tolist() == [c < max(1, len(src)) for c in range(width)]
        assert batch["targets"][row].tolist() == predicted + [IGNORE_INDEX] * (tgt_width - len(predicted))
        shifted = [tok.bos_id] + predicted[:-1]
        assert batch["tgt_ids"][row].tolist() == shifted + [tok.pad_id] * (tgt_width - len(shifted))
    assert batch["src_ids"].shape[1] == max(1, max(len(tok.encode(pairs[i][0])[:10]) for i in rows))


# -- pairs for a decoder-only model ------------------------------------------------------------------------


def prompt_answer_batches(tmp_path, tokenizer, pairs, max_seq_len):
    from minillm.data.batches import PromptAnswerBatches

    write_pair_streams(tmp_path, "train", tokenizer, pairs, np.dtype(np.uint16))
    return PromptAnswerBatches(read_stream(tmp_path / "train.src.bin", "uint16"),
                               read_stream(tmp_path / "train.tgt.bin", "uint16"),
                               np.load(tmp_path / "train.offsets.npy"), max_seq_len, tokenizer.pad_id,
                               tokenizer.eos_id, tokenizer.encode("\n"))


def test_prompt_answer_batches_equal_a_row_by_row_construction(tmp_path, char_tokenizer):
    """Source, separator, target, EOS, shifted by one; the loss only on the target and EOS; cut to the context
    (the source first, then the target); over random pairs (empty, cut, ordinary)."""
    rng = np.random.default_rng(1)
    letters = "abcdefgh"
    pairs = [("".join(rng.choice(list(letters), rng.integers(0, 14))),
              "".join(rng.choice(list(letters), rng.integers(0, 14)))) for _ in range(40)]
    tok, context = char_tokenizer, 12
    batches = prompt_answer_batches(tmp_path, tok, pairs, context)
    rows = rng.integers(0, 40, 16)
    batch = batches.batch_of(rows, CPU)
    assert set(batch) == {"input_ids", "targets"}
    width = batch["input_ids"].shape[1]
    for row, i in enumerate(rows):
        source, target = tok.encode(pairs[i][0]), tok.encode(pairs[i][1])
        source = source[:context - 1]  # room for the separator and one answer token
        sequence = ([*source, *tok.encode("\n"), *target, tok.eos_id])[:context + 1]
        prompt = 1 + len(source)  # the answer's first position in `sequence`
        inputs, targets = sequence[:-1], sequence[1:]
        scored = [t if p + 1 >= prompt else IGNORE_INDEX for p, t in enumerate(targets)]
        assert batch["input_ids"][row].tolist() == inputs + [tok.pad_id] * (width - len(inputs))
        assert batch["targets"][row].tolist() == scored + [IGNORE_INDEX] * (width - len(scored))
        assert any(t != IGNORE_INDEX for t in scored)  # every row predicts at least one token
    assert width <= context
    n_scored = sum(n for _, n in batches.sequential(7, CPU))
    assert n_scored == batches.sequential_tokens == batches.fit().kept_target_tokens


def test_prompt_answer_pairs_longer_than_the_context_are_cut_and_counted(tmp_path, char_tokenizer):
    pairs = [("abc", "cba"), ("abcdefgh" * 2, "hgf"), ("de", "hgfedcba" * 2)]  # 16 and 24 tokens
    batches = prompt_answer_batches(tmp_path, char_tokenizer, pairs, 10)
    fit = batches.fit()
    # Pair 1: its source keeps 10 - 1 = 9 of 16 tokens and one of its 4 answer tokens; pair 2: 2 + 1 = 3
    # prompt tokens leave 8 of its 17 target tokens (EOS counted).
    assert (fit.sources_cut, fit.source_tokens_cut) == (1, 7)
    assert (fit.targets_cut, fit.target_tokens_cut) == (2, 3 + 9)
    assert fit.kept_target_tokens == 4 + 1 + 8
    assert fit.fit_all == 24  # 16 + 1 + 3 + 1 - 1 = 20 inputs for pair 1, rounded up to a multiple of 8
    from minillm.data.batches import PromptAnswerBatches

    with pytest.raises(MiniLLMError, match="context of 2 tokens cannot hold the 3-token separator"):
        PromptAnswerBatches(batches.src, batches.tgt, batches.offsets, 2, 0, 2, [5, 6, 7])


def test_the_loss_of_a_prompt_answer_batch_is_on_the_answers_only(tmp_path, char_tokenizer):
    """Changing a source token never changes the loss of a batch, changing a target token does (under a model
    whose prediction at a position reads that position's token alone, so that only what the loss scores can
    move it); and a real model's loss is the mean cross-entropy of the target and EOS tokens alone, by hand."""
    import torch.nn.functional as F

    from minillm.config import ModelConfig
    from minillm.models import build_model
    from minillm.models.layers import lm_loss

    tok = char_tokenizer
    pairs = [("abcd", "dcba"), ("efg", "gfe"), ("ha", "ah")]
    torch.manual_seed(0)
    bigram = torch.nn.Embedding(tok.vocab_size, tok.vocab_size)  # next-token logits from the current token

    def batch_of(these: list[tuple[str, str]]):
        folder = tmp_path / f"pairs-{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        return prompt_answer_batches(folder, tok, these, 16).batch_of([0, 1, 2], CPU)

    def loss_of(these: list[tuple[str, str]]) -> torch.Tensor:
        batch = batch_of(these)
        with torch.no_grad():
            return lm_loss(bigram(batch["input_ids"]), batch["targets"])

    base = loss_of(pairs)
    for i, (source, target) in enumerate(pairs):
        for j in range(len(source)):
            changed = list(pairs)
            changed[i] = (source[:j] + ("h" if source[j] != "h" else "a") + source[j + 1:], target)
            assert torch.equal(loss_of(changed), base), (i, j)
        for j in range(len(target)):
            changed = list(pairs)
            changed[i] = (source, target[:j] + ("h" if target[j] != "h" else "a") + target[j + 1:])
            assert not torch.equal(loss_of(changed), base), (i, j)

    model = build_model(ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2,
                                    max_seq_len=16)).eval()
    with torch.no_grad():
        _, loss = model(**batch_of(pairs))
    nats = []
    for source, target in pairs:  # by hand: each answer token's -log p given everything before it
        sequence = [*tok.encode(source), *tok.encode("\n"), *tok.encode(target), tok.eos_id]
        with torch.no_grad():
            logits, _ = model(torch.tensor([sequence[:-1]]))
        log_probs = F.log_softmax(logits[0].float(), dim=-1)
        first = 1 + len(tok.encode(source))
        nats += [-log_probs[p - 1, sequence[p]].item() for p in range(first, len(sequence))]
    assert loss.item() == pytest.approx(sum(nats) / len(nats), rel=1e-5)
