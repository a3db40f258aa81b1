"""Every objective through the one training loop: losses and metrics computed right, the MLM
vocabulary projection run only at the masked positions, nothing read through model.config, and a
run killed mid-way resumes to the same bits as one never interrupted."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError
from lmforge.models import Model
from lmforge.models.presets import preset
from lmforge.train.objectives import (CausalLM, MaskedLM, MaskedLMWithNSP, NextSentence, Objective,
                                      SequenceClassification, masked_positions, pretraining_objective)
from lmforge.train.trainer import TrainConfig, Trainer

V, MASK = 50, 4   # tiny vocabulary; ids 0-4 are "special" (pad, unk, cls, sep, mask)
SMALL = dict(vocab_size=V, hidden_size=32, num_heads=2, intermediate_size=64, max_position_embeddings=40)


def tiny(arch: str, head: str, **kw) -> Model:
    torch.manual_seed(0)
    return Model(preset(arch, "tiny", **{**SMALL, "head": head, **kw}))


def make_batch(kind: str, g: torch.Generator, B: int = 4, T: int = 12) -> dict:
    """A batch in the pre-training contract (right-padded, HF names)."""
    ids = torch.randint(5, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 9:] = 0
    mask[3, 5:] = 0
    ids[mask == 0] = 0
    types = torch.zeros(B, T, dtype=torch.long)
    types[:, T // 2:] = 1
    types[mask == 0] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    if kind in ("mlm", "mlm,nsp"):
        chosen = (torch.rand(B, T, generator=g) < 0.25) & mask.bool()
        chosen[0, 1] = True                                  # never an empty selection
        batch["labels"] = torch.where(chosen, ids, torch.full_like(ids, -100))
        batch["input_ids"] = ids.masked_fill(chosen, MASK)
    if kind in ("nsp", "mlm,nsp"):
        batch["next_sentence_label"] = torch.randint(0, 2, (B,), generator=g)
    if kind == "classification":
        batch["labels"] = torch.randint(0, 2, (B,), generator=g)
    if kind == "regression":
        batch["labels"] = torch.rand(B, generator=g) * 5
    return batch


class Stream:
    """A BatchStream of synthetic batches: each a function of (seed, epoch, index), so the stream
    draws nothing from the global RNGs; its state is the position after the last batch yielded."""

    def __init__(self, kind: str, per_epoch: int = 5, seed: int = 0):
        self.kind, self.per_epoch, self.seed = kind, per_epoch, seed
        self.pos = {"epoch": 0, "index": 0}

    def batches(self, epoch: int):
        if self.pos["epoch"] != epoch:
            self.pos = {"epoch": epoch, "index": 0}
        while self.pos["index"] < self.per_epoch:
            i = self.pos["index"]
            g = torch.Generator().manual_seed(self.seed * 10_000 + epoch * 100 + i)
            self.pos = {"epoch": epoch, "index": i + 1}
            yield make_batch(self.kind, g)

    def state_dict(self) -> dict:
        return dict(self.pos)

    def load_state_dict(self, state: dict) -> None:
        self.pos = dict(state)


# (batch kind, arch, head, extra config, objective)
CASES = [
    ("classification", "bert", "classification", {}, SequenceClassification()),
    ("regression", "bert", "classification", {"num_labels": 1}, SequenceClassification(regression=True)),
    ("mlm", "bert", "mlm", {}, MaskedLM()),
    ("mlm", "roberta", "mlm", {"pad_token_id": 0, "type_vocab_size": 2}, MaskedLM()),
    ("mlm", "cramming", "mlm", {}, MaskedLM()),
    ("nsp", "bert", "nsp", {}, NextSentence()),
    ("mlm,nsp", "bert", "pretraining", {}, MaskedLMWithNSP()),
    ("mlm,nsp", "cramming", "pretraining", {}, MaskedLMWithNSP()),
    ("clm", "gpt2", "causal-lm", {}, CausalLM()),
]
IDS = [f"{c[4].name}-{c[1]}" + ("-regression" if c[0] == "regression" else "") for c in CASES]


class Killed(Exception):
    pass


class KillAt(Objective):
    """The objective, until its n-th call: then the process 'dies' (after a checkpoint was saved)."""

    def __init__(self, inner: Objective, n: int):
        self.inner, self.n, self.calls = inner, n, 0

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls == self.n:
            raise Killed
        return self.inner(model, batch)

    def summarize(self, totals):
        return self.inner.summarize(totals)


def run(tmp_path, case, objective=None, resume=False, name="run"):
    kind, arch, head, extra, obj = case
    model = tiny(arch, head, **extra)
    cfg = TrainConfig(out_dir=str(tmp_path / name), max_steps=6, grad_accum=2, lr=3e-3, warmup_ratio=0.2,
                      save_every=2, log_every=1, precision="fp32", progress_bar=False, seed=5)
    trainer = Trainer(model, cfg, Stream(kind), None, objective or obj)
    result = trainer.train(resume=resume)
    return model, result


def losses(path):
    return [(r["step"], r["loss"]) for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_objective_resumes_bit_exactly_after_a_kill(tmp_path, case):
    whole, result = run(tmp_path, case, name="whole")
    assert result["steps"] == 6
    # 5 micro-batches an epoch, 2 per step: an epoch's last step takes 1, so steps cross epochs.
    # Call 8 is the second micro-batch of epoch 1 after the checkpoint at step 4: killed there.
    with pytest.raises(Killed):
        run(tmp_path, case, KillAt(case[4], 8), name="cut")
    state = json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())
    assert state["progress"]["step"] == 4 and state["progress"]["extra"]["data"] == {"epoch": 1, "index": 2}
    resumed, _ = run(tmp_path, case, resume=True, name="cut")
    for (n, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n
    assert losses(tmp_path / "whole") == losses(tmp_path / "cut")   # the log reads as one run


def test_objective_metrics_are_written_to_metrics_jsonl(tmp_path):
    run(tmp_path, CASES[6])   # mlm,nsp
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy", "tokens_per_s", "tokens", "lr"):
        assert all(key in r for r in records), key
    assert all(0 <= r["mlm_accuracy"] <= 1 and 0 <= r["nsp_accuracy"] <= 1 for r in records)
    # two micro-batches of 4 rows x 12 positions, 7 of them padding, per full step
    assert records[0]["tokens"] == 2 * (48 - 7 - 3)
    run(tmp_path, CASES[8], name="clm")
    records = [json.loads(x) for x in (tmp_path / "clm" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["perplexity"] == pytest.approx(math.exp(r["clm_loss"])) for r in records)


class Wrapper(torch.nn.Module):
    """Like DistributedDataParallel: forwards the call, has no .config, .head or .transformer."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_objectives_compute_their_losses_through_a_wrapper(case):
    kind, arch, head, extra, obj = case
    model = tiny(arch, head, **extra).eval()
    batch = make_batch(kind, torch.Generator().manual_seed(3))
    loss, tallies = obj(Wrapper(model), batch)
    full = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    summary = obj.summarize({k: float(v) for k, v in tallies.items()})
    if kind in ("mlm", "mlm,nsp"):
        logits = full.logits.reshape(-1, V)
        labels = batch["labels"].reshape(-1)
        want = F.cross_entropy(logits, labels, ignore_index=-100).detach()
        keep = labels != -100
        assert summary["mlm_accuracy"] == pytest.approx(float((logits[keep].argmax(-1) == labels[keep]).float().mean()))
        assert summary["mlm_loss"] == pytest.approx(float(want), rel=1e-5)
        if kind == "mlm,nsp":
            nsp = F.cross_entropy(full.nsp_logits, batch["next_sentence_label"])
            want = want + nsp
            assert summary["nsp_loss"] == pytest.approx(float(nsp), rel=1e-5)
    elif kind == "nsp":
        want = F.cross_entropy(full.logits, batch["next_sentence_label"])
        acc = (full.logits.argmax(-1) == batch["next_sentence_label"]).float().mean()
        assert summary["nsp_accuracy"] == pytest.approx(float(acc))
    elif kind == "clm":   # the transformers convention: shift, ignore padded targets
        targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        want = F.cross_entropy(full.logits[:, :-1].reshape(-1, V), targets.reshape(-1), ignore_index=-100)
        assert summary["perplexity"] == pytest.approx(math.exp(float(want)), rel=1e-5)
    elif kind == "classification":
        want = F.cross_entropy(full.logits, batch["labels"])
        assert summary["accuracy"] == pytest.approx(float((full.logits.argmax(-1) == batch["labels"]).float().mean()))
    else:
        want = F.mse_loss(full.logits.squeeze(-1), batch["labels"])
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("arch,head,extra", [
    ("bert", "mlm", {}), ("bert", "pretraining", {}), ("roberta", "mlm", CASES[3][3]), ("cramming", "mlm", {}),
    ("bert", "mlm", {"tie_word_embeddings": False})])
def test_mlm_head_runs_only_at_the_masked_positions(arch, head, extra):
    model = tiny(arch, head, **extra).eval()
    batch = make_batch("mlm", torch.Generator().manual_seed(1))
    positions = masked_positions(batch["labels"])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    full = model(**inputs).logits.reshape(-1, V)
    rows = []
    spy = model.head.transform.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[:-1]))
    part = model(**inputs, positions=positions).logits
    assert torch.allclose(part, full.index_select(0, positions), atol=1e-5)
    rows.clear()
    MaskedLM()(model, batch)   # the objective asks for the masked rows only
    spy.remove()
    assert rows == [torch.Size([positions.numel()])] and 0 < positions.numel() < batch["input_ids"].numel() // 2


def test_clm_scores_only_positions_with_a_next_token():
    model = tiny("gpt2", "causal-lm").eval()
    batch = make_batch("clm", torch.Generator().manual_seed(2))
    rows = []
    spy = model.register_forward_hook(lambda m, args, kwargs, out: rows.append(out.logits.shape[0]),
                                      with_kwargs=True)
    CausalLM()(model, batch)
    spy.remove()
    assert rows == [int(batch["attention_mask"][:, 1:].sum())]


def test_objective_names_and_refusals():
    assert isinstance(pretraining_objective("nsp,mlm"), MaskedLMWithNSP)
    assert isinstance(pretraining_objective("clm"), CausalLM)
    with pytest.raises(ConfigError, match="--objective 'mlm,clm' is not one of mlm, nsp, mlm,nsp, clm"):
        pretraining_objective("mlm,clm")


def test_a_stream_needs_a_budget_and_an_empty_mlm_batch_is_not_nan(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path / "r"), progress_bar=False)
    with pytest.raises(ConfigError, match="streamed training set needs a budget"):
        Trainer(tiny("bert", "mlm"), cfg, Stream("mlm"), None, MaskedLM())
    batch = make_batch("mlm", torch.Generator().manual_seed(0))
    batch["labels"].fill_(-100)
    loss, tallies = MaskedLM()(tiny("bert", "mlm"), batch)
    assert float(loss) == 0.0 and int(tallies["mlm_predicted"]) == 0
    loss.backward()   # still part of the graph: a step with nothing masked is a zero step, not a crash


def test_a_minutes_budget_stops_the_run_and_schedules_the_rate_over_time(tmp_path):
    ticks = [0.0]

    def clock():   # a fake clock: every reading is 0.25 s later (no real time is measured)
        ticks[0] += 0.25
        return ticks[0]
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_minutes=1.0, warmup_ratio=0.3, lr=1e-3, log_every=1,
                      precision="fp32", progress_bar=False, save_every=1000)
    trainer = Trainer(tiny("bert", "mlm"), cfg, Stream("mlm"), None, MaskedLM(), clock=clock)
    result = trainer.train()
    logs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in logs]
    peak = lrs.index(max(lrs))
    assert result["elapsed_s"] >= 60 and 10 < result["steps"] < 240 and len(logs) == result["steps"]
    assert 0 < peak < len(lrs) - 1 and lrs[-1] < 0.25 * max(lrs)   # warm-up, then decay towards 0
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["progress"]["step"] == result["steps"] and state["progress"]["elapsed_s"] >= 60


def test_an_empty_stream_is_an_error_not_a_loop(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path / "r"), max_steps=5, progress_bar=False)
    with pytest.raises(ConfigError, match="epoch 0 of the training data has no batches"):
        Trainer(tiny("bert", "mlm"), cfg, Stream("mlm", per_epoch=0), None, MaskedLM()).train()
