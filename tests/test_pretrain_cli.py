"""`lmforge pretrain` end to end on real text (the start of tinyshakespeare): options refused before anything is
written, the loss falls, objective metrics and curves are written, a run killed mid-way resumes to the
same bits, BERT/RoBERTa/GPT-2 results load in transformers with equal logits, --init minilm
continues the bundled model with a new MLM head."""

import json
import math

import pytest
import torch
import transformers as T

from lmforge.cli import main
from lmforge.models import from_pretrained
from lmforge.train import pretrain as pretrain_module
from tests.conftest import as_documents

# small enough to take a step in well under a second on a busy 2-core machine
TINY = {"arch": "bert", "size": "tiny", "hidden_size": 64, "num_heads": 2, "intermediate_size": 128,
        "num_layers": 2}


@pytest.fixture(scope="module")
def shakespeare(data_dir, tmp_path_factory):
    """The first 3,000 lines of tinyshakespeare (about 25k tokens): real text, quick to tokenize."""
    lines = (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8").splitlines()[:3000]
    path = tmp_path_factory.mktemp("text") / "shakespeare.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("shards")   # one tokenization per tokenizer for the module


@pytest.fixture(scope="module")
def plays(tmp_path_factory, shakespeare):
    """That text as 60 JSONL documents."""
    return as_documents(shakespeare, tmp_path_factory.mktemp("plays") / "plays.jsonl")


@pytest.fixture(scope="module")
def byte_bpe(tmp_path_factory, shakespeare):
    out = tmp_path_factory.mktemp("tok") / "bpe"
    assert main(["tokenizer", "train", "--kind", "byte-bpe", "--vocab-size", "400", "--corpus",
                 str(shakespeare), "--out", str(out)]) == 0
    return out


def write_config(tmp_path, **fields):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({**TINY, **fields}))
    return str(path)


def args(out, corpus, cache, *extra, config=None):
    model = ["--config", config] if config else []
    return ["pretrain", *model, "--corpus", str(corpus), "--cache-dir", str(cache), "--max-seq-len", "32",
            "--batch-size", "8", "--precision", "fp32", "--no-progress", "--seed", "3", "--out", str(out), *extra]


def records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


REFUSED = [
    (["--arch", "bert", "--size", "tiny", "--objective", "clm", "--max-steps", "2"],
     "--objective clm needs a decoder (--arch gpt2 or llama), not bert"),
    (["--arch", "gpt2", "--size", "tiny", "--objective", "mlm", "--max-steps", "2"],
     "--objective mlm needs an encoder (bert, roberta, cramming), not a decoder"),
    (["--arch", "transformer", "--size", "tiny", "--objective", "mlm", "--max-steps", "2"],
     "an encoder-decoder (--arch transformer) is trained on sequence pairs: lmforge finetune --arch transformer"),
    (["--arch", "roberta", "--size", "tiny", "--objective", "mlm,nsp", "--max-steps", "2"],
     "head 'pretraining' exists only for bert, not roberta"),
    (["--arch", "bert", "--max-steps", "2"], "--arch and --size go together"),
    (["--arch", "bert", "--size", "tiny", "--init", "minilm", "--max-steps", "2"],
     "give the model as one of --arch with --size, --config FILE or --init MODEL (got --arch/--size and --init)"),
    (["--max-steps", "2"], "give the model as one of --arch with --size"),
    (["--arch", "bert", "--size", "tiny", "--objective", "mlm,foo", "--max-steps", "2"],
     "--objective 'mlm,foo' is not one of mlm, nsp, mlm,nsp, clm"),
    (["--arch", "bert", "--size", "tiny", "--max-seq-len", "600", "--max-steps", "2"],
     "--max-seq-len 600 is more than the model's 512 positions"),
    (["--arch", "bert", "--size", "tiny", "--objective", "nsp", "--packing", "full-sentences", "--max-steps", "2"],
     "--objective nsp needs --packing segment-pair"),
    (["--arch", "bert", "--size", "tiny"], "one of the arguments --tokens --minutes --max-steps is required"),
    (["--arch", "bert", "--size", "tiny", "--lr", "0", "--max-steps", "2"], "--lr must be > 0, got 0.0"),
    (["--arch", "bert", "--size", "tiny", "--minutes", "-1"], "--minutes must be > 0, got -1.0"),
    (["--arch", "bert", "--size", "huge", "--max-steps", "2"], "--size invalid choice: 'huge'"),
]


@pytest.mark.parametrize("extra,error", REFUSED, ids=[e for _, e in REFUSED])
def test_bad_options_are_refused_before_anything_is_written(tmp_path, capsys, shakespeare, extra, error):
    out = tmp_path / "run"
    argv = ["pretrain", "--corpus", str(shakespeare), "--cache-dir", str(tmp_path / "c"), "--out", str(out), *extra]
    assert main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(err) == 1 and err[0].startswith("lmforge pretrain: error: ") and error in err[0], err
    assert not out.exists() and not (tmp_path / "c").exists()


def test_missing_corpus_and_bad_config_file_are_one_line_errors(tmp_path, capsys, shakespeare):
    out = tmp_path / "run"
    assert main(["pretrain", "--arch", "bert", "--size", "tiny", "--corpus", str(tmp_path / "nope.txt"),
                 "--max-steps", "2", "--out", str(out)]) == 2
    assert f"lmforge pretrain: error: {tmp_path / 'nope.txt'}: no such file or directory" in capsys.readouterr().err
    bad = tmp_path / "m.json"
    bad.write_text('{"arch": "cramming", "size": "tiny", "ffn": "swiglu"}')
    assert main(["pretrain", "--config", str(bad), "--corpus", str(shakespeare), "--max-steps", "2",
                 "--out", str(out)]) == 2
    assert f"lmforge pretrain: error: {bad}: ffn 'swiglu' is not one of" in capsys.readouterr().err
    assert not out.exists()


def test_mlm_loss_falls_on_real_text_and_the_run_is_complete(tmp_path, shakespeare, cache, capsys):
    out = tmp_path / "run"
    argv = args(out, shakespeare, cache, "--max-steps", "60", "--lr", "2e-3", "--warmup", "0.1",
                "--log-every", "10", config=write_config(tmp_path))
    assert main(argv) == 0
    logs = records(out)
    assert [r["step"] for r in logs] == [10, 20, 30, 40, 50, 60]
    for key in ("mlm_loss", "mlm_accuracy", "tokens_per_s", "tokens"):
        assert all(key in r for r in logs), key
    # from about ln(30522) = 10.3 (uniform over the vocabulary) to the unigram distribution and beyond
    assert logs[0]["mlm_loss"] > 8.0 and logs[-1]["mlm_loss"] < logs[0]["mlm_loss"] - 2.0, logs
    assert logs[-1]["mlm_accuracy"] > logs[0]["mlm_accuracy"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["tokens"] == logs[-1]["tokens"]
    # the result fine-tunes: a classification head on the pre-trained trunk
    model = from_pretrained(out / "model", head="classification", num_labels=2)
    assert model.config.model_type == "bert" and model.config.num_layers == 2


class Killed(Exception):
    pass


def test_a_killed_run_resumes_to_the_same_bits(tmp_path, shakespeare, cache, monkeypatch, capsys):
    config = write_config(tmp_path)
    extra = ("--max-steps", "6", "--save-every", "2", "--grad-accum", "2", "--log-every", "1", "--lr", "1e-3")
    assert main(args(tmp_path / "whole", shakespeare, cache, *extra, config=config)) == 0

    real = pretrain_module.pretraining_objective

    def dying(spec):   # the process dies at micro-batch 8: after the checkpoint of step 2, inside step 4
        inner, calls = real(spec), [0]

        class Dying(type(inner)):
            def __call__(self, model, batch):
                calls[0] += 1
                if calls[0] == 8:
                    raise Killed
                return inner(model, batch)
        return Dying()
    monkeypatch.setattr(pretrain_module, "pretraining_objective", dying)
    with pytest.raises(Killed):
        main(args(tmp_path / "cut", shakespeare, cache, *extra, config=config))
    monkeypatch.setattr(pretrain_module, "pretraining_objective", real)
    state = json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())
    assert state["progress"]["step"] == 2 and not (tmp_path / "cut" / "model").exists()
    assert main(args(tmp_path / "cut", shakespeare, cache, *extra, "--resume", config=config)) == 0
    a = from_pretrained(tmp_path / "whole" / "model").state_dict()
    b = from_pretrained(tmp_path / "cut" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [(r["step"], r["loss"], r["mlm_accuracy"]) for r in rs]  # noqa: E731
    assert strip(records(tmp_path / "whole")) == strip(records(tmp_path / "cut"))
    # --resume with other settings is refused, naming the first that differs, and changes nothing
    before = (tmp_path / "cut" / "run.json").read_bytes()
    assert main(args(tmp_path / "cut", shakespeare, cache, *extra[:-1], "2e-3", "--resume", config=config)) == 2
    assert "--resume needs the same settings as the interrupted run; train.lr was 0.001, now 0.002" in \
        capsys.readouterr().err
    assert (tmp_path / "cut" / "run.json").read_bytes() == before


def _batch(pad, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (2, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    ids[mask == 0] = pad
    return ids, mask


def test_bert_pretraining_result_loads_in_transformers(tmp_path, plays, cache):
    out = tmp_path / "bert"
    assert main(args(out, plays, cache, "--objective", "mlm,nsp", "--max-steps", "4", "--valid", str(plays),
                     "--eval-every", "2", "--eval-batches", "2", config=write_config(tmp_path))) == 0
    logs = [r for r in records(out) if "eval" not in r]
    assert all(0 <= r["nsp_accuracy"] <= 1 and "mlm_accuracy" in r for r in logs)
    evals = [r for r in records(out) if "eval" in r]     # held-out metrics at steps 2 and 4
    assert [r["step"] for r in evals] == [2, 4]
    assert all({"loss", "mlm_loss", "mlm_accuracy", "nsp_accuracy"} <= set(r["eval"]) for r in evals)
    assert json.loads((out / "summary.json").read_text())["valid"] == evals[-1]["eval"]
    ours = from_pretrained(out / "model").eval()
    theirs = T.BertForPreTraining.from_pretrained(out / "model").eval()
    ids, mask = _batch(0, ours.config.vocab_size)
    o = ours(ids, mask)
    with torch.no_grad():
        t = theirs(input_ids=ids, attention_mask=mask)
    assert torch.allclose(o.logits[mask.bool()], t.prediction_logits[mask.bool()], atol=1e-4)
    assert torch.allclose(o.nsp_logits, t.seq_relationship_logits, atol=1e-4)


@pytest.mark.parametrize("arch,objective,cls", [("roberta", "mlm", "RobertaForMaskedLM"),
                                                ("gpt2", "clm", "GPT2LMHeadModel"),
                                                ("llama", "clm", "LlamaForCausalLM")])
def test_roberta_and_gpt2_results_load_in_transformers(tmp_path, shakespeare, cache, byte_bpe, arch, objective, cls):
    out = tmp_path / arch
    config = write_config(tmp_path, arch=arch)
    assert main(args(out, shakespeare, cache, "--objective", objective, "--tokenizer", str(byte_bpe),
                     "--max-steps", "3", "--log-every", "1", config=config)) == 0
    logs = records(out)
    if objective == "clm":
        assert all(r["perplexity"] == pytest.approx(math.exp(r["clm_loss"])) for r in logs)
    ours = from_pretrained(out / "model").eval()
    theirs = getattr(T, cls).from_pretrained(out / "model").eval()
    ids, mask = _batch(ours.config.pad_token_id or 0, ours.config.vocab_size)
    with torch.no_grad():
        t = theirs(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert torch.allclose(ours(ids, mask).logits[keep], t[keep], atol=1e-4)


def test_init_minilm_continues_with_a_new_mlm_head(tmp_path, shakespeare, cache, capsys, minilm_dir):
    out = tmp_path / "more"
    assert main(args(out, shakespeare, cache, "--init", "minilm", "--max-steps", "2", "--batch-size", "4")) == 0
    err = capsys.readouterr().err
    assert "--init minilm: the checkpoint has no head, not a mlm head: initialised one" in err
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["architectures"] == ["BertForMaskedLM"]
    before = from_pretrained(minilm_dir).state_dict()
    after = from_pretrained(out / "model", head=None).state_dict()
    assert set(before) == set(after) and not torch.equal(before["transformer.layers.0.attention.query.weight"],
                                                         after["transformer.layers.0.attention.query.weight"])


def test_every_preset_is_an_arch_choice():
    from lmforge.cli.pretrain import ARCHS as CLI_ARCHS
    from lmforge.models.presets import ARCHS
    assert set(CLI_ARCHS) == set(ARCHS)   # the CLI keeps its own tuple so that it starts fast
