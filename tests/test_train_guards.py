"""The training loop cannot run away: empty data is an error, a NaN stops the run (or is skipped and
counted) without overwriting a good checkpoint, logs stay strict JSON, stale temp dirs are cleaned."""

import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lmforge.cli import main
from lmforge.errors import ConfigError, NonFiniteError
from lmforge.train.trainer import MetricsLog, TrainConfig, Trainer
from lmforge.utils.atomic import atomic_dir, clean_stale_temps

X = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
DATA = [(X[i], int(X[i].sum() > 0)) for i in range(64)]


def collate(items):
    return {"x": torch.stack([x for x, _ in items]), "y": torch.tensor([y for _, y in items])}


def ce(model, batch):
    return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"])


def nan_at(calls: set[int], then=None):
    """A loss that is NaN on the given (1-based) calls; `then(call)` runs first on each call."""
    n = [0]

    def loss(model, batch):
        n[0] += 1
        if then:
            then(n[0])
        out = ce(model, batch)
        return out * float("nan") if n[0] in calls else out
    return loss


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def strict_lines(path: Path) -> list[dict]:
    def refuse(c):
        raise ValueError(f"non-JSON constant {c}")
    return [json.loads(ln, parse_constant=refuse) for ln in path.read_text().splitlines()]


def make_trainer(tmp_path, loss_fn=ce, evaluate=None, **cfg):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    out = tmp_path / "run"

    def on_best(m, metrics):
        with atomic_dir(out / "best") as tmp:
            save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp / "model.safetensors"))
    config = TrainConfig(out_dir=str(out), batch_size=8, lr=0.1, progress_bar=False, log_every=1,
                         sparse_embedding_grads=False, **{"max_steps": 12, "save_every": 4, **cfg})
    trainer = Trainer(model, config, DATA, collate, loss_fn,
                      evaluate=evaluate or (lambda m: {"acc": 0.5}), on_best=on_best,
                      greater_is_better=True)
    return trainer, model, out


def test_nan_loss_stops_naming_step_and_last_good_checkpoint_which_stays_intact(tmp_path):
    saved = {}

    def before(call):  # the run directory as it was just before the NaN
        if call == 7:
            saved.update(snapshot(tmp_path / "run"))
    trainer, _, out = make_trainer(tmp_path, nan_at({7}, before), eval_every=4)
    with pytest.raises(NonFiniteError, match=r"^step 7: loss is nan; last good checkpoint: .*checkpoint \(step 4\)"):
        trainer.train()
    assert any(k.startswith("checkpoint/") for k in saved) and any(k.startswith("best/") for k in saved)
    after = snapshot(out)
    for k in saved:
        if k.startswith(("checkpoint/", "best/")):
            assert after[k] == saved[k], k
    strict_lines(out / "metrics.jsonl")


def test_nonfinite_gradient_stops_the_run(tmp_path):
    trainer, model, _ = make_trainer(tmp_path, max_grad_norm=None)
    model.weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(NonFiniteError, match=r"^step 1: gradient norm is (inf|nan); no checkpoint"):
        trainer.train()


def test_nonfinite_weights_are_never_saved_over_best_or_checkpoint(tmp_path):
    saved = {}
    calls = [0]

    def evaluate(m):  # at the second evaluation the weights are broken, and it looks best
        calls[0] += 1
        if calls[0] == 2:
            saved.update(snapshot(tmp_path / "run"))
            with torch.no_grad():
                m.weight.fill_(float("nan"))
        return {"acc": float(calls[0])}
    trainer, _, out = make_trainer(tmp_path, evaluate=evaluate, eval_every=4)
    with pytest.raises(NonFiniteError, match=r"step 8: weights 'weight' are not finite, not saved to .*best"):
        trainer.train()
    after = snapshot(out)
    assert {k for k in saved if k.startswith(("best/", "checkpoint/"))} == \
           {k for k in after if k.startswith(("best/", "checkpoint/"))}
    assert all(after[k] == saved[k] for k in saved if k.startswith(("best/", "checkpoint/")))


def test_skip_nonfinite_skips_and_counts_and_logs_strict_json(tmp_path):
    trainer, model, out = make_trainer(tmp_path, nan_at({3, 5}), skip_nonfinite=True)
    result = trainer.train()
    assert result["steps"] == 12 and result["skipped_steps"] == 2
    records = strict_lines(out / "metrics.jsonl")
    logs = [r for r in records if "lr" in r]
    assert [r["skipped_steps"] for r in logs][:6] == [0, 0, 1, 1, 2, 2]
    assert "loss" not in logs[2] and all(math.isfinite(r["loss"]) for r in logs if "loss" in r)
    assert torch.isfinite(model.weight).all()
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["progress"]["skipped_steps"] == 2


def test_skipped_steps_leave_the_weights_alone(tmp_path):
    trainer, model, _ = make_trainer(tmp_path, nan_at(set(range(1, 100))), skip_nonfinite=True)
    before = model.weight.detach().clone()
    assert trainer.train()["skipped_steps"] == 12
    assert torch.equal(model.weight, before)


def test_metrics_log_writes_null_for_nonfinite(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.write({"step": 1, "loss": float("nan"), "eval": {"pearson": float("inf"), "acc": [1.0, -math.inf]}})
    assert strict_lines(tmp_path / "m.jsonl") == [{"step": 1, "loss": None,
                                                   "eval": {"pearson": None, "acc": [1.0, None]}}]


def test_a_nan_metric_is_never_the_best_model(tmp_path):
    trainer, _, out = make_trainer(tmp_path, evaluate=lambda m: {"acc": float("nan")})
    result = trainer.train()
    assert result["best_step"] is None and not (out / "best").exists()
    assert [r["eval"]["acc"] for r in strict_lines(out / "metrics.jsonl") if "eval" in r][0] is None


def _in_thread(fn, timeout=60):
    """Run fn in a thread; a loop that never ends fails the test instead of hanging it."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "training did not stop"
    return box


def test_empty_training_set_is_an_error_not_a_loop(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=20, progress_bar=False)
    box = _in_thread(lambda: Trainer(torch.nn.Linear(4, 2), cfg, [], collate, ce).train())
    assert isinstance(box.get("error"), ConfigError) and "training set is empty" in str(box["error"])
    # a batch plan with no batches (e.g. a token budget over nothing) used to spin forever
    box = _in_thread(lambda: Trainer(torch.nn.Linear(4, 2), cfg, DATA, collate, ce,
                                     batch_plan=lambda epoch: []).train())
    assert isinstance(box.get("error"), ConfigError) and "batch plan of epoch 0" in str(box["error"])


def test_cli_empty_training_set_exits_instead_of_spinning(tmp_path):
    # the reported hang: --max-train-samples 0 --max-steps 20 spun at 100% CPU forever
    r = subprocess.run([sys.executable, "-m", "lmforge", "finetune", "--task", "glue/sst2", "--max-train-samples",
                        "0", "--max-steps", "20", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--max-train-samples must be >= 1, got 0" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()


def test_grad_accum_zero_is_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--grad-accum must be >= 1, got 0"):
        TrainConfig(out_dir=str(tmp_path), grad_accum=0).validate()
    with pytest.raises(ConfigError, match="--grad-accum must be >= 1, got 0"):
        Trainer(torch.nn.Linear(4, 2), TrainConfig(out_dir=str(tmp_path / "r"), grad_accum=0), DATA, collate, ce)
    assert main(["finetune", "--grad-accum", "0", "--out", str(tmp_path / "run")]) == 2
    assert "--grad-accum must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "r").exists()


def test_stale_temp_dirs_are_cleaned_when_a_run_starts(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".checkpoint.ab12cd_9.tmp").mkdir()                 # a killed save_state
    (out / ".checkpoint.ab12cd_9.tmp" / "optimizer.pt").write_bytes(b"half")
    (out / ".run.json.x1y2z3w4.tmp").write_text("{")            # a killed atomic_file
    (out / ".best.old-4242").mkdir()                             # killed between atomic_dir's renames
    (out / ".best.old-4242" / "model.safetensors").write_bytes(b"the only good copy")
    keep = [".notes.tmp", "my.tmp", ".hidden", ".x.toolong123.tmp"]
    for name in keep:
        (out / name).write_text("mine")
    trainer, _, _ = make_trainer(tmp_path, max_steps=1)
    trainer.train()
    names = {p.name for p in out.iterdir()}
    assert not any(n.startswith((".checkpoint.", ".run.json.", ".best.old")) for n in names)
    assert set(keep) <= names
    # the backup was the only copy of best/: restored, then replaced by this run's best
    assert (out / "best" / "model.safetensors").is_file()


def test_clean_stale_temps_restores_an_orphaned_backup(tmp_path):
    (tmp_path / ".best.old-17").mkdir()
    (tmp_path / ".best.old-17" / "f").write_text("good")
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / ".checkpoint.old-17").mkdir()   # its target exists: a leftover to remove
    assert clean_stale_temps(tmp_path) == [".best.old-17", ".checkpoint.old-17"]
    assert (tmp_path / "best" / "f").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "checkpoint"]
