"""Data-to-text training and evaluation for decoders (train/data_to_text.py, objectives.DataToText):
the loss covers exactly the reference tokens and the end token, label smoothing and GPT's auxiliary
LM term are the terms torch computes, every adaptation method trains only its own parameters on real
E2E rows, evaluation writes one output per unique input in order and one JSON object, and bad
options are one-line errors. Tiny random decoders (GPT-2 and Llama presets) with a byte-level BPE
trained on E2E texts keep every test to seconds."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.adapters.methods import MethodConfig, apply_method
from lmforge.cli import main
from lmforge.data import nlg
from lmforge.data.tokenizer import Tokenizer, load_tokenizer
from lmforge.errors import ConfigError
from lmforge.models import Model, from_pretrained, generate, save_pretrained
from lmforge.models.presets import preset
from lmforge.train.data_to_text import DecodingConfig, generate_outputs
from lmforge.train.objectives import DataToText
from lmforge.train.trainer import TrainConfig, Trainer

ARCHS = ["gpt2", "llama"]


@pytest.fixture(scope="module")
def e2e(data_dir):
    return nlg.train_examples("e2e", data_dir)[:400]


def build(out: Path, arch: str, texts, **overrides) -> Path:
    """A random tiny decoder of `arch` and a 400-token byte-level BPE trained on `texts`."""
    from tokenizers import ByteLevelBPETokenizer

    tok_dir = out / "tokenizer"
    tok_dir.mkdir(parents=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, special_tokens=["<|endoftext|>"])
    bpe.save_model(str(tok_dir))
    (tok_dir / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    tok = Tokenizer.from_dir(tok_dir)
    torch.manual_seed(0)
    cfg = preset(arch, "tiny", vocab_size=tok.vocab_size, hidden_size=32, num_heads=2, intermediate_size=64,
                 max_position_embeddings=256, head="causal-lm", pad_token_id=tok.eos_token_id,
                 eos_token_id=tok.eos_token_id, bos_token_id=None, hidden_dropout=0.0, attention_dropout=0.0,
                 embedding_dropout=0.0, **overrides)
    save_pretrained(Model(cfg).eval(), out / "model", tokenizer=tok)
    return out / "model"


@pytest.fixture(scope="module")
def decoders(tmp_path_factory, e2e):
    texts = [e.prompt + e.completion for e in e2e]
    return {arch: build(tmp_path_factory.mktemp(arch), arch, texts) for arch in ARCHS}


def batch_of(model_dir, examples, max_len=256):
    tok = load_tokenizer(model_dir)
    enc, _ = nlg.encode_examples(tok, examples, max_len, tok.eos_token_id)
    return tok, enc, nlg.collate(enc, tok.pad_token_id)


class Wrapped(torch.nn.Module):
    """A wrapper without the model's attributes (as DDP is): the objective may only call it."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, *args, **kw):
        return self.inner(*args, **kw)


def full_logits(model, batch):
    with torch.no_grad():
        return model(batch["input_ids"], batch["attention_mask"]).logits.float()   # [B, T, V]


def ce_at(logits, ids, where, **kw):
    """Cross-entropy of predicting ids[:, t+1] from logits[:, t] at the positions where[:, t+1]."""
    pick = where[:, 1:]
    return F.cross_entropy(logits[:, :-1][pick], ids[:, 1:][pick], **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_the_loss_mask_is_exactly_the_reference_and_its_end_token(decoders, e2e, arch):
    tok, enc, batch = batch_of(decoders[arch], e2e[:6])
    eos = tok.eos_token_id
    for row, (example, e) in enumerate(zip(e2e[:6], enc)):
        where = batch["target_mask"][row].nonzero().squeeze(-1).tolist()
        assert where == list(range(len(e.prompt_ids), len(e.input_ids)))           # no prompt, no padding
        ids = batch["input_ids"][row, where].tolist()
        assert ids[-1] == eos and tok.decode(ids[:-1]) == example.completion       # " " + reference, then eos
        assert tok.decode(batch["input_ids"][row, :len(e.prompt_ids)].tolist()) == example.prompt
    model = from_pretrained(decoders[arch]).eval()
    loss, tallies = DataToText()(Wrapped(model), batch)
    logits = full_logits(model, batch)
    want = ce_at(logits, batch["input_ids"], batch["target_mask"])
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    assert int(tallies["target_tokens"]) == int(batch["target_mask"].sum())
    # the prompt does not enter the loss: changing a prompt token's target-free logits changes nothing
    wrong_prompt = ce_at(logits, batch["input_ids"], batch["attention_mask"].bool())
    assert not torch.allclose(loss, wrong_prompt)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("smoothing", [0.1, 0.3])
def test_label_smoothing_is_torch_cross_entropy_on_the_reference_tokens(decoders, e2e, arch, smoothing):
    _, _, batch = batch_of(decoders[arch], e2e[10:15])
    model = from_pretrained(decoders[arch]).eval()
    loss, tallies = DataToText(label_smoothing=smoothing)(Wrapped(model), batch)
    logits = full_logits(model, batch)
    torch.testing.assert_close(loss, ce_at(logits, batch["input_ids"], batch["target_mask"],
                                           label_smoothing=smoothing), atol=1e-5, rtol=1e-5)
    # the logged target loss is the plain one (what dev loss and perplexity report)
    plain = ce_at(logits, batch["input_ids"], batch["target_mask"])
    assert float(tallies["target_nll_sum"]) / int(tallies["target_tokens"]) == pytest.approx(float(plain), rel=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("lam", [0.25, 1.0])
def test_lm_aux_weight_adds_the_prompt_tokens_lm_loss(decoders, e2e, arch, lam):
    _, enc, batch = batch_of(decoders[arch], e2e[20:25])
    model = from_pretrained(decoders[arch]).eval()
    base, _ = DataToText(label_smoothing=0.1)(Wrapped(model), batch)
    loss, tallies = DataToText(label_smoothing=0.1, lm_aux_weight=lam)(Wrapped(model), batch)
    prompt = batch["attention_mask"].bool() & ~batch["target_mask"]
    aux = ce_at(full_logits(model, batch), batch["input_ids"], prompt)     # every prompt token after the first
    torch.testing.assert_close(loss, base + lam * aux, atol=1e-5, rtol=1e-5)
    assert int(tallies["prompt_tokens"]) == sum(len(e.prompt_ids) - 1 for e in enc)


@pytest.mark.parametrize("arch, method", [("gpt2", "full"), ("gpt2", "prefix-layer"), ("llama", "lora"),
                                          ("llama", "adapter-l")])
def test_packed_equals_padded_loss_and_gradients(decoders, e2e, arch, method):
    _, _, batch = batch_of(decoders[arch], e2e[30:36])
    model = from_pretrained(decoders[arch], head="causal-lm")
    spec = apply_method(model, MethodConfig(method=method, lora_dropout=0.0, adapter_size=4, prefix_length=3))
    from lmforge.models import routing
    results = []
    for packed in (False, True):
        model.zero_grad()
        with routing.using(spec.adapter):
            loss, _ = DataToText(label_smoothing=0.1, lm_aux_weight=0.5, packed=packed)(Wrapped(model), batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], atol=1e-4, rtol=1e-4, msg=n)


# method -> predicate on the names of the parameters it trains
TRAINS = {
    "full": lambda n: True,
    "bitfit": lambda n: n.endswith("bias"),
    "lora": lambda n: ".lora_" in n,
    "prefix-layer": lambda n: ".kv_prefix." in n,
    "adapter-houlsby": lambda n: ".adapters." in n,
    "adapter-l": lambda n: ".output.adapters." in n and ".attention." not in n,
}
CASES = [("gpt2", m) for m in TRAINS] + [("llama", "lora"), ("llama", "adapter-l"), ("llama", "prefix-layer")]


@pytest.mark.parametrize("arch, method", CASES)
def test_each_method_trains_only_its_parameters_on_real_e2e_rows(tmp_path, decoders, e2e, arch, method):
    tok, enc, _ = batch_of(decoders[arch], e2e[:64])
    model = from_pretrained(decoders[arch], head="causal-lm")
    spec = apply_method(model, MethodConfig(method=method, lora_r=4, lora_alpha=32, adapter_size=8,
                                            prefix_length=4, lora_dropout=0.0))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(TRAINS[method](n) for n in trained), sorted(trained)[:4]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fixed = nlg.collate(enc[:16], tok.pad_token_id)
    objective = DataToText(label_smoothing=0.1)
    from lmforge.models import routing
    with routing.using(spec.adapter):
        with torch.no_grad():
            start = float(objective(model.eval(), fixed)[0])
        cfg = TrainConfig(out_dir=str(tmp_path), max_steps=12, batch_size=16, lr=1e-2 if method != "full" else 3e-3,
                          warmup_ratio=0.0, progress_bar=False, log_every=4, precision="fp32", seed=1)
        Trainer(model.train(), cfg, enc, collate=lambda items: nlg.collate(items, tok.pad_token_id),
                objective=objective).train()
        with torch.no_grad():
            end = float(objective(model.eval(), fixed)[0])
    assert torch.isfinite(torch.tensor(end)) and end < start, (start, end)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trained, sorted(changed - trained)[:4]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("target_loss" in r and "token_accuracy" in r for r in records if "loss" in r)


def test_adapter_l_is_one_layernormed_adapter_after_the_ffn(decoders):
    model = from_pretrained(decoders["llama"], head="causal-lm")
    apply_method(model, MethodConfig(method="adapter-l", adapter_size=8))
    d, m, L = 32, 8, model.config.num_layers
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".layers." in n and ".output.adapters.default." in n and ".attention." not in n for n in names)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == L * (2 * d * m + m + d + 2 * d)
    assert sum(n.endswith("norm.weight") for n in names) == L
    # the adapter reads LN(h): its branch up(act(down(LN(h)))) is the same for h and 3 h (Lin et al., 2020)
    adapter = model.transformer.layers[0].output.adapters["default"]
    torch.nn.init.normal_(adapter.up.weight)
    h = torch.randn(5, d, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(adapter(3 * h) - 3 * h, adapter(h) - h, atol=1e-5, rtol=1e-5)


def test_lm_heads_stay_frozen_and_lora_brings_no_head_copy(tmp_path, e2e):
    untied = build(tmp_path, "llama", [e.prompt + e.completion for e in e2e[:200]], tie_word_embeddings=False)
    for method in ("lora", "adapter-houlsby", "bitfit", "prefix-layer"):
        model = from_pretrained(untied, head="causal-lm")
        apply_method(model, MethodConfig(method=method))
        assert not any(p.requires_grad for p in model.head.parameters()), method
        assert len(model.adapter_heads) == 0
    model = from_pretrained(untied, head="causal-lm")
    apply_method(model, MethodConfig(method="full"))
    assert all(p.requires_grad for p in model.head.parameters())


@pytest.mark.parametrize("beams, scope", [(1, "all"), (3, "all"), (1, "output"), (3, "output")])
def test_batched_generation_gives_each_input_its_own_output_in_order(decoders, e2e, beams, scope):
    model_dir = decoders["llama"]
    tok = load_tokenizer(model_dir)
    model = from_pretrained(model_dir).eval()
    sources = [e.source for e in e2e[:40:8]]
    settings = DecodingConfig(beams=beams, length_penalty=0.8, no_repeat_ngram=2, no_repeat_ngram_scope=scope,
                              max_new_tokens=6, batch_size=2)
    batched = generate_outputs(model, tok, sources, settings, tok.eos_token_id)
    one = []
    for s in sources:   # each alone, unpadded, through the public generate()
        ids = torch.tensor([nlg.prompt_ids(tok, s)])
        out = generate(model, ids, max_new_tokens=6, num_beams=beams, length_penalty=0.8, no_repeat_ngram_size=2,
                       no_repeat_ngram_scope=scope, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        one.append(" ".join(tok.decode(out[:out.index(tok.eos_token_id)] if tok.eos_token_id in out else out).split()))
    assert batched == one and len(batched) == len(sources)
    other = dataclasses.replace(settings, no_repeat_ngram_scope="output" if scope == "all" else "all")
    assert generate_outputs(model, tok, sources, other, tok.eos_token_id) != batched, \
        "the scopes decode alike: the case tests nothing"


def test_finetune_then_evaluate_write_one_line_per_unique_input_and_one_json(tmp_path, decoders, data_dir, capsys):
    out = tmp_path / "run"
    argv = ["finetune", "--model", str(decoders["gpt2"]), "--task", "e2e", "--method", "lora", "--lora-r", "4",
            "--lora-alpha", "32", "--max-train-samples", "48", "--max-eval-samples", "3", "--batch-size", "8",
            "--max-steps", "3", "--lr", "1e-3", "--label-smoothing", "0.1", "--lm-aux-weight", "0.5",
            "--beams", "2", "--max-new-tokens", "6", "--precision", "fp32", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lines = (out / "predictions-dev.txt").read_text().split("\n")
    assert len(lines) == 4 and lines[-1] == ""                    # 3 inputs, one line each
    scores = json.loads((out / "eval-dev.json").read_text())
    assert {k: scores[k] for k in ("task", "split", "inputs")} == {"task": "e2e", "split": "dev", "inputs": 3}
    assert scores["references"] == sum(len(r) for r in nlg.eval_set("e2e", "dev").references[:3])
    assert all(isinstance(scores[k], float) for k in ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"))
    assert summary["generation"]["BLEU"] == scores["BLEU"] and summary["trainable_params"] == 2 * 2 * (32 * 4 + 4 * 32)
    assert json.loads((out / "run.json").read_text())["decoding"]["beams"] == 2
    # the same run through `lmforge evaluate --run`: more inputs, greedy, its own output file
    pred = tmp_path / "greedy.txt"
    assert main(["evaluate", "--task", "e2e", "--split", "dev", "--run", str(out), "--max-eval-samples", "5",
                 "--beams", "1", "--max-new-tokens", "6", "--no-repeat-ngram-scope", "output", "--output", str(pred),
                 "--precision", "fp32"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    got = json.loads(printed[-1])
    assert got["inputs"] == 5 and got["decoding"]["beams"] == 1 and len(pred.read_text().splitlines()) == 5
    assert got["decoding"]["no_repeat_ngram_scope"] == "output"
    # evaluate's outputs are those the library decodes for the first 5 unique inputs, in that order
    from lmforge.adapters.methods import load_run
    model, adapter = load_run(out / "best")
    tok = load_tokenizer(decoders["gpt2"])
    want = generate_outputs(model, tok, nlg.eval_set("e2e", "dev").sources[:5],
                            DecodingConfig(beams=1, max_new_tokens=6, no_repeat_ngram=4, no_repeat_ngram_scope="output"),
                            tok.eos_token_id, adapter)
    assert pred.read_text().splitlines() == want


def one_error(capsys, argv, command="finetune"):
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lmforge {command}: error: "), err
    return err[0]


@pytest.mark.parametrize("extra, message", [
    (["--method", "features"], "--method features fits a classifier probe"),
    (["--label-smoothing", "1.0"], "--label-smoothing must be < 1, got 1.0"),
    (["--lm-aux-weight", "-0.5"], "--lm-aux-weight must be >= 0, got -0.5"),
    (["--beams", "0"], "--beams must be >= 1, got 0"),
    (["--no-repeat-ngram", "-1"], "--no-repeat-ngram must be >= 0, got -1"),
    (["--no-repeat-ngram-scope", "prompt"], "--no-repeat-ngram-scope invalid choice: 'prompt'"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--method", "adapter-x"], "--method 'adapter-x' is not one of"),
    (["--model", "minilm"], "is not a decoder"),
    (["--max-new-tokens", "250"], "exceed the model's 256 positions"),
])
def test_bad_options_are_one_line_errors(capsys, tmp_path, decoders, extra, message):
    argv = ["finetune", "--model", str(decoders["gpt2"]), "--task", "e2e", "--max-train-samples", "8",
            "--max-eval-samples", "2", "--max-steps", "1", "--no-progress", "--out", str(tmp_path / "r"), *extra]
    assert message in one_error(capsys, argv)


def test_nlg_options_on_a_classification_task_and_evaluate_errors(capsys, tmp_path, decoders):
    assert "apply to data-to-text tasks" in one_error(capsys, ["finetune", "--task", "glue/sst2", "--label-smoothing",
                                                              "0.1", "--out", str(tmp_path / "r")])
    (tmp_path / "notnlg").mkdir()
    (tmp_path / "notnlg" / "run.json").write_text(json.dumps({"task": "glue/sst2"}))
    assert "is not a data-to-text task" in one_error(
        capsys, ["evaluate", "--task", "e2e", "--run", str(tmp_path / "notnlg")], "evaluate")
    assert "no run.json" in one_error(capsys, ["evaluate", "--task", "e2e", "--run", str(decoders["gpt2"])], "evaluate")


def test_a_decoder_that_learned_four_examples_decodes_their_references(tmp_path, decoders, e2e):
    """Training and generation agree on the prompt and on where the output starts and ends: after
    learning four examples by heart, beam search and greedy decoding (alone and in a left-padded
    batch) give back exactly their references."""
    tok = load_tokenizer(decoders["gpt2"])
    model = from_pretrained(decoders["gpt2"], head="causal-lm")
    enc, _ = nlg.encode_examples(tok, e2e[:4], 256, tok.eos_token_id)
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=150, batch_size=4, lr=1e-2, warmup_ratio=0.0, weight_decay=0.0,
                      progress_bar=False, precision="fp32", seed=0)
    Trainer(model, cfg, enc, collate=lambda items: nlg.collate(items, tok.pad_token_id), objective=DataToText()).train()
    for beams, batch in ((1, 1), (1, 4), (3, 4)):
        settings = DecodingConfig(beams=beams, max_new_tokens=120, no_repeat_ngram=0, batch_size=batch)
        out = generate_outputs(model, tok, [e.source for e in e2e[:4]], settings, tok.eos_token_id)
        assert out == [e.reference for e in e2e[:4]], (beams, batch)


def test_decoding_config_checks_the_ngram_scope():
    DecodingConfig(no_repeat_ngram_scope="output").validate()
    with pytest.raises(ConfigError, match="--no-repeat-ngram-scope must be one of all, output, got 'prompt'"):
        DecodingConfig(no_repeat_ngram_scope="prompt").validate()


# ------------------------------------------------------------------ the original Transformer (encoder-decoder)

@pytest.fixture(scope="module")
def seq2seq(decoders):
    """A random tiny encoder-decoder with the decoders' BPE vocabulary (its decoder starts from the end token)."""
    tok = load_tokenizer(decoders["gpt2"])
    torch.manual_seed(0)
    cfg = preset("transformer", "tiny", vocab_size=tok.vocab_size, hidden_size=32, num_heads=2, intermediate_size=64,
                 num_decoder_layers=1, max_position_embeddings=256, head="causal-lm", pad_token_id=tok.eos_token_id,
                 eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, hidden_dropout=0.0)
    return Model(cfg), tok


def test_seq2seq_batches_put_the_prompt_in_the_encoder_and_score_the_reference(seq2seq, e2e):
    model, tok = seq2seq
    enc, _ = nlg.encode_examples(tok, e2e[40:46], 256, tok.eos_token_id)
    batch = nlg.collate_seq2seq(enc, tok.pad_token_id, model.config.decoder_start_token_id)
    for row, e in enumerate(enc):
        assert batch["encoder_input_ids"][row, :len(e.prompt_ids)].tolist() == list(e.prompt_ids)
        assert int(batch["encoder_attention_mask"][row].sum()) == len(e.prompt_ids)
        n = len(e.target_ids)
        assert batch["input_ids"][row, :n + 1].tolist() == [model.config.decoder_start_token_id, *e.target_ids]
        assert batch["target_mask"][row].nonzero().squeeze(-1).tolist() == list(range(1, n + 1))
    results = []
    for packed in (False, True):
        model.zero_grad()
        loss, tallies = DataToText(label_smoothing=0.1, packed=packed)(Wrapped(model), batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"], encoder_input_ids=batch["encoder_input_ids"],
                       encoder_attention_mask=batch["encoder_attention_mask"]).logits.float()
    want = ce_at(logits, batch["input_ids"], batch["target_mask"], label_smoothing=0.1)
    torch.testing.assert_close(results[0][0], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[1][0], want, atol=1e-5, rtol=1e-5)        # packed decoder: the same
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, atol=1e-4, rtol=1e-4, msg=n)
    assert all(bool(g.abs().sum()) for g in results[0][1].values())              # encoder included


def test_an_encoder_decoder_that_learned_four_examples_decodes_their_references(tmp_path, seq2seq, e2e):
    """From scratch, as `finetune --arch transformer` trains it: after learning four examples by heart, beam
    search and greedy decoding (alone and batched) give back exactly their references."""
    model, tok = seq2seq
    torch.manual_seed(0)
    model = Model(model.config)
    # each source cut to its name slot: a first output token that only the source decides is learned in
    # few steps from a short source (from the whole meaning representation it takes a few times longer)
    examples = [dataclasses.replace(e, source=e.source.split(" | ")[0]) for e in e2e[:4]]
    enc, _ = nlg.encode_examples(tok, examples, 256, tok.eos_token_id)
    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=300, batch_size=4, lr=3e-3, warmup_ratio=0.0, weight_decay=0.0,
                      progress_bar=False, precision="fp32", seed=0, schedule="constant")
    start = model.config.decoder_start_token_id
    Trainer(model, cfg, enc, collate=lambda items: nlg.collate_seq2seq(items, tok.pad_token_id, start),
            objective=DataToText(packed=True)).train()
    for beams, batch in ((1, 1), (1, 4), (3, 4)):
        settings = DecodingConfig(beams=beams, max_new_tokens=120, no_repeat_ngram=0, batch_size=batch)
        out = generate_outputs(model, tok, [e.source for e in examples], settings, tok.eos_token_id)
        assert out == [e.reference for e in examples], (beams, batch)


def test_finetune_arch_transformer_trains_from_scratch_and_evaluates(tmp_path, decoders, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["finetune", "--arch", "transformer", "--size", "tiny", "--tokenizer", str(decoders["gpt2"]), "--task", "e2e",
            "--max-train-samples", "32", "--max-eval-samples", "3", "--batch-size", "8", "--max-steps", "3",
            "--lr", "1e-3", "--schedule", "inverse-sqrt", "--warmup-ratio", "0.5", "--label-smoothing", "0.1",
            "--beams", "2", "--max-new-tokens", "6", "--precision", "fp32", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((out / "best" / "config.json").read_text())["lmforge_config"]
    assert saved["model_type"] == "encoder-decoder" and saved["num_decoder_layers"] == 2
    assert summary["trainable_params"] == summary["total_params"] == from_pretrained(out / "best").num_parameters()
    assert len((out / "predictions-dev.txt").read_text().splitlines()) == 3
    monkeypatch.chdir(tmp_path)   # a relative --run (as benchmarks/e2e.py --keep runs/... gives it)
    assert main(["evaluate", "--task", "e2e", "--split", "dev", "--run", "run", "--max-eval-samples", "2",
                 "--beams", "1", "--max-new-tokens", "4", "--output", str(tmp_path / "p.txt"), "--precision", "fp32"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["inputs"] == 2


@pytest.mark.parametrize("extra, message", [
    (["--arch", "transformer", "--method", "lora"], "--arch trains every weight of a new model: --method full"),
    (["--arch", "transformer", "--lm-aux-weight", "0.5"], "an encoder-decoder reads its prompt in the encoder"),
    (["--arch", "cramming"], "--arch cramming: not a decoder"),
    (["--arch", "t5"], "--arch 't5' --size 'tiny': expected one of"),
    (["--tokenizer", "x"], "--tokenizer goes with --arch"),
])
def test_from_scratch_options_are_one_line_errors(capsys, tmp_path, decoders, extra, message):
    tokenizer = ["--tokenizer", str(decoders["gpt2"])] if "--arch" in extra else []
    argv = ["finetune", *tokenizer, "--size", "tiny", "--task", "e2e", "--max-train-samples", "8",
            "--max-eval-samples", "2", "--max-steps", "1", "--no-progress", "--out", str(tmp_path / "r"), *extra]
    assert message in one_error(capsys, argv)
    assert "--arch trains a new model from scratch for a data-to-text task" in one_error(
        capsys, ["finetune", "--arch", "transformer", "--task", "glue/sst2", "--out", str(tmp_path / "g")])


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_prefix_embedding_decodes_with_the_cache_as_without(decoders, arch):
    """Virtual input tokens are cached as the first tokens of every row: the logits of a packed prefill
    of prompts of different lengths and of each decode step after it (forced tokens) equal a full
    forward of each whole sequence without a cache; beam search decodes a batch as each prompt alone."""
    from lmforge.models import routing
    from lmforge.models.generate import decode_step, prefill
    model = from_pretrained(decoders[arch], head="causal-lm").eval()
    spec = apply_method(model, MethodConfig(method="prefix-embedding", prefix_length=3))
    prompts, forced = [[5, 17, 33, 8, 90], [41], [7, 7, 200, 3]], [[3, 9, 27], [11, 4, 4], [60, 2, 8]]
    with routing.using(spec.adapter):
        state, logits = prefill(model, prompts, 4)
        got = [[row] for row in logits]
        for t in range(3):
            logits = decode_step(model, state, torch.tensor([f[t] for f in forced]))
            for b, row in enumerate(logits):
                got[b].append(row)
        for b, p in enumerate(prompts):
            want = model(torch.tensor([p + forced[b]])).logits[0, len(p) - 1:]
            torch.testing.assert_close(torch.stack(got[b]), want, rtol=0, atol=1e-5)
        beams = generate(model, prompts, max_new_tokens=5, num_beams=3, eos_token_id=-1)
        assert beams == [generate(model, [p], max_new_tokens=5, num_beams=3, eos_token_id=-1)[0] for p in prompts]
    plain = model(torch.tensor([prompts[0] + forced[0]])).logits[0, len(prompts[0]) - 1:]
    assert not torch.allclose(plain, torch.stack(got[0]), atol=1e-3)   # the prefix is in there
