"""`lmforge serve --precision / --device`: forward passes run on the batcher's worker threads, and
autocast is per thread, so the engine enters the precision's autocast inside each pass. In process
(the app under a TestClient, whose lifespan starts the real batcher threads), on a 2-layer cut of
MiniLM with one random LoRA classifier: bf16 answers are within a stated tolerance of fp32 (and not
equal to them: bf16 really ran), /healthz names the precision, int8 with auto is fp32, and the CLI
says the resolved device and precision at the start and refuses bad values in one line."""

import pytest
import torch

pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from lmforge.data.tokenizer import load_tokenizer  # noqa: E402
from lmforge.models import from_pretrained, save_pretrained  # noqa: E402
from lmforge.serve.app import ServeSettings, create_app  # noqa: E402
from tests.test_serve import PAIRS, TEXTS, gpt2_dir, make_adapter  # noqa: E402,F401  (gpt2_dir: a fixture)

# bf16 keeps 8 bits of mantissa: two layers of it move a softmax probability by well under 0.02
# (about 0.002 here) and keep embeddings at cosine >= 0.999 (the bound for STS-B)
PROB_TOL = 0.02
MIN_COSINE = 0.999


@pytest.fixture(scope="module")
def files(tmp_path_factory, minilm_dir):
    d = tmp_path_factory.mktemp("serve-precision")
    save_pretrained(from_pretrained(minilm_dir, num_layers=2), d / "base", tokenizer=load_tokenizer(minilm_dir))
    model = from_pretrained(d / "base", head="classification").eval()
    make_adapter(model, d / "base", "nli", ["entailment", "neutral", "contradiction"], None, d / "nli", seed=0)
    return d


def answers(files, **settings):
    """(healthz, classify results, embeddings [n, D]) from an app with these settings."""
    app = create_app(ServeSettings(model=str(files / "base"), adapters=[("nli", str(files / "nli"))],
                                   max_wait_ms=1.0, **settings))
    with TestClient(app) as client:   # starts (and at the end drains) the batcher's threads
        health = client.get("/healthz").json()
        r = client.post("/v1/classify", json={"adapter": "nli", "inputs": PAIRS + TEXTS[:3]})
        assert r.status_code == 200, r.text
        e = client.post("/v1/embed", json={"inputs": [t for t in TEXTS if t]})
        assert e.status_code == 200, e.text
    return health, r.json()["results"], torch.tensor(e.json()["embeddings"])


@pytest.fixture(scope="module")
def fp32(files):
    return answers(files, precision="fp32")


def test_bf16_serving_is_within_tolerance_of_fp32(files, fp32):
    health32, results32, emb32 = fp32
    health, results, emb = answers(files, precision="bf16")
    assert (health32["precision"], health32["precision_why"]) == ("fp32", "asked for")
    assert health["precision"] == "bf16" and health["device"] == "cpu"
    assert health["precision_why"].startswith("asked for")
    # the passes really ran in bf16 on the worker threads (autocast entered there, not elsewhere)
    assert not torch.equal(emb, emb32)
    cosine = (emb * emb32).sum(-1) / (emb.norm(dim=-1) * emb32.norm(dim=-1))
    assert cosine.min().item() >= MIN_COSINE, cosine
    worst = 0.0
    for got, want in zip(results, results32):
        assert got["probabilities"].keys() == want["probabilities"].keys()
        worst = max(worst, *(abs(got["probabilities"][k] - want["probabilities"][k]) for k in want["probabilities"]))
    assert 0 < worst <= PROB_TOL, worst


def test_auto_follows_the_machine_and_is_fp32_for_int8(files):
    from lmforge.kernels import machine

    health, _, _ = answers(files, precision="auto", device="auto")
    want = "bf16" if machine.has_bf16() else "fp32"
    assert health["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert health["precision"] == want and health["precision_why"].startswith("auto: ")
    health, results, _ = answers(files, precision="auto", quantize="int8")
    assert (health["quantized"], health["precision"]) == ("int8", "fp32")
    assert health["precision_why"] == "auto: the base model is int8"
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in results)


def test_bf16_generation_runs_on_the_worker_thread(gpt2_dir):
    """Greedy decoding with the KV cache under bf16 autocast (cache entries in bf16), on a thread of
    its own as the generation lane runs it."""
    import threading

    from lmforge.kernels.precision import Precision
    from lmforge.serve.engine import Engine, GenJob

    job = GenJob([5, 6, 7], 12, False, 1.0, 0, 1.0, None)
    out = {}
    for name in ("fp32", "bf16"):
        engine = Engine(str(gpt2_dir), precision=Precision(name, "asked for"))
        worker = threading.Thread(target=lambda: out.setdefault(name, engine.run("generate", [job])[0]))
        worker.start()
        worker.join(60)
    assert out["bf16"]["prompt_tokens"] == 3 and out["bf16"]["finish_reason"] in ("length", "eos")
    assert out["fp32"]["completion_tokens"] > 0 and out["bf16"]["completion_tokens"] > 0


def test_cli_says_the_resolved_precision_and_serves_with_it(files, capsys, monkeypatch):
    """`lmforge serve` up to the point where uvicorn would take over: the line it prints first and
    the app it would serve."""
    import uvicorn

    from lmforge.cli import main

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.append(app))
    assert main(["serve", "--model", str(files / "base"), "--precision", "bf16", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("device cpu, precision bf16 (asked for"), err
    engine = served[0].state.engine
    assert engine.precision.name == "bf16" and engine.model.device.type == "cpu"
    assert main(["serve", "--model", str(files / "base"), "--quantize", "int8"]) == 0
    assert "precision fp32 (auto: the base model is int8)" in capsys.readouterr().err
    assert served[1].state.engine.precision.name == "fp32"


@pytest.mark.parametrize("argv, message", [
    (["--precision", "fp16"], "--precision invalid choice: 'fp16' (choose from 'auto', 'fp32', 'bf16')"),
    (["--device", "tpu"], "--device invalid choice: 'tpu' (choose from 'auto', 'cpu', 'cuda')"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "--device cuda: no CUDA device is available")]))
def test_cli_refuses_bad_precision_and_device_in_one_line(files, capsys, argv, message):
    from lmforge.cli import main

    assert main(["serve", "--model", str(files / "base"), *argv]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("lmforge serve: error:")]
    assert len(lines) == 1 and message in lines[0], lines


@pytest.mark.skipif(not torch.cuda.is_available(), reason="runs wherever a GPU is present")
def test_cuda_serving_matches_cpu_fp32(files, fp32):
    _, results32, emb32 = fp32
    health, results, emb = answers(files, device="cuda", precision="auto")
    assert health["device"].startswith("cuda") and health["precision"] in ("fp32", "bf16")
    cosine = (emb * emb32).sum(-1) / (emb.norm(dim=-1) * emb32.norm(dim=-1))
    assert cosine.min().item() >= MIN_COSINE, cosine
    for got, want in zip(results, results32):
        assert all(abs(got["probabilities"][k] - want["probabilities"][k]) <= PROB_TOL for k in want["probabilities"])
