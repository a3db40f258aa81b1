"""Training on two processes (torch.distributed, gloo, CPU) as torchrun launches it: the same
weights as one process with the same global batch (full fine-tuning with gradient accumulation,
LoRA on token-budget batches, MLM pre-training; MLM+NSP not yet, marked), FSDP equal to one process
and to DDP, SIGKILLed two-process runs (DDP and FSDP, fine-tuning and pre-training) resumed to the
same bits, sharded checkpoints consolidated, rank 1 writing nothing, a stalled rank ending its peer
instead of hanging it, and the options a world of several processes refuses.

Every subprocess has a timeout, so a hang fails the test instead of stalling the suite. Dropout is
off in the tiny models: the ranks draw different masks (as they should), which one process cannot
reproduce."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.cli import main
from tests.conftest import as_documents

TIMEOUT = 240   # seconds for any one launch; the runs take a few seconds each
TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 48,
             "max_position_embeddings": 64, "hidden_dropout": 0.0, "attention_dropout": 0.0}


def env(**extra):
    # one thread per process (2 processes on 2 cores), the same plain kernels in every run so the
    # one-process reference computes what the ranks compute
    return {**os.environ, "OMP_NUM_THREADS": "1", "LMFORGE_KERNELS": "plain", "LMFORGE_DIST_TIMEOUT": "60",
            **extra}


def run(cmd, **kw):
    p = subprocess.run(cmd, env=kw.pop("env", env()), capture_output=True, text=True, timeout=TIMEOUT, **kw)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def one(*args):
    return run([sys.executable, "-m", "lmforge", *args])


def torchrun_cmd(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "lmforge", *args]


def two(*args):
    return run(torchrun_cmd(*args))


def weights(out):
    return load_file(str(Path(out) / "checkpoint" / "trainable.safetensors"))


def assert_close(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, worst


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 2-layer BERT of width 32 with MiniLM's tokenizer, dropout off."""
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models import Model, ModelConfig, save_pretrained

    tok = load_tokenizer("minilm")
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny")
    save_pretrained(Model(ModelConfig(vocab_size=tok.vocab_size, **TINY_BERT)), d, tokenizer=tok)
    return d


def finetune_args(model, out, *extra):
    return ["finetune", "--model", str(model), "--task", "glue/sst2", "--max-train-samples", "96",
            "--max-eval-samples", "32", "--max-seq-len", "32", "--batch-size", "8", "--lr", "1e-3",
            "--log-every", "2", "--eval-every", "3", "--no-progress", "--seed", "3", "--classifier-dropout", "0",
            "--precision", "fp32", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_model, data_dir):
    """finetuned(how, extra): the run directory of `finetune_args(tiny_model, DIR, *extra)` in one
    process ("one"), two with DDP ("ddp") or two with --fsdp ("fsdp"). Each run is made once per
    module, when a test first asks for it: the tests comparing one with DDP, one with FSDP and DDP
    with FSDP share the runs."""
    root, made = tmp_path_factory.mktemp("finetuned"), {}

    def get(how: str, extra: list[str]) -> Path:
        key = (how, tuple(extra))
        if key not in made:
            out = root / f"{how}-{len(made)}"
            args = finetune_args(tiny_model, out, *extra)
            if how == "one":
                one(*args)
            else:
                p = two(*args, *(["--fsdp"] if how == "fsdp" else []))
                assert ("FSDP, each process holds 1/2" in p.stderr) == (how == "fsdp")
            made[key] = out
        return made[key]
    return get


def metrics_log(run) -> list[dict]:
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def assert_same_log(a: list[dict], b: list[dict], grad_norm_rel: float = 1e-5) -> None:
    """Two runs' metrics logs: the same records, the logged loss, accuracy and gradient norm (those of
    the global batch) and every evaluation within 1e-5."""
    assert [r.keys() for r in a] == [r.keys() for r in b]
    for r1, r2 in zip(a, b):
        for k in ("loss", "accuracy"):
            if k in r1:
                assert r1[k] == pytest.approx(r2[k], abs=1e-5, rel=1e-5), (k, r1, r2)
        if "grad_norm" in r1:
            assert r1["grad_norm"] == pytest.approx(r2["grad_norm"], rel=grad_norm_rel), (r1, r2)
        if "eval" in r1:
            assert r1["eval"] == pytest.approx(r2["eval"], abs=1e-5), (r1, r2)


FULL_ACCUM = ["--method", "full", "--max-steps", "5", "--grad-accum", "2"]   # no_sync on the first micro-batch


@pytest.mark.parametrize("extra", [
    FULL_ACCUM,
    # token-budget batches of uneven sizes: shares of 3 and 2 examples, weighed to the global mean
    ["--method", "lora", "--lora-dropout", "0", "--lora-r", "4", "--max-steps", "6", "--batch-tokens", "160",
     "--lr", "1e-2"],
], ids=["full-accum", "lora-tokens"])
def test_two_processes_train_what_one_does(finetuned, extra):
    a, b = weights(finetuned("one", extra)), weights(finetuned("ddp", extra))
    assert_close(a, b)
    if "lora" in extra:
        assert all("lora_" in k or k.startswith("adapter_heads.") for k in a)   # the adapter alone
    assert_same_log(metrics_log(finetuned("one", extra)), metrics_log(finetuned("ddp", extra)))


@pytest.fixture(scope="module")
def shakespeare(data_dir, tmp_path_factory):
    lines = (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8").splitlines()[:1500]
    path = tmp_path_factory.mktemp("text") / "shakespeare.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def pretrain_args(tmp_path, corpus, out, *extra):
    config = tmp_path / "model.json"
    if not config.is_file():
        config.write_text(json.dumps({k: v for k, v in TINY_BERT.items() if k != "model_type"}
                                     | {"arch": "bert", "size": "tiny"}))
    return ["pretrain", "--config", str(config), "--objective", "mlm", "--corpus", str(corpus),
            "--cache-dir", str(tmp_path / "shards"), "--max-seq-len", "32", "--batch-size", "8", "--lr", "1e-3",
            "--precision", "fp32", "--no-progress", "--seed", "3", "--log-every", "2", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def plays(shakespeare, tmp_path_factory):
    """That text as 30 JSONL documents."""
    return as_documents(shakespeare, tmp_path_factory.mktemp("plays") / "plays.jsonl")


@pytest.mark.parametrize("objective", [
    "mlm",
    # BERT's MLM + NSP: the MLM half is a mean over masked tokens, the NSP half over examples; the
    # trainer weighs each term by its own count (Objective.terms/weights). One weight for the sum
    # (examples) was about 1e-3 off after 5 steps.
    "mlm,nsp",
])
def test_mlm_pretraining_on_two_processes(tmp_path, shakespeare, plays, objective):
    # masked-token counts differ between the ranks' halves: the losses are weighed by them
    corpus, extra = (shakespeare, ()) if objective == "mlm" else (plays, ("--objective", objective))
    # evaluated on held-out text at steps 3 and 5: each rank scores its share of the 5 batches
    extra = (*extra, "--valid", str(corpus), "--eval-batches", "5", "--eval-every", "3")
    one(*pretrain_args(tmp_path, corpus, tmp_path / "one", "--max-steps", "5", *extra))
    two(*pretrain_args(tmp_path, corpus, tmp_path / "two", "--max-steps", "5", *extra))
    evals = [[r["eval"] for r in metrics_log(tmp_path / d) if "eval" in r] for d in ("one", "two")]
    assert len(evals[0]) == len(evals[1]) == 2
    for a, b in zip(*evals):
        assert a == pytest.approx(b, abs=1e-5), (a, b)
    last = [json.loads((tmp_path / d / "summary.json").read_text())["last"] for d in ("one", "two")]
    if "nsp" in objective:   # the NSP tallies are summed over the ranks: one process's
        assert last[0]["nsp_accuracy"] == pytest.approx(last[1]["nsp_accuracy"])
    assert_close(weights(tmp_path / "one"), weights(tmp_path / "two"))
    assert last[0]["mlm_accuracy"] == pytest.approx(last[1]["mlm_accuracy"])
    assert last[0]["loss"] == pytest.approx(last[1]["loss"], abs=1e-5)


def kill_after_checkpoint(cmd, state: Path, step: int) -> list[int]:
    """Start `cmd` (torchrun), SIGKILL its whole process tree once `state` (a checkpoint's
    trainer_state.json) records at least `step`; the pids killed."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + TIMEOUT
    try:
        while time.time() < deadline and proc.poll() is None:
            if state.is_file() and json.loads(state.read_text())["progress"]["step"] >= step:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
    finally:
        # the whole tree at once: torchrun starts each worker in a session of its own, so they
        # are not in its process group
        tree = [proc.pid, *descendants(proc.pid)]
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
    return tree


def test_sigkill_two_processes_then_resume_is_bit_identical(tmp_path, tiny_model, data_dir):
    # classifier dropout on: each rank's RNG state must come back as it was, its own. Logs every 3
    # steps as it saves: a resumed run's first log window starts at its checkpoint (the window's sums
    # are not in it), so the logs read as one run whichever checkpoint the kill comes after
    extra = ["--max-steps", "15", "--save-every", "3", "--log-every", "3", "--eval-every", "9", "--grad-accum", "2",
             "--classifier-dropout", "0.3"]
    two(*finetune_args(tiny_model, tmp_path / "whole", *extra))
    cut = tmp_path / "cut"
    state = cut / "checkpoint" / "trainer_state.json"
    tree = kill_after_checkpoint(torchrun_cmd(*finetune_args(tiny_model, cut, *extra)), state, step=6)
    assert len(tree) >= 3   # the agent and two workers
    time.sleep(0.5)
    saved = json.loads(state.read_text())
    assert saved["world_size"] == 2 and len(saved["ranks"]) == 2 and saved["progress"]["step"] < 15
    two(*finetune_args(tiny_model, cut, *extra, "--resume"))
    a, b = weights(tmp_path / "whole"), weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the metrics log reads as one run
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("samples_per_s", "elapsed_s")} for r in rs]  # noqa: E731  (timings)
    logs = [strip(json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines())
            for d in ("whole", "cut")]
    assert logs[0] == logs[1]
    # one process cannot resume it
    p = subprocess.run([sys.executable, "-m", "lmforge", *finetune_args(tiny_model, cut, *extra, "--resume")],
                       env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 2 and "written by a run of 2 process(es), this run has 1" in p.stderr


def test_glue_table_on_two_processes(tmp_path, tiny_model, data_dir):
    # rank 0's run directory decides which runs are done, for both ranks: a second launch skips them
    args = ["glue", "--model", str(tiny_model), "--tasks", "rte", "--seeds", "1", "--max-train-samples", "32",
            "--max-eval-samples", "16", "--max-seq-len", "32", "--batch-size", "8", "--max-steps", "2",
            "--no-progress", "--out", str(tmp_path / "g")]
    first = two(*args)
    assert first.stdout.count("| RTE |") == 1   # one table, from rank 0
    assert (tmp_path / "g" / "results.json").is_file() and (tmp_path / "g" / "rte" / "seed1" / "best").is_dir()
    again = two(*args)
    assert "== glue/rte seed 1" in first.stdout and "== glue/rte" not in again.stdout
    assert first.stdout.endswith(again.stdout)   # the same table


def descendants(pid: int) -> list[int]:
    """Every process below pid (from /proc: Linux)."""
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            parents[int(d.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [c for c, p in parents.items() if p == parent]
        out += kids
        todo += kids
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Rank 1 runs under an audit hook that refuses (raises on) any write, directory creation, rename or
# removal under the test's directory: the run directory and the token-shard and kernel caches.
WATCHED = r'''
import os, sys
root = os.path.realpath(sys.argv[1])
def refuse(event, args):
    if event == "open" and args[0] is not None and not isinstance(args[0], int):
        if (args[1] or "r").strip("rbt") == "" and not (args[2] or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            return
        paths = [args[0]]
    elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree",
                   "os.symlink", "os.link", "os.truncate", "tempfile.mkstemp", "tempfile.mkdtemp"):
        paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
    else:
        return
    for p in paths:
        p = os.path.realpath(os.fsdecode(p))
        if p == root or p.startswith(root + os.sep):
            raise PermissionError(f"rank 1 wrote {p} ({event})")
sys.addaudithook(refuse)
from lmforge.cli import main
sys.exit(main(sys.argv[2:]))
'''


def launch_pair(tmp_path, args, rank1=None, timeout=TIMEOUT, rank0_ends=False, **extra_env):
    """Rank 0 as `python -m lmforge ARGS`, rank 1 as `rank1` (default: the same command watched
    for writes under tmp_path), with torchrun's environment variables set by hand. Each gives
    (exit code, stdout, stderr, seconds until it ended or None). rank0_ends: kill rank 1 once rank
    0 has ended."""
    base = env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               LMFORGE_CACHE_DIR=str(tmp_path / "kernel-cache"), **extra_env)
    rank1 = rank1 or [sys.executable, "-c", WATCHED, str(tmp_path)]
    procs = [subprocess.Popen([sys.executable, "-m", "lmforge", *args], env={**base, "RANK": "0", "LOCAL_RANK": "0"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
             subprocess.Popen([*rank1, *args], env={**base, "RANK": "1", "LOCAL_RANK": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    try:
        started, ended = time.time(), [None, None]
        while None in ended and time.time() < started + timeout and not (rank0_ends and ended[0] is not None):
            for i, p in enumerate(procs):
                if ended[i] is None and p.poll() is not None:
                    ended[i] = time.time() - started
            time.sleep(0.05)
        for p in procs:
            if p.poll() is None:
                p.kill()   # still running at the deadline: its code reads as a kill
        return [(p.wait(timeout=30), *p.communicate(timeout=30), t) for p, t in zip(procs, ended)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_only_rank_0_writes(tmp_path, shakespeare):
    out = tmp_path / "run"
    args = pretrain_args(tmp_path, shakespeare, out, "--max-steps", "4", "--save-every", "2",
                         "--valid", str(shakespeare), "--eval-every", "2", "--eval-batches", "2")
    (r0, out0, err0, _), (r1, out1, err1, _) = launch_pair(tmp_path, args)
    assert r0 == 0 and r1 == 0, (err0[-2000:], err1[-2000:])
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "curves.png", "metrics.jsonl", "model",
                                                      "run.json", "summary.json", "train_config.json"]
    assert json.loads(out0)["steps"] == 4 and out1 == ""     # one summary line, from rank 0
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "eval" in x]
    assert [e["step"] for e in evals] == [2, 4]


def test_a_stalled_rank_ends_the_other(tmp_path, tiny_model, data_dir):
    # rank 1 stops taking part after its first step (alive, but stuck: no connection closes, the
    # worst case); rank 0 must end with an error after the process group's timeout (10 s here)
    # instead of waiting for it forever
    stalls = [sys.executable, "-c", "import sys, time, lmforge.train.trainer as t; from lmforge.cli import main\n"
              "t.Trainer._grad_norm = staticmethod(lambda *a: time.sleep(3600))\nsys.exit(main(sys.argv[1:]))"]
    (r0, _, err0, t0), (_, _, _, t1) = launch_pair(
        tmp_path, finetune_args(tiny_model, tmp_path / "run", "--max-steps", "20"), rank1=stalls,
        timeout=90, rank0_ends=True, LMFORGE_DIST_TIMEOUT="10")
    assert r0 != 0 and t0 is not None, (r0, t0, err0[-2000:])
    assert t1 is None   # rank 1 was still stuck: the timeout ended rank 0, not a closed connection


def test_each_rank_collates_its_own_share(monkeypatch):
    # every N-th example of each global batch; a rank left without one (a batch smaller than the
    # world) computes the batch's first example with no weight
    from lmforge.train.trainer import _Planned

    plan = [[0, 1, 2, 3, 4], [5], [6, 7]]
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        source = _Planned(list(range(8)), lambda items: {"ids": items}, lambda epoch: plan)
        seen[rank] = [(b["ids"], n, last, mine) for b, n, last, mine in source.epoch(0, 0)]
    assert seen[0] == [([0, 2, 4], 5, False, 3), ([5], 1, False, 1), ([6], 2, True, 1)]
    assert seen[1] == [([1, 3], 5, False, 2), ([5], 1, False, 0), ([7], 2, True, 1)]


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--task", "glue/sst2", "--batch-size", "7"],
     "--batch-size 7 is not divisible by the 2 processes (WORLD_SIZE)"),
    (["finetune", "--task", "glue/sst2", "--method", "features"],
     "--method features fits its probe in one process"),
    (["pretrain", "--arch", "bert", "--size", "tiny", "--corpus", "x.txt", "--max-steps", "2", "--batch-size", "5"],
     "--batch-size 5 is not divisible by the 2 processes"),
])
def test_refused_before_anything_is_written(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lmforge {argv[0]}: error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_ddp_all_reduces_only_trainable_parameters(tmp_path):
    # DDP registers its hooks on parameters with requires_grad only: under LoRA, the adapter (and
    # the classifier head) is all that crosses the wire. A world of one in this process (FileStore).
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lmforge.adapters.methods import MethodConfig, apply_method
    from lmforge.models import Model, ModelConfig, routing

    model = Model(ModelConfig(vocab_size=100, head="classification", num_labels=2, **TINY_BERT))
    spec = apply_method(model, MethodConfig(method="lora", lora_r=2))
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        ddp = DDP(model)
        synced = set()

        def record(state, bucket):   # a communication hook sees each bucket DDP all-reduces
            synced.update(id(p) for p in bucket.parameters())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, record)
        ids = torch.randint(3, 100, (2, 8))
        with routing.using(spec.adapter):   # as run_finetune routes every forward pass
            ddp(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.sum().backward()
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert synced == trainable and len(trainable) < len(list(model.parameters()))
    finally:
        dist.destroy_process_group()


def model_weights(out):
    return load_file(str(Path(out) / "model" / "model.safetensors"))


def test_fsdp_trains_what_one_process_does_and_exports(tmp_path, shakespeare):
    # FSDP2 on gloo: a reduce-scatter that summed instead of averaging (PyTorch issue 162338) would
    # double every gradient; the 1e-5 agreement with one process over 5 AdamW steps (and the loss) is
    # what shows it does not. Evaluation runs on both ranks (a sharded forward pass needs both).
    extra = ("--max-steps", "5", "--save-every", "5", "--valid", str(shakespeare), "--eval-every", "5",
             "--eval-batches", "2")
    one(*pretrain_args(tmp_path, shakespeare, tmp_path / "one", *extra))
    p = two(*pretrain_args(tmp_path, shakespeare, tmp_path / "fsdp", *extra, "--fsdp"))
    assert "FSDP, each process holds 1/2" in p.stderr
    assert_close(model_weights(tmp_path / "one"), model_weights(tmp_path / "fsdp"))
    # AdamW and clipping hide a gradient's scale from the weights: the logged norm does not
    logs = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("one", "fsdp")]
    norms = [[r["grad_norm"] for r in log if "grad_norm" in r] for log in logs]
    # (rel 1e-4: torch sums the squares of a million fp32 gradients in fp32, in a different order on
    # shards; the exact norms agree to 1e-7, a sum instead of a mean would be off by 2x)
    assert len(norms[0]) == 3 and norms[0] == pytest.approx(norms[1], rel=1e-4)
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "fsdp")]
    assert summaries[0]["last"]["loss"] == pytest.approx(summaries[1]["last"]["loss"], abs=1e-5)
    assert summaries[0]["valid"]["loss"] == pytest.approx(summaries[1]["valid"]["loss"], abs=1e-5)
    # the checkpoint is sharded: one file per process, consolidated by `lmforge export`
    ckpt = tmp_path / "fsdp" / "checkpoint"
    assert sorted(f.name for f in (ckpt / "shards").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (ckpt / "trainable.safetensors").exists()
    assert main(["export", "--run", str(tmp_path / "fsdp"), "--out", str(tmp_path / "exported")]) == 0
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert_close(exported, model_weights(tmp_path / "fsdp"), tol=0.0)
    from transformers import AutoModelForMaskedLM

    hf = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "exported")).eval()
    from lmforge.models import from_pretrained

    ours = from_pretrained(tmp_path / "exported").eval()
    ids = torch.tensor([[2, 40, 41, 42, 43, 3]])
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids).logits, ours(ids).logits, atol=1e-5)


def test_fsdp_killed_and_resumed_is_bit_identical(tmp_path, shakespeare):
    extra = ("--max-steps", "12", "--save-every", "3", "--fsdp")
    two(*pretrain_args(tmp_path, shakespeare, tmp_path / "whole", *extra))
    cut = tmp_path / "cut"
    state = cut / "checkpoint" / "trainer_state.json"
    kill_after_checkpoint(torchrun_cmd(*pretrain_args(tmp_path, shakespeare, cut, *extra)), state, step=3)
    saved = json.loads(state.read_text())
    assert saved["sharded"] and saved["progress"]["step"] < 12
    two(*pretrain_args(tmp_path, shakespeare, cut, *extra, "--resume"))
    a, b = model_weights(tmp_path / "whole"), model_weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a sharded checkpoint resumes only sharded (pretrain's settings check says it first; the
    # checkpoint itself knows too, for the loops that have no such check)
    p = subprocess.run(torchrun_cmd(*pretrain_args(tmp_path, shakespeare, cut, "--max-steps", "12",
                                                   "--save-every", "3", "--resume")),
                       env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode != 0 and "train.fsdp was True, now False" in p.stderr
    (cut / "run.json").unlink()
    p = subprocess.run(torchrun_cmd(*pretrain_args(tmp_path, shakespeare, cut, "--max-steps", "12",
                                                   "--save-every", "3", "--resume")),
                       env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode != 0 and "written with --fsdp, this run is without it" in p.stderr


LORA = ["--method", "lora", "--lora-dropout", "0", "--lora-r", "4", "--max-steps", "6", "--lr", "1e-2"]


@pytest.mark.parametrize("extra, saved", [(FULL_ACCUM, "model.safetensors"), (LORA, "adapter_model.safetensors")],
                         ids=["full-accum", "lora"])
def test_fsdp_finetuning_saves_the_best_model_one_process_would(finetuned, extra, saved):
    # the best model of a sharded run is gathered whole to rank 0 and saved as the method saves it
    runs = finetuned("one", extra), finetuned("fsdp", extra)
    best = [load_file(str(d / "best" / saved)) for d in runs]
    assert_close(*best)
    metrics = [json.loads((d / "best" / "metrics.json").read_text()) for d in runs]
    assert metrics[0] == pytest.approx(metrics[1], abs=1e-6)
    assert (runs[1] / "checkpoint" / "shards").is_dir()


def consolidated(run) -> dict[str, torch.Tensor]:
    """A sharded run's last checkpoint whole (by the names of trainable.safetensors), read in this
    process as `lmforge export` reads it."""
    from lmforge.models import Model, ModelConfig
    from lmforge.train.state import consolidate

    checkpoint = Path(run) / "checkpoint"
    model = Model(ModelConfig(**json.loads((checkpoint / "config.json").read_text())))
    consolidate(checkpoint, model)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_fsdp_trains_what_ddp_does(finetuned):
    # the issue's comparison, on the runs the tests above made: 2 processes sharded (FSDP2's
    # reduce-scatter of the gradients, weights gathered per block) against 2 replicated (DDP's
    # all-reduce), full fine-tuning with accumulation (no gradient sync on the first micro-batch):
    # the last checkpoint's weights within 1e-5, and the logged losses, accuracies, gradient norms
    # (a summed instead of averaged gradient would double them: PyTorch issue 162338) and evaluations
    ddp, fsdp = finetuned("ddp", FULL_ACCUM), finetuned("fsdp", FULL_ACCUM)
    assert_close(weights(ddp), consolidated(fsdp))
    log = metrics_log(fsdp)
    assert sum("grad_norm" in r for r in log) == 3 and sum("eval" in r for r in log) == 2
    assert_same_log(metrics_log(ddp), log)


def test_export_of_a_sharded_finetuning_run(finetuned, tmp_path, capsys):
    # a fine-tuning run exports its best/ model (gathered whole) as it would under DDP, a LoRA run's
    # merged; its checkpoint, named itself, consolidates for full fine-tuning and is refused in one
    # line for an adapter method (the shards hold the model with its adapter modules)
    full, lora = finetuned("fsdp", FULL_ACCUM), finetuned("fsdp", LORA)
    assert main(["export", "--run", str(full), "--out", str(tmp_path / "best")]) == 0
    assert_close(load_file(str(tmp_path / "best" / "model.safetensors")),
                 load_file(str(full / "best" / "model.safetensors")), tol=0.0)
    assert main(["export", "--run", str(lora), "--merged", "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert main(["export", "--run", str(full / "checkpoint"), "--out", str(tmp_path / "last")]) == 0
    from lmforge.models import from_pretrained

    last, exported = consolidated(full), dict(from_pretrained(tmp_path / "last").named_parameters())
    assert last.keys() == exported.keys() and all(torch.equal(last[k], exported[k]) for k in last)
    capsys.readouterr()
    assert main(["export", "--run", str(lora / "checkpoint"), "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--method lora run holds the model with its adapter modules" in err and "\n" not in err
    assert not (tmp_path / "no").exists()
    # shards that do not fit the model: a CheckpointError naming what is missing (torch's
    # CheckpointException is a BaseException, which `except Exception` would let through)
    from lmforge.errors import CheckpointError
    from lmforge.models import Model, ModelConfig
    from lmforge.train.state import consolidate

    config = json.loads((full / "checkpoint" / "config.json").read_text()) | {"num_layers": 3}
    with pytest.raises(CheckpointError, match=r"cannot read the sharded checkpoint \(Missing key .*layers\.2\."):
        consolidate(full / "checkpoint", Model(ModelConfig(**config)))


def test_fsdp_finetuning_killed_and_resumed_is_bit_identical(tmp_path, tiny_model, data_dir):
    # classification, full method, sharded, with accumulation; classifier dropout on: each rank's RNG
    # state must come back as it was, its own. Evaluations (and best models) at 4, 8 and 12 fall on
    # either side of the kill; logged at each checkpoint (see the DDP test above)
    extra = ["--method", "full", "--max-steps", "12", "--save-every", "3", "--log-every", "3", "--eval-every", "4",
             "--grad-accum", "2", "--classifier-dropout", "0.3", "--fsdp"]
    two(*finetune_args(tiny_model, tmp_path / "whole", *extra))
    cut = tmp_path / "cut"
    state = cut / "checkpoint" / "trainer_state.json"
    kill_after_checkpoint(torchrun_cmd(*finetune_args(tiny_model, cut, *extra)), state, step=3)
    saved = json.loads(state.read_text())
    assert saved["sharded"] and saved["world_size"] == 2 and saved["progress"]["step"] < 12
    two(*finetune_args(tiny_model, cut, *extra, "--resume"))
    a, b = consolidated(tmp_path / "whole"), consolidated(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the best model (gathered whole on rank 0), and the metrics log reads as one run
    best = [load_file(str(d / "best" / "model.safetensors")) for d in (tmp_path / "whole", cut)]
    assert best[0].keys() == best[1].keys() and all(torch.equal(best[0][k], best[1][k]) for k in best[0])
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("samples_per_s", "elapsed_s")} for r in rs]  # noqa: E731  (timings)
    assert strip(metrics_log(tmp_path / "whole")) == strip(metrics_log(cut))
