"""Every CLI option with a range is checked before anything is written: a bad value exits 2 with one
line naming the option, no traceback, and the target directory exactly as it was. Input files that
are not UTF-8 are reported with file:line; a failed command never rewrites an interrupted run."""

import errno
import io
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from lmforge.cli import COMMANDS, build_parser, main


@pytest.fixture
def target(tmp_path):
    """A run directory holding an interrupted run (run.json and a checkpoint)."""
    run = tmp_path / "runs" / "x"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "trainer_state.json").write_text('{"progress": {"step": 3}}')
    (run / "run.json").write_text('{"saved": "by the interrupted run"}')
    return run


def tree(d: Path) -> dict:
    """Every path under d with its kind, bytes and mtime: any write shows."""
    out = {}
    for p in sorted(d.parent.rglob("*")):
        st = p.stat()
        out[str(p)] = ("d", st.st_mtime_ns) if p.is_dir() else ("f", st.st_mtime_ns, p.read_bytes())
    return out


TRAIN = [  # options of finetune and glue, each with values that must be refused
    ("--batch-size", "0"), ("--batch-size", "-3"), ("--batch-size", "two"), ("--grad-accum", "0"),
    ("--lr", "0"), ("--lr", "-1"), ("--lr", "nan"), ("--lr", "inf"), ("--epochs", "0"), ("--max-steps", "0"),
    ("--warmup-ratio", "1.5"), ("--warmup-ratio", "-0.1"), ("--weight-decay", "-0.01"),
    ("--max-grad-norm", "-1"), ("--eval-every", "0"), ("--save-every", "0"), ("--log-every", "0"),
    ("--seed", "-1"), ("--seed", "1.5"), ("--max-seq-len", "0"), ("--max-seq-len", "2"), ("--batch-tokens", "0"),
    ("--max-train-samples", "0"), ("--max-eval-samples", "0"), ("--lora-r", "0"), ("--lora-alpha", "0"),
    ("--lora-dropout", "1"), ("--lora-dropout", "-0.1"), ("--adapter-size", "0"), ("--prefix-length", "0"),
    ("--freeze-layers", "-1"), ("--classifier-dropout", "1.0"), ("--schedule", "steep"),
    ("--precision", "fp8"), ("--label-type", "text"),
]
OTHER = [
    ("glue", "--seeds", "1,a"), ("glue", "--seeds", "-1"), ("glue", "--tasks", "sst2,squad"),
    ("glue", "--task-epochs", "sst2=0"), ("glue", "--task-epochs", "squad=1"),
    ("evaluate", "--batch-size", "0"), ("evaluate", "--max-seq-len", "0"), ("evaluate", "--max-eval-samples", "0"),
    ("evaluate", "--max-train-samples", "0"),
    ("predict", "--max-seq-len", "-5"), ("embed", "--batch-size", "0"), ("embed", "--max-length", "0"),
    ("embed", "--decimals", "-1"), ("serve", "--port", "65536"), ("serve", "--port", "-1"),
    ("serve", "--max-batch-size", "0"), ("serve", "--max-wait-ms", "-1"), ("serve", "--max-queue", "0"),
    ("serve", "--max-input-tokens", "0"), ("serve", "--threads", "0"), ("serve", "--adapter", "novalue"),
    ("generate", "--max-new-tokens", "0"), ("generate", "--beams", "0"), ("generate", "--length-penalty", "nan"),
    ("generate", "--no-repeat-ngram", "-1"), ("generate", "--temperature", "0"), ("generate", "--top-k", "0"),
    ("generate", "--top-p", "1.5"), ("generate", "--seed", "-1"), ("generate", "--batch-size", "0"),
    ("generate", "--no-repeat-ngram-scope", "prompt"),
    ("finetune", "--label-smoothing", "1.5"), ("finetune", "--label-smoothing", "-0.1"),
    ("finetune", "--lm-aux-weight", "-1"),
] + [(cmd, opt, v) for cmd in ("finetune", "evaluate") for opt, v in (   # data-to-text decoding
    ("--beams", "0"), ("--length-penalty", "nan"), ("--no-repeat-ngram", "-1"), ("--max-new-tokens", "0"),
    ("--gen-batch-size", "0"), ("--no-repeat-ngram-scope", "prompt"), ("--no-repeat-ngram-scope", "ALL"))]
PRETRAIN = [
    ("--eval-every", "0"), ("--eval-batches", "0"), ("--max-seq-len", "2"), ("--mlm-probability", "1.5"),
    ("--workers", "0"), ("--tokens", "0"), ("--minutes", "0"), ("--minutes", "nan"), ("--max-steps", "0"),
    ("--batch-size", "0"), ("--grad-accum", "0"), ("--lr", "0"), ("--warmup", "1.5"), ("--weight-decay", "-1"),
    ("--max-grad-norm", "-1"), ("--save-every", "0"), ("--log-every", "0"), ("--seed", "-1"),
    ("--arch", "t5"), ("--packing", "pairs"), ("--masking", "never"),
]
REQUIRED = {"evaluate": ["--run", "R"], "predict": ["--run", "R", "--input", "in.txt"], "embed": ["text"],
            "export": ["--run", "R"], "serve": [], "finetune": ["--task", "glue/sst2"], "glue": [],
            "pretrain": ["--arch", "bert", "--size", "tiny", "--corpus", "c.txt"],
            "generate": ["--model", "M", "--prompt", "hi"]}
CASES = ([(cmd, opt, v) for cmd in ("finetune", "glue") for opt, v in TRAIN] + OTHER
         + [("pretrain", opt, v) for opt, v in PRETRAIN])


def argv_for(cmd, target, *extra):
    out = ["--out", str(target)] if cmd in ("finetune", "glue", "export", "pretrain") else []
    return [cmd, *REQUIRED[cmd], *out, *extra]


def refused(capsys, argv, option, target):
    before = tree(target)
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"lmforge {argv[0]}: error: ") and option in lines[0], err
    assert "Traceback" not in err
    assert tree(target) == before, f"{argv} changed files"
    return lines[0]


@pytest.mark.parametrize("cmd, option, value", CASES, ids=[f"{c}{o}={v}" for c, o, v in CASES])
def test_bad_value_exits_2_with_one_line_and_writes_nothing(capsys, target, cmd, option, value):
    refused(capsys, argv_for(cmd, target, option, value), option, target)


def test_every_ranged_option_has_a_case():
    """A new numeric option without a row above fails here, so the table stays complete."""
    parser = build_parser()
    covered = {(c, o) for c, o, _ in CASES}
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = []
    for cmd in COMMANDS:
        for action in sub.choices[cmd]._actions:
            opt = next((s for s in action.option_strings if s.startswith("--")), None)
            if opt and getattr(action.type, "__name__", "").endswith("in range") and (cmd, opt) not in covered:
                missing.append((cmd, opt))
            if opt and action.type in (int, float):
                missing.append((cmd, opt, "plain int/float: no range check"))
    assert not missing, missing


@pytest.mark.parametrize("argv, option", [
    (["finetune", "--task", "glue/sst2", "--batch-tokens", "64", "--max-seq-len", "128"], "--batch-tokens"),
    (["finetune", "--task", "glue/sst2", "--max-seq-len", "4096", "--batch-tokens", "1024"], "--batch-tokens"),
])
def test_cross_option_rules(capsys, target, argv, option):
    line = refused(capsys, argv + ["--out", str(target)], option, target)
    assert "at least one whole sequence" in line


def test_out_that_cannot_be_written(capsys, target, monkeypatch):
    blocker = target.parent / "a-file"
    blocker.write_text("x")
    for cmd in ("finetune", "glue", "export"):
        refused(capsys, argv_for(cmd, blocker / "sub"), "--out", target)
        refused(capsys, argv_for(cmd, blocker), "--out", target)
    refused(capsys, ["predict", "--run", "R", "--input", "x.txt", "--output", str(target)], "--output", target)
    # a read-only file system (or no permission): os.access says so; nothing may be created
    import lmforge.utils.checks as checks
    real = os.access
    monkeypatch.setattr(checks.os, "access", lambda p, mode: False if str(p).startswith(str(target.parent)) else real(p, mode))
    line = refused(capsys, argv_for("finetune", target.parent / "new" / "run"), "--out", target)
    assert "not writable" in line and "read-only file system" in line
    line = refused(capsys, argv_for("finetune", target), "--out", target)
    assert "not writable" in line


def test_an_oserror_nobody_foresaw_is_one_line_naming_the_file(capsys, monkeypatch):
    def boom(args):
        raise OSError(errno.EROFS, "Read-only file system", "/mnt/ro/runs/x/run.json")
    monkeypatch.setattr(COMMANDS["embed"], "run", boom)
    assert main(["embed", "text"]) == 2
    assert capsys.readouterr().err == "lmforge embed: error: /mnt/ro/runs/x/run.json: Read-only file system\n"


def test_no_traceback_through_the_real_entry_point(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe bad\n")
    for argv, needle in [(["finetune", "--batch-size", "0", "--out", str(tmp_path / "run")], "--batch-size"),
                         (["embed", "--input", str(bad)], f"{bad}:2: not UTF-8 text (byte 0xff at column 1)")]:
        r = subprocess.run([sys.executable, "-m", "lmforge", *argv], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


# -- files that are not UTF-8 ----------------------------------------------------------------------

GOOD_CSV = "text,label\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(8))


def bad_bytes(kind: str) -> bytes:
    """A file of `kind` whose line 3 holds a Latin-1 'é' (0xe9) at byte column 4."""
    if kind == "jsonl":
        return b'{"text": "a", "label": "a"}\n{"text": "b", "label": "b"}\n{"t\xe9xt": "c", "label": "a"}\n'
    sep = b"\t" if kind == "tsv" else b","
    return b"text" + sep + b"label\nok" + sep + b"a\ncaf\xe9" + sep + b"b\n"


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl"])
@pytest.mark.parametrize("which", ["train", "dev"])
def test_training_files_that_are_not_utf8(capsys, tmp_path, kind, which):
    good, bad = tmp_path / f"good.{kind}", tmp_path / f"bad.{kind}"
    if kind == "jsonl":
        good.write_text("".join(json.dumps({"text": f"row {i}", "label": "ab"[i % 2]}) + "\n" for i in range(8)))
    else:
        good.write_text(GOOD_CSV.replace(",", "\t") if kind == "tsv" else GOOD_CSV)
    bad.write_bytes(bad_bytes(kind))
    files = {"train": bad, "dev": good} if which == "train" else {"train": good, "dev": bad}
    out = tmp_path / "run"
    line = refused(capsys, ["finetune", "--train", str(files["train"]), "--dev", str(files["dev"]), "--out", str(out)],
                   f"{bad}:3: not UTF-8 text (byte 0xe9 at column {4 if kind != 'jsonl' else 4})", tmp_path / "x")
    assert not out.exists(), line


def test_glue_files_that_are_not_utf8(capsys, tmp_path):
    sst = tmp_path / "glue" / "SST-2"
    sst.mkdir(parents=True)
    (sst / "train.tsv").write_bytes(b"sentence\tlabel\ngood\t1\nbad \xff\t0\n")
    (sst / "dev.tsv").write_bytes(b"sentence\tlabel\ngood\t1\n")
    refused(capsys, ["finetune", "--task", "glue/sst2", "--data-dir", str(tmp_path / "glue"),
                     "--out", str(tmp_path / "run")],
            f"{sst / 'train.tsv'}:3: not UTF-8 text (byte 0xff at column 5)", tmp_path / "x")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["in.txt", "in.jsonl", "in.csv"])
def test_predict_input_that_is_not_utf8(capsys, tmp_path, name):
    f = tmp_path / name
    f.write_bytes(b"text\nfine\nnot \xc3\x28 fine\n")  # an invalid 2-byte sequence at column 5
    refused(capsys, ["predict", "--run", str(tmp_path / "norun"), "--input", str(f)],
            f"{f}:3: not UTF-8 text (byte 0xc3 at column 5)", tmp_path / "x")


def test_embed_input_that_is_not_utf8(capsys, tmp_path, monkeypatch):
    f = tmp_path / "texts.txt"
    f.write_bytes(b"one\n\x80two\n")
    refused(capsys, ["embed", "--input", str(f)], f"{f}:2: not UTF-8 text (byte 0x80 at column 1)", tmp_path / "x")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"one\ntwo\nthr\xffee\n")))
    refused(capsys, ["embed", "--input", "-"], "<stdin>:3: not UTF-8 text (byte 0xff at column 4)", tmp_path / "x")


# -- an interrupted run survives failed commands aimed at it ---------------------------------------

def interrupted_run(tmp_path, *options):
    """A run directory as an interrupted `finetune ... OPTIONS` leaves it: its run.json, a checkpoint."""
    from lmforge.cli.finetune import config_from_args
    from lmforge.utils import strict_json

    train = tmp_path / "train.csv"
    train.write_text(GOOD_CSV)
    argv = ["finetune", "--train", str(train), "--dev", str(train), "--out", str(tmp_path / "run"), *options]
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "trainer_state.json").write_text('{"progress": {"step": 3}}')
    (run / "run.json").write_text(strict_json.dumps(asdict(config_from_args(build_parser().parse_args(argv))),
                                                    indent=1))
    return run, argv


def test_failed_commands_leave_the_interrupted_run_as_it_was(capsys, tmp_path):
    run, argv = interrupted_run(tmp_path, "--lr", "0.001")
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"text,label\nok,a\nc\xe9,b\n")
    before = tree(run / "checkpoint")   # the whole tmp_path tree: run.json included, bytes and mtimes
    run_json = (run / "run.json").read_bytes()
    for extra, needle in [(["--batch-size", "0", "--resume"], "--batch-size"),
                          (["--batch-size", "0"], "--batch-size"),
                          (["--train", str(bad)], "not UTF-8"),
                          (["--train", str(bad), "--resume"], "train_file was"),
                          (["--method", "nonsense"], "--method"),
                          (["--batch-tokens", "16"], "--batch-tokens")]:
        assert main(argv + extra) == 2, extra
        assert needle in capsys.readouterr().err
        assert (run / "run.json").read_bytes() == run_json and tree(run / "checkpoint") == before, extra


def test_resume_with_another_setting_names_it_and_changes_nothing(capsys, tmp_path):
    run, argv = interrupted_run(tmp_path, "--lr", "0.001")
    before = tree(run / "checkpoint")
    assert main(argv + ["--lr", "0.0001", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--resume needs the same settings" in err and "train.lr was 0.001, now 0.0001" in err, err
    assert tree(run / "checkpoint") == before
    assert main(argv + ["--lora-r", "4", "--epochs", "2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "adapt.lora_r was 8, now 4 (and 1 more: train.epochs)" in err, err
    assert tree(run / "checkpoint") == before


GOOD_RESULTS = {"model": "m", "method": "full", "seeds": [1], "runs": [
    {"task": "glue/sst2", "main_metric": "accuracy", "best": {"accuracy": 0.9}, "wall_time_s": 1.0,
     "trainable_params": 10}]}


@pytest.mark.parametrize("content,problem", [
    (b'{\n "model": "m",\n "runs": [,]\n}\n', ":3: invalid JSON (Expecting value at column 11)"),
    (b'{\n "model": "caf\xe9"\n}\n', ":2: not UTF-8 text (byte 0xe9 at column 15)"),
    (json.dumps({"model": "m"}).encode(), ': expected a JSON object with a list "runs"'),
    (json.dumps({**GOOD_RESULTS, "runs": [{"task": "glue/sst2"}]}).encode(), ": runs[0]: expected an object with"),
    (json.dumps({**GOOD_RESULTS, "runs": [{**GOOD_RESULTS["runs"][0], "best": {}}]}).encode(),
     ": runs[0].best has no number for its main metric 'accuracy'"),
])
def test_glue_merge_of_a_broken_results_file(capsys, tmp_path, content, problem):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    (good / "results.json").write_text(json.dumps(GOOD_RESULTS))
    assert main(["glue", "--merge", str(good)]) == 0 and "| m (full) |" in capsys.readouterr().out
    (bad / "results.json").write_bytes(content)
    refused(capsys, ["glue", "--merge", str(good), str(bad)], f"{bad / 'results.json'}{problem}", tmp_path / "x")
