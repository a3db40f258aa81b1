"""GLUE files load with the official row counts; the user's own files report bad rows by line."""

import json

import pytest

from lmforge.data.glue import TASKS, get_task, load_split
from lmforge.data.tables import load_table
from lmforge.errors import ConfigError, DataError

COUNTS = {"cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3668, 408), "stsb": (5749, 1500),
          "rte": (2490, 277), "wnli": (635, 71)}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_glue_splits_have_official_sizes(data_dir, name):
    task = get_task(f"glue/{name}")
    train = load_split(task, "train", data_dir / "glue")
    dev = load_split(task, "dev", data_dir / "glue")
    assert (len(train), len(dev)) == COUNTS[name]
    for ex in train[:50] + dev[:50]:
        assert ex.text.strip()
        assert (ex.pair is not None) == (task.pair_col is not None)
        if task.regression:
            assert 0.0 <= ex.label <= 5.0
        else:
            assert 0 <= ex.label < len(task.labels)


def test_mrpc_rebuilt_train_has_the_missing_row_and_no_dev_pair(data_dir):
    train = load_split("mrpc", "train", data_dir / "glue")
    shipped = (data_dir / "glue" / "MRPC" / "train.tsv").read_text(encoding="utf-8-sig").splitlines()[1:]
    assert len(shipped) == 3667 and len(train) == 3668
    dev_pairs = {(e.text, e.pair) for e in load_split("mrpc", "dev", data_dir / "glue")}
    assert not dev_pairs & {(e.text, e.pair) for e in train}


def test_qnli_dev_and_unlabelled_test(data_dir):
    assert len(load_split("qnli", "dev", data_dir / "glue")) == 5463
    test = load_split("sst2", "test", data_dir / "glue")
    assert len(test) == 1821 and all(e.label is None for e in test)


def test_missing_task_file_says_where(data_dir):
    with pytest.raises(DataError, match=r"MNLI/train.tsv: missing"):
        load_split("mnli", "train", data_dir / "glue")


@pytest.mark.parametrize("name", ["glue/sst2", "SST-2", "sst2", "glue/sts-b"])
def test_task_names(name):
    assert get_task(name).name in TASKS


def test_unknown_task_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown GLUE task 'glue/squad'.*glue/cola"):
        get_task("glue/squad")


# ---- the user's own files ------------------------------------------------------------------

def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


FORMATS = [
    ("data.csv", 'review,stars\n"great, really",pos\nawful,neg\n"fine\nmultiline",pos\n'),
    ("data.tsv", "review\tstars\ngreat, really\tpos\nawful\tneg\nfine multiline\tpos\n"),
    ("data.jsonl", '{"review": "great, really", "stars": "pos"}\n{"review": "awful", "stars": "neg"}\n'
                   '{"review": "fine", "stars": "pos"}\n'),
]


@pytest.mark.parametrize("name,text", FORMATS, ids=[f[0] for f in FORMATS])
def test_tables_read_string_labels(tmp_path, name, text):
    ex, labels, report = load_table(write(tmp_path, name, text), text_col="review", label_col="stars")
    assert labels == ["neg", "pos"] and [e.label for e in ex] == [1, 0, 1] and report.skipped == 0
    assert ex[0].text == "great, really"


def test_tables_float_labels_and_pairs(tmp_path):
    p = write(tmp_path, "sts.jsonl", '{"a": "x", "b": "y", "s": 3.5}\n{"a": "u", "b": "v", "s": 1}\n')
    ex, labels, _ = load_table(p, text_col="a", pair_col="b", label_col="s")
    assert labels is None and [e.label for e in ex] == [3.5, 1.0] and ex[0].pair == "y"


BAD = [
    ("t.csv", "text,label\nok,pos\n,neg\n", {}, "t.csv:3: empty text in 'text'"),
    ("t.csv", "text,label\nok,pos\nfine,\n", {}, "t.csv:3: missing label in 'label'"),
    ("t.csv", "text,label\nok,pos\na,b,c\n", {}, "t.csv:3: 3 fields, the header has 2"),
    ("t.jsonl", '{"text": "ok", "label": "a"}\n{"text": "x", "label": "b"\n', {}, "t.jsonl:2: invalid JSON"),
    ("t.jsonl", '{"text": "ok", "label": "a"}\n{"label": "b"}\n', {}, "t.jsonl:2: missing field 'text'"),
    ("t.jsonl", '{"text": "ok", "label": 0.5}\n{"text": "x", "label": "high"}\n', {"label_type": "float"},
     "t.jsonl:2: label 'high' is not a number"),
    ("dev.csv", "text,label\nok,pos\nhmm,maybe\n", {"labels": ["neg", "pos"]},
     "dev.csv:3: label 'maybe' is not one of ['neg', 'pos']"),
    ("t.csv", "body,label\nok,pos\n", {}, "t.csv: column 'text' not found (columns: body, label)"),
    ("t.csv", "", {}, "t.csv: empty file"),
    ("t.txt", "a\n", {}, "unknown file type '.txt'"),
]


@pytest.mark.parametrize("name,text,kw,message", BAD, ids=[b[3].split(": ", 1)[-1][:30] for b in BAD])
def test_bad_rows_name_file_and_line(tmp_path, name, text, kw, message):
    with pytest.raises(DataError) as e:
        load_table(write(tmp_path, name, text), **kw)
    assert message in str(e.value)


def test_skip_bad_rows_counts_them(tmp_path):
    lines = ["text,label", "good one,pos", ",neg", "another,neg", "x,y,z", "dev only,maybe", "last,pos"]
    p = write(tmp_path, "dev.csv", "\n".join(lines) + "\n")
    ex, _, report = load_table(p, labels=["neg", "pos"], skip_bad_rows=True)
    assert [e.line for e in ex] == [2, 4, 7]
    assert report.skipped == 3 and report.first_lines == [3, 5, 6]
    assert "3" in str(report)
