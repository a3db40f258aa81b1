"""Requests side by side in the server's engine (in process): a long generation on a decoder does not
hold up the classification batches of the same engine, and classification requests running at the
same time on several threads, each with its own adapters, get what each gets alone.

The model is a small random GPT-2 with a byte-level BPE trained here, and LoRA adapters that bring
classification heads (a classifier on a causal LM)."""

import statistics
import threading
import time

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


def test_classification_latency_while_a_long_generation_runs(decoder_dir):
    """Median latency of one classification request while long generations keep running on the same
    engine stays within 2x of its median with nothing else running. Alone and alongside are measured
    in alternating rounds, so a slow spell of the (shared) machine falls on both. With one lock around
    every pass, or one worker thread for both kinds, each request would wait for a generation."""
    engine = engine_with_classifiers(decoder_dir)
    batcher = Batcher(engine.run, max_batch_size=32, max_wait_ms=0, max_queue=1024).start()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # one core for each side of the 2-core machine: the sides do not share one
    try:
        encoded = engine.encode(TEXTS * 2, False)
        prompt = engine.encode_prompt("once upon a time", 400)
        generating = threading.Event()   # set: keep generating
        idle = threading.Event()         # set: no generation in flight
        stop = threading.Event()
        generations = []

        def generate_forever():
            while not stop.is_set():
                idle.set()
                generating.wait()
                if stop.is_set():
                    break
                idle.clear()
                start = time.perf_counter()
                batcher.submit("generate", [GenJob(prompt, 400, False, 1.0, 0, 1.0, None)]).result(120)
                generations.append(time.perf_counter() - start)

        def classify_once() -> float:
            start = time.perf_counter()
            batcher.submit("classify", [Seq(e, "pos" if i % 2 else "topic") for i, e in enumerate(encoded)]).result(60)
            return time.perf_counter() - start

        gen = threading.Thread(target=generate_forever)
        gen.start()
        for _ in range(3):
            classify_once()   # warm up
        alone, alongside = [], []
        for _ in range(3):
            generating.clear()
            time.sleep(0.05)
            assert idle.wait(120)        # the last generation has finished: nothing else runs
            alone += [classify_once() for _ in range(7)]
            generating.set()
            time.sleep(0.05)  # the generation is under way
            alongside += [classify_once() for _ in range(7)]
        stop.set()
        generating.set()
        gen.join(120)
        a, b = statistics.median(alone), statistics.median(alongside)
        one_generation = statistics.median(generations) if generations else float("nan")
        print(f"classification median alone {a * 1e3:.1f} ms, alongside a generation {b * 1e3:.1f} ms; "
              f"one generation {one_generation * 1e3:.0f} ms")
        assert generations and one_generation > 10 * a   # the generation is long next to a classification
        assert b <= 2 * a, (a, b)
    finally:
        torch.set_num_threads(threads)
        batcher.stop(60)
