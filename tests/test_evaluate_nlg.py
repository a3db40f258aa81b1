"""`lmforge evaluate --task e2e|webnlg|dart --split dev|test --predictions FILE`: one JSON object with
every metric, equal to the official E2E script's values; one-line errors for a wrong line count and
for option combinations that cannot go together."""

import csv
import json

import pytest

from lmforge.cli import main
from tests.test_nlg_metrics import FIXED, OFFICIAL_FIXED


@pytest.fixture
def data(tmp_path, monkeypatch):
    """An LMFORGE_DATA folder whose e2e dev set is FIXED (one MR per group of references)."""
    root = tmp_path / "data"
    (root / "e2e-nlg").mkdir(parents=True)
    with open(root / "e2e-nlg" / "devset.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mr", "ref"])
        for i, (_, refs) in enumerate(FIXED):
            for r in refs:
                w.writerow([f"name[Place {i}], eatType[pub]", r])
    monkeypatch.setenv("LMFORGE_DATA", str(root))
    return root


def predictions(tmp_path, lines, end="\n"):
    path = tmp_path / "outputs.txt"
    path.write_text("\n".join(lines) + end, encoding="utf-8")
    return str(path)


def one_error_line(capsys, argv):
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmforge evaluate: error: "), err
    return err[0]


def test_scores_a_predictions_file_as_the_official_script(capsys, tmp_path, data):
    path = predictions(tmp_path, [h for h, _ in FIXED])
    assert main(["evaluate", "--task", "e2e", "--split", "dev", "--predictions", path]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    got = json.loads(out[0])
    assert {k: got[k] for k in ("task", "split", "inputs", "references")} == {
        "task": "e2e", "split": "dev", "inputs": len(FIXED), "references": sum(len(r) for _, r in FIXED)}
    for k in ("BLEU", "NIST"):
        assert got[k] == pytest.approx(OFFICIAL_FIXED[k], abs=5e-5), k
    for k in ("METEOR", "ROUGE_L", "CIDEr"):
        assert got[k] == pytest.approx(OFFICIAL_FIXED[k], abs=1e-9), k


@pytest.mark.parametrize("end", ["", "\n", "\r\n"])
def test_line_count_mismatch_is_one_line(capsys, tmp_path, data, end):
    n = len(FIXED)
    line = one_error_line(capsys, ["evaluate", "--task", "e2e", "--predictions",
                                   predictions(tmp_path, [h for h, _ in FIXED][:-1], end)])
    assert f"expected {n} lines (one output per unique input of e2e dev), got {n - 1}" in line
    line = one_error_line(capsys, ["evaluate", "--task", "e2e", "--predictions",
                                   predictions(tmp_path, [h for h, _ in FIXED] + ["extra"], end)])
    assert f"expected {n} lines" in line and f"got {n + 1}" in line


@pytest.mark.parametrize("argv, message", [
    (["--task", "e2e"], "--task e2e scores an output file: pass --predictions FILE"),
    ([], "--run is required (or --predictions FILE with --task e2e | webnlg | dart)"),
    (["--run", "R", "--task", "e2e", "--predictions", "P"], "--run and --predictions: give one"),
    (["--predictions", "P"], "--predictions needs --task e2e | webnlg | dart, got no --task"),
    (["--predictions", "P", "--task", "glue/sst2"], "--predictions needs --task e2e | webnlg | dart, got glue/sst2"),
    (["--predictions", "P", "--task", "e2e", "--split", "train"], "--split for e2e must be dev or test, got 'train'"),
    (["--predictions", "P", "--task", "webnlg", "--split", "test"], "testdata_with_lex.xml: no such file"),
    (["--predictions", "missing.txt", "--task", "e2e"], "missing.txt: no such file"),
    (["--predictions", "P", "--task", "e2e", "--split", "test", "--references", "lora"], "dev only"),
])
def test_option_combinations_are_one_line_errors(capsys, tmp_path, data, argv, message):
    (data / "webnlg" / "webnlg_challenge_2017" / "test").mkdir(parents=True)
    (data / "e2e-nlg" / "testset_w_refs.csv").write_text('mr,ref\n"name[A]",A.\n', encoding="utf-8")
    argv = [str(tmp_path / a) if a in ("P", "missing.txt") else a for a in argv]
    (tmp_path / "P").write_text("A.\n", encoding="utf-8")
    assert message in one_error_line(capsys, ["evaluate", *argv])


def test_predictions_that_are_not_utf8(capsys, tmp_path, data):
    path = tmp_path / "outputs.txt"
    path.write_bytes(b"fine\n\xff bad\n")
    assert f"{path}:2: not UTF-8" in one_error_line(capsys, ["evaluate", "--task", "e2e", "--predictions", str(path)])
