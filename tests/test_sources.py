"""More than one file in (a folder, a glob, several paths) and the formats `datasets` keeps on disk (parquet, arrow,
save_to_disk folders, JSON Lines), read without downloading anything."""

from __future__ import annotations

import json

import pytest
from conftest import import_dev_dependency, make_corpus, tiny_configs

from minillm.cli import main
from minillm.data.corpus import AUTO_TASK, PAIRS, TEXT, split_samples
from minillm.data.sources import data_files, describe_samples, load_samples
from minillm.data.split_record import read_split_record
from minillm.errors import MiniLLMError
from minillm.training import train

pytestmark = pytest.mark.usefixtures("one_thread")


def quiet(message: str) -> None:
    pass


def paragraphs() -> list[str]:
    return split_samples(make_corpus())


def write_three_files(folder):
    """The corpus in three files, none ending with a blank line: joined blindly, a file's last paragraph and the
    next one's first would become one sample."""
    folder.mkdir()
    texts = paragraphs()
    third = len(texts) // 3
    parts = [texts[:third], texts[third:2 * third], texts[2 * third:]]
    for i, part in enumerate(parts):
        (folder / f"part{i}.txt").write_text("\n\n".join(part), encoding="utf-8")
    (folder / ".hidden").write_text("not data", encoding="utf-8")
    (folder / "sub").mkdir()
    (folder / "sub" / "other.txt").write_text("not read either", encoding="utf-8")
    return texts


def test_a_folder_of_three_files_trains_each_file_ending_its_samples(tmp_path):
    texts = write_three_files(tmp_path / "notes")
    loaded = load_samples(str(tmp_path / "notes"), AUTO_TASK, "paragraph", "")
    assert loaded.samples == texts and [p.name for p in loaded.files] == ["part0.txt", "part1.txt", "part2.txt"]
    said = describe_samples(loaded, "paragraph")
    assert said.startswith("data: 3 files (part0.txt, part1.txt, part2.txt) read as plain text") and \
        f"{len(texts):,} paragraphs" in said
    lines = []
    result = train(*tiny_configs(data=tmp_path / "notes", max_steps=10, eval_interval=10), tmp_path / "run",
                   progress=False, log=lines.append)
    record = read_split_record(tmp_path / "run")
    assert record.n_samples == len(texts) and record.source == str((tmp_path / "notes").resolve())
    assert said in lines and result.steps == 10


def test_a_glob_and_several_paths_read_the_same_files(tmp_path, capsys):
    texts = write_three_files(tmp_path / "notes")
    by_glob = load_samples(str(tmp_path / "notes" / "*.txt"), AUTO_TASK, "paragraph", "")
    by_list = load_samples([str(tmp_path / "notes" / f"part{i}.txt") for i in range(3)], AUTO_TASK, "paragraph", "")
    assert by_glob.samples == by_list.samples == texts
    assert data_files([str(tmp_path / "notes" / "part0.txt"), str(tmp_path / "notes" / "*.txt")])[0].name == "part0.txt"
    assert len(data_files(str(tmp_path / "notes" / "**" / "*.txt"))) == 4  # (a recursive glob reaches sub/)
    paths = [str(tmp_path / "notes" / f"part{i}.txt") for i in range(3)]
    assert main(["train", *paths, "--preset", "tiny", "--max-steps", "2", "--eval-interval", "2",
                 "--sample-interval", "0", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "data: 3 files" in capsys.readouterr().out
    assert read_split_record(tmp_path / "run").source.endswith("part0.txt (+2 more)")


def test_pair_files_of_two_formats_merge_and_are_counted_together(tmp_path):
    (tmp_path / "a.tsv").write_text("ab\tba\ncd\tdc\n", encoding="utf-8")  # 2 pairs: too few alone
    (tmp_path / "b.jsonl").write_text(json.dumps({"input": "ef", "output": "fe"}) + "\n", encoding="utf-8")
    loaded = load_samples([str(tmp_path / "a.tsv"), str(tmp_path / "b.jsonl")], AUTO_TASK, "paragraph", "")
    assert (loaded.task, loaded.samples) == (PAIRS, [("ab", "ba"), ("cd", "dc"), ("ef", "fe")])
    assert "each by its format" in describe_samples(loaded, "paragraph")
    (tmp_path / "c.txt").write_text("plain prose\n", encoding="utf-8")
    with pytest.raises(MiniLLMError, match="a.tsv reads as tab-separated pairs \\(pairs\\) but c.txt as plain text"):
        load_samples([str(tmp_path / "a.tsv"), str(tmp_path / "c.txt")], AUTO_TASK, "paragraph", "")
    mixed = load_samples([str(tmp_path / "a.tsv"), str(tmp_path / "c.txt")], TEXT, "paragraph", "")
    assert mixed.samples == ["ab\nba", "cd\ndc", "plain prose"]  # --task text: pairs read as text


def write_parquet(path, columns: dict):
    pa = import_dev_dependency("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def test_a_local_parquet_file_trains_by_its_text_or_pair_columns(tmp_path):
    texts = paragraphs()
    write_parquet(tmp_path / "docs.parquet", {"id": list(range(len(texts))), "text": texts})
    lines = []
    train(*tiny_configs(data=tmp_path / "docs.parquet", max_steps=10, eval_interval=10), tmp_path / "run",
          progress=False, log=lines.append)
    assert read_split_record(tmp_path / "run").n_samples == len(texts)
    assert lines[0] == (f"data file: docs.parquet read as a parquet table (by its .parquet extension, column 'text'): "
                        f"{len(texts):,} rows, {sum(map(len, texts)):,} characters")
    write_parquet(tmp_path / "qa.parquet", {"question": ["a", "b", "c"], "answer": ["x", "y", "z"]})
    pairs = load_samples(str(tmp_path / "qa.parquet"), AUTO_TASK, "paragraph", "", source_column="question",
                         target_column="answer")
    assert (pairs.task, pairs.samples) == (PAIRS, [("a", "x"), ("b", "y"), ("c", "z")])
    with pytest.raises(MiniLLMError, match=r"has the columns \['question', 'answer'\]: name the one to read"):
        load_samples(str(tmp_path / "qa.parquet"), AUTO_TASK, "paragraph", "")
    with pytest.raises(MiniLLMError, match="no column 'body'; its columns are"):
        load_samples(str(tmp_path / "qa.parquet"), AUTO_TASK, "paragraph", "", text_column="body")
    write_parquet(tmp_path / "bad.parquet", {"text": ["fine", None, "fine"]})
    with pytest.raises(MiniLLMError, match="row 2: column 'text' holds None, not text"):
        load_samples(str(tmp_path / "bad.parquet"), AUTO_TASK, "paragraph", "")


def test_folders_and_files_written_by_datasets_are_read_without_it(tmp_path):
    datasets = import_dev_dependency("datasets")
    texts = paragraphs()[:50]
    dataset = datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))})
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": dataset, "test": dataset.select(range(5))}).save_to_disk(str(tmp_path / "dict"))
    dataset.to_json(str(tmp_path / "rows.jsonl"))
    pairs = datasets.Dataset.from_dict({"input": texts[:10], "output": texts[10:20]})
    pairs.save_to_disk(str(tmp_path / "pairs"))
    assert load_samples(str(tmp_path / "saved"), AUTO_TASK, "paragraph", "").samples == texts
    from_dict = load_samples(str(tmp_path / "dict"), AUTO_TASK, "paragraph", "")
    assert from_dict.samples == texts and "reading 'train'" in from_dict.notes[0]
    rows = load_samples(str(tmp_path / "rows.jsonl"), AUTO_TASK, "paragraph", "")
    assert rows.samples == texts and rows.columns == "column 'text'"
    expected_pairs = list(zip(texts[:10], texts[10:20], strict=True))
    assert load_samples(str(tmp_path / "pairs"), AUTO_TASK, "paragraph", "").samples == expected_pairs
    assert load_samples([str(tmp_path / "saved"), str(tmp_path / "rows.jsonl")], AUTO_TASK, "paragraph",
                        "").samples == texts + texts


@pytest.mark.parametrize("data, message", [
    ("openai/gsm8k", "data file not found: openai/gsm8k; Mini LLM reads data from disk and downloads nothing"),
    ("https://example.com/data.txt", "downloads nothing"),
    ("missing.txt", "data file not found: missing.txt; check the path"),
    ("nothing/*.txt", "no data file matches 'nothing/\\*.txt'"),
])
def test_data_that_is_not_on_disk_is_one_line_and_nothing_is_fetched(tmp_path, monkeypatch, capsys, data, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MiniLLMError, match=message):
        load_samples(data, AUTO_TASK, "paragraph", "")
    assert main(["train", data, "--preset", "tiny", "--out", "run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(MiniLLMError, match="data folder empty holds no files"):
        load_samples("empty", AUTO_TASK, "paragraph", "")


def test_a_missing_pyarrow_is_one_line_saying_what_to_install(tmp_path, monkeypatch):
    write_parquet(tmp_path / "docs.parquet", {"text": ["a", "b", "c"]})
    monkeypatch.setitem(__import__("sys").modules, "pyarrow", None)
    with pytest.raises(MiniLLMError, match=r"needs pyarrow, which is not installed: pip install 'mini-llm\[data\]'"):
        load_samples(str(tmp_path / "docs.parquet"), AUTO_TASK, "paragraph", "")
