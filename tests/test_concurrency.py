"""Requests side by side in the server's engine (in process): a long generation on a decoder does not
hold up the classification batches of the same engine, and classification requests running at the
same time on several threads, each with its own adapters, get what each gets alone.

The model is a small random GPT-2 with a byte-level BPE trained here, and LoRA adapters that bring
classification heads (a classifier on a causal LM)."""

import os
import threading

import pytest
import torch

from lmforge.adapters.lora import LoraConfig
from lmforge.adapters.manager import add_adapter, lora_layers
from lmforge.models import Model, ModelConfig, save_pretrained
from lmforge.models.heads import build_head
from lmforge.serve.batcher import Batcher
from lmforge.serve.engine import Engine, GenJob, Seq

TEXTS = ["once upon a time there was a cat " * 6, "the dog sat on the mat and looked at the cat " * 5,
         "hello world " * 20, "a cat", "the mat " * 12, "there was a dog " * 9]
LABELS = {"pos": ["negative", "positive"], "topic": ["cats", "dogs", "other"]}


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory):
    from tests.test_serve import tiny_bpe

    d = tmp_path_factory.mktemp("decoder")
    tok = tiny_bpe(d / "tok")
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="gpt2", vocab_size=tok.vocab_size, hidden_size=128, num_layers=4, num_heads=4,
                      intermediate_size=512, max_position_embeddings=512, type_vocab_size=0,
                      hidden_act="gelu_new", layer_norm_eps=1e-5, head="causal-lm", bos_token_id=None,
                      eos_token_id=None, pad_token_id=tok.eos_token_id, hidden_dropout=0.0, attention_dropout=0.0)
    save_pretrained(Model(cfg).eval(), d / "model", tokenizer=tok)
    return d / "model"


def engine_with_classifiers(directory) -> Engine:
    """The decoder's engine, with two LoRA adapters that each bring a classification head."""
    engine = Engine(str(directory))
    model = engine.model
    with engine.changing_adapters():
        for seed, (name, labels) in enumerate(LABELS.items()):
            head_config = {"head": "classification", "id2label": dict(enumerate(labels))}
            head = build_head(model.config.replace(**head_config))
            targets = ("query", "value") if seed == 0 else ("query", "key", "value", "output")
            add_adapter(model, name, LoraConfig(r=4 + 4 * seed, alpha=8, target_modules=targets), head=head,
                        head_config=head_config)
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for layer in lora_layers(model).values():
                    if name in layer.lora_B:
                        w = layer.lora_B[name].weight
                        w.copy_(torch.randn(w.shape, generator=g) * 0.3)
                for p in model.adapter_heads[name].parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return engine


def probabilities(results) -> list[list[float]]:
    return [list(r["probabilities"].values()) for r in results]


@torch.no_grad()
def test_concurrent_mixed_requests_equal_each_adapter_alone(decoder_dir):
    engine = engine_with_classifiers(decoder_dir)
    encoded = engine.encode(TEXTS, False)
    plans = [["pos"] * 6, ["topic"] * 6, ["pos", "topic", "pos", "topic", "topic", "pos"],
             ["topic", "pos", "topic", "pos", "pos", "topic"]]
    # each sequence alone, with its adapter, one request at a time
    want = [[probabilities(engine.run("classify", [Seq(e, n)]))[0] for e, n in zip(encoded, names)]
            for names in plans]
    barrier = threading.Barrier(len(plans) + 1)
    errors: list = []
    stop = threading.Event()

    def generating():   # a generation running alongside, on the same engine
        barrier.wait()
        while not stop.is_set():
            engine.run("generate", [GenJob(engine.encode_prompt("once upon a time", 64), 64, False, 1.0, 0, 1.0,
                                           None)])

    def classifying(k):
        barrier.wait()
        for _ in range(10):
            got = probabilities(engine.run("classify", [Seq(e, n) for e, n in zip(encoded, plans[k])]))
            for i, (g, w) in enumerate(zip(got, want[k])):
                if not torch.allclose(torch.tensor(g), torch.tensor(w), atol=1e-5, rtol=1e-5):
                    errors.append((k, i, g, w))
                    return

    threads = [threading.Thread(target=classifying, args=(k,)) for k in range(len(plans))]
    gen = threading.Thread(target=generating)
    for t in [*threads, gen]:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    gen.join()
    assert not errors, errors[:2]


def test_classification_runs_while_a_generation_is_under_way(decoder_dir):
    """A classification batch completes while a generation on the same engine is stopped in the middle
    of its decoding loop (held there by a hook on its forward pass). With one lock around every pass,
    or one worker thread for both kinds of work, the classification would wait for the generation and
    this test would time out. (How long each waits is a benchmark, not a test: benchmarks/serve.py.)"""
    engine = engine_with_classifiers(decoder_dir)
    batcher = Batcher(engine.run, max_batch_size=32, max_wait_ms=0, max_queue=1024).start()
    encoded = engine.encode(TEXTS, False)
    want = probabilities(engine.run("classify", [Seq(e, "pos") for e in encoded]))
    held, release = threading.Event(), threading.Event()
    steps = []

    def hold_the_generation(module, args, kwargs):
        if kwargs.get("cache") is not None:   # a decoding step (classification passes have no KV cache)
            steps.append(1)
            if len(steps) == 5:      # in the middle of decoding, with its KV cache half filled
                held.set()
                release.wait(60)

    hook = engine.model.register_forward_pre_hook(hold_the_generation, with_kwargs=True)
    try:
        generation = batcher.submit("generate", [GenJob(engine.encode_prompt("once upon a time", 40), 40, False,
                                                        1.0, 0, 1.0, None)])
        assert held.wait(60), "the generation never reached its fifth step"
        got = batcher.submit("classify", [Seq(e, "pos") for e in encoded]).result(20)
        assert not generation.done()   # the generation is still held: the classification did not wait for it
        assert torch.allclose(torch.tensor(probabilities(got)), torch.tensor(want), atol=1e-5)
    finally:
        release.set()
        hook.remove()
    assert generation.result(60)[0]["completion_tokens"] > 5   # and the generation then finished
    batcher.stop(10)


@pytest.mark.parametrize("current,more,want", [(0, 10, 10), (5, 10, 15), (12, 10, 19), (19, 10, 19), (0, 0, 0)])
def test_lane_niceness_is_relative_to_the_process(current, more, want):
    from lmforge.serve.batcher import lane_niceness
    assert lane_niceness(current, more) == want


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="per-thread niceness is a Linux feature")
def test_the_generation_lane_is_nicer_than_the_threads_that_started_it():
    """A server started nicer than usual (`nice -n 3 lmforge serve`) keeps its generation lane below
    its classification lane: the lane adds its niceness to the process's, never sets it absolutely."""
    seen: dict = {}

    def runner(kind, items):
        seen[kind] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return [None] * len(items)

    def start_nicer():
        tid = threading.get_native_id()
        base = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, base + 3))   # raising one's niceness needs no rights
        seen["base"] = os.getpriority(os.PRIO_PROCESS, tid)
        batcher = Batcher(runner, max_wait_ms=0, single_nice=2).start()   # lanes inherit this thread's
        batcher.submit("generate", [1]).result(30)
        batcher.submit("classify", [1]).result(30)
        batcher.stop(10)

    t = threading.Thread(target=start_nicer)
    t.start()
    t.join(60)
    assert seen["classify"] == seen["base"]
    assert seen["generate"] == min(19, seen["base"] + 2)


@pytest.mark.parametrize("method", ["adapter-houlsby", "bitfit", "prefix-layer"])
def test_a_run_the_server_cannot_hot_load_is_named(decoder_dir, tmp_path, method):
    import json

    from lmforge.errors import ConfigError
    run = tmp_path / "run"
    run.mkdir()
    (run / "delta.json").write_text(json.dumps({"method": {"method": method}}))
    engine = Engine(str(decoder_dir))
    with pytest.raises(ConfigError, match="cannot be served"):
        engine.load_adapter("x", run)


def test_the_generation_lane_takes_every_queued_request_at_once():
    """A generation lane waits for nothing (its first request runs at once, whatever max_wait) and,
    once free, takes all the generation requests queued meanwhile as one pass."""
    calls, running, release = [], threading.Event(), threading.Event()

    def runner(kind, items):
        calls.append((kind, list(items)))
        if len(calls) == 1:
            running.set()
            assert release.wait(30)
        return list(items)

    batcher = Batcher(runner, max_batch_size=8, max_wait_ms=60_000).start()
    try:
        first = batcher.submit("generate", ["a"])
        assert running.wait(30)                       # taken without waiting the minute for company
        rest = [batcher.submit("generate", [x]) for x in "bcd"]
        release.set()
        assert first.result(30) == ["a"] and [f.result(30) for f in rest] == [["b"], ["c"], ["d"]]
        assert calls == [("generate", ["a"]), ("generate", ["b", "c", "d"])]
    finally:
        release.set()
        batcher.stop(10)


def test_generation_requests_decoded_together_answer_as_each_alone(decoder_dir):
    """The engine decodes a pass's greedy and sampled requests together (a beam search request on its
    own); each answer, and each stream's chunks, equal that request run alone."""
    engine = Engine(str(decoder_dir))
    prompt = engine.encode_prompt("once upon a time", 24)

    def jobs():
        chunks = []
        return [GenJob(prompt, 24, False, 1.0, 0, 1.0, None),
                GenJob(engine.encode_prompt("the dog", 24), 16, True, 0.9, 20, 0.95, 7),
                GenJob(engine.encode_prompt("hello world", 24), 12, False, 1.0, 0, 1.0, None, num_beams=3),
                GenJob(engine.encode_prompt("a cat", 24), 20, False, 1.0, 0, 1.0, None, no_repeat_ngram_size=2,
                       emit=chunks.append)], chunks

    together, chunks = jobs()
    got = engine.run("generate", together)
    for i in range(4):
        alone, alone_chunks = jobs()
        assert engine.run("generate", [alone[i]]) == [got[i]], i
        if i == 3:
            assert alone_chunks == chunks and "".join(c["text"] for c in chunks) == got[3]["text"]
    assert len({g["text"] for g in got}) == 4
