"""Data sources (data/sources.py): the same rows from JSONL, JSON, CSV, Parquet and a save_to_disk directory,
weighted mixing, the held-out split, and clear errors (with file and line) for bad input."""

from __future__ import annotations

import json

import pytest

from slim_peft.data import DataSource, held_out_split, parse_sources, read_source, read_sources
from slim_peft.errors import DataError

ROWS = [
    {"instruction": "Name a colour.", "input": "", "output": "Red."},
    {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
    {"prompt": "2 + 2?", "completion": "4", "task": "math", "sample_type": 0},
    {"text": "Plain text for language modelling."},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_json_csv_parquet_and_saved_dataset_give_the_jsonl_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    want = [r.row for r in read_source(DataSource(str(write_jsonl(tmp_path / "ref.jsonl", ROWS))))]
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "b.json").write_text(json.dumps({"data": ROWS}))
    with (tmp_path / "c.csv").open("w", newline="") as f:
        import csv

        fields = sorted({k for r in ROWS for k in r})
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in ROWS:
            w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    # columnar formats: one schema for all rows (absent fields are nulls)
    columns = sorted({k for r in ROWS for k in r})
    table = pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in ROWS])
    pq.write_table(table, tmp_path / "d.parquet")
    saved = tmp_path / "saved"
    saved.mkdir()
    with pa.OSFile(str(saved / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    for name in ("a.json", "b.json", "c.csv", "d.parquet", "saved"):
        got = [r.row for r in read_source(DataSource(str(tmp_path / name)))]
        assert got == want, name


def test_a_saved_dataset_dict_reads_the_named_split(tmp_path):
    import pyarrow as pa

    for split, rows in (("train", ROWS[:2]), ("test", ROWS[2:])):
        d = tmp_path / "dd" / split
        d.mkdir(parents=True)
        table = pa.Table.from_pylist([{"text": f"{split} {i}"} for i in range(len(rows))])
        with pa.OSFile(str(d / "x.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": "x.arrow"}]}))
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    rows = read_source(DataSource(str(tmp_path / "dd"), split="test"))
    assert [r.row.text for r in rows] == ["test 0", "test 1"]
    with pytest.raises(DataError, match="splits"):
        read_source(DataSource(str(tmp_path / "dd"), split="validation"))


def test_weights_repeat_and_subsample(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(10)])
    sources = parse_sources(f"{a}*2,{b}*0.3")
    assert [s.weight for s in sources] == [2.0, 0.3]
    rows = read_sources(sources, seed=0)
    texts = [r.row.text for r in rows]
    assert sum(t.startswith("a") for t in texts) == 20 and sum(t.startswith("b") for t in texts) == 3
    assert texts == [r.row.text for r in read_sources(sources, seed=0)]  # seeded
    assert parse_sources([{"path": str(a), "weight": 0.5}])[0].weight == 0.5


def test_held_out_split_depends_on_the_row_only(tmp_path):
    rows = read_source(DataSource(str(write_jsonl(tmp_path / "a.jsonl", [{"text": f"t{i}"} for i in range(200)]))))
    train, test = held_out_split(rows, 0.2)
    assert 20 < len(test) < 60 and len(train) + len(test) == 200
    again_train, again_test = held_out_split(list(reversed(rows)), 0.2)
    assert {r.row.text for r in again_test} == {r.row.text for r in test}


@pytest.mark.parametrize("content, suffix, match", [
    ('{"foo": 1}\n', ".jsonl", r"a.jsonl:1: a row with fields \['foo'\] matches no known format"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}\n', ".jsonl",
     "a.jsonl:1: message 1 is an empty assistant turn"),
    ('\n{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}\n', ".jsonl",
     "a.jsonl:2: message 0 has role 'assistant' where 'user' is expected"),
    ('{"text": "a"}\n{"text": "b"}\n', ".json", "a.json:2: not valid JSON .*name the file .jsonl"),
    ("not json at all\n", ".jsonl", "a.jsonl:1: not valid JSON"),
    ("PAR1garbage", ".parquet", "not a readable Parquet file"),
    ("instruction,output\nq,\n", ".csv", r"a.csv:2: a row with fields \['instruction'\] matches no known"),
    ('{"text": "x"}', ".txt", "unsupported file type '.txt'"),
])
def test_bad_files_name_the_file_line_and_field(tmp_path, content, suffix, match):
    path = tmp_path / f"a{suffix}"
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        read_source(DataSource(str(path)))


def test_a_stated_format_the_rows_do_not_have(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match="a.jsonl:1: field 'instruction' must be a string"):
        read_source(DataSource(str(path), data_format="alpaca"))


def test_a_dataset_id_without_internet_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="needs the Hugging Face Hub.*pass the local path"):
        read_source(DataSource("someone/some-dataset"))


def test_a_missing_path_and_a_bad_weight():
    with pytest.raises(DataError, match="is not a file, a directory"):
        read_source(DataSource("nowhere/at/all.jsonl"))
    with pytest.raises(DataError, match="weight must be a positive number"):
        parse_sources("a.jsonl*0")
    with pytest.raises(DataError, match="must be a number"):
        parse_sources("a.jsonl*many")


def test_train_and_held_out_needs_rows_with_answers_on_both_sides(tmp_path):
    from slim_peft.data import train_and_held_out

    rows = read_source(DataSource(str(write_jsonl(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(20)]))))
    with pytest.raises(DataError, match=r"t.jsonl: 20 rows give \d+ for training and 0 held out with an answer"):
        train_and_held_out(rows, 0.5, "t.jsonl")
    chats = read_source(DataSource(str(write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)]))))
    train, held = train_and_held_out(chats, 0.5, "c.jsonl")
    assert train and held and len(train) + len(held) == 20
