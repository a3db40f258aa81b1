"""`lmforge serve` as a real server process on 127.0.0.1: every endpoint and error code, mixed-adapter
batches equal to offline prediction, hot load/unload under load, 429, 401, SIGTERM drain, an
OpenAPI fuzz run (schemathesis) and the web page in headless Chromium.

Models are tiny: the bottom two layers of all-MiniLM-L6-v2 with random LoRA adapters (no training),
and a random 2-layer GPT-2 with a byte-level BPE trained here."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

httpx = pytest.importorskip("httpx")

from lmforge.adapters.lora import LoraConfig  # noqa: E402
from lmforge.adapters.manager import add_adapter, lora_layers  # noqa: E402
from lmforge.adapters.peft_format import save_adapter  # noqa: E402
from lmforge.data.tables import Example  # noqa: E402
from lmforge.data.tokenizer import Tokenizer, load_tokenizer  # noqa: E402
from lmforge.infer.classify import Classifier  # noqa: E402
from lmforge.infer.embed import Embedder  # noqa: E402
from lmforge.models import Model, ModelConfig, from_pretrained, generate, save_pretrained  # noqa: E402
from lmforge.models.heads import build_head  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEY = "s3cret-key"
TEXTS = ["a gorgeous, witty film", "dull and far too long", "it rained", "", "the cast is superb but the plot is thin",
         "I would not watch it again", "an instant classic", "meh"]
PAIRS = [["A man is sleeping.", "A person rests."], ["Two dogs run.", "No animal moves."],
         ["The market fell.", "Stocks dropped sharply today."]]
# name -> (labels, problem_type); the adapters differ in rank and targets too
ADAPTERS = {"pos": (["negative", "positive"], None), "nli": (["entailment", "neutral", "contradiction"], None),
            "reg": (None, "regression"), "extra": (["no", "yes"], None)}


def make_adapter(model, base_dir, name, labels, problem_type, out, seed):
    cfg = {"id2label": dict(enumerate(labels))} if labels else {"num_labels": 1, "problem_type": problem_type}
    targets = ("query", "value") if seed % 2 else ("query", "key", "value", "output")
    add_adapter(model, name, LoraConfig(r=2 + 2 * seed, alpha=8, target_modules=targets),
                head=build_head(model.config.replace(**cfg)), head_config=cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if name in layer.lora_B:
                w = layer.lora_B[name].weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.2)
        for p in model.adapter_heads[name].parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    save_adapter(model, name, out, base_model=str(base_dir), tokenizer=load_tokenizer(base_dir))


@pytest.fixture(scope="module")
def encoder_files(tmp_path_factory, minilm_dir):
    """base/ (2-layer MiniLM cut), root/ with adapters: pos-run/best (a run directory), nli, reg, extra."""
    d = tmp_path_factory.mktemp("serve")
    save_pretrained(from_pretrained(minilm_dir, num_layers=2), d / "base", tokenizer=load_tokenizer(minilm_dir))
    model = from_pretrained(d / "base", head="classification").eval()
    dirs = {}
    for seed, (name, (labels, problem)) in enumerate(ADAPTERS.items()):
        out = d / "root" / ("pos-run/best" if name == "pos" else name)
        make_adapter(model, d / "base", name, labels, problem, out, seed)
        dirs[name] = out
    (d / "outside").mkdir()
    shutil.copytree(dirs["extra"], d / "outside" / "extra")
    return d, dirs


def tiny_bpe(directory):
    """A byte-level BPE of 300 tokens trained here on three sentences, saved in GPT-2's file layout."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["once upon a time there was a cat", "the dog sat on the mat", "hello world"] * 20,
                            vocab_size=300, special_tokens=["<|endoftext|>"])
    directory.mkdir(parents=True)
    bpe.save_model(str(directory))
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return Tokenizer.from_dir(directory)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A random 2-layer GPT-2 with a small byte-level BPE trained here."""
    d = tmp_path_factory.mktemp("gpt2")
    tok = tiny_bpe(d / "tok")
    eos = tok.eos_token_id
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="gpt2", vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                      intermediate_size=64, max_position_embeddings=64, type_vocab_size=0, hidden_act="gelu_new",
                      layer_norm_eps=1e-5, head="causal-lm", bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                      hidden_dropout=0.0, attention_dropout=0.0)
    save_pretrained(Model(cfg).eval(), d / "model", tokenizer=tok)
    return d / "model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args, tmp: Path, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"server-{self.port}.log"
        # fp32 unless a test asks: answers are compared with the fp32 offline ones at 1e-5 (the
        # default, auto, is bf16 on CPUs with AMX or AVX512_BF16; tests/test_serve_precision.py)
        args = [*map(str, args)]
        cmd = [sys.executable, "-m", "lmforge", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--threads", "1", *([] if "--precision" in args else ["--precision", "fp32"]), *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT, cwd=REPO,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start:\n{self.log.read_text()}")
            time.sleep(0.2)
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def post(self, path, body=None, **kw):
        return self.client.post(path, json=body, **kw)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def enc(encoder_files, tmp_path_factory):
    d, dirs = encoder_files
    # pos is given as its run directory (best/ is found), the others as adapter directories
    s = Server(["--model", d / "base", "--adapter", f"pos={d / 'root' / 'pos-run'}", "--adapter", f"nli={dirs['nli']}",
                "--adapter", f"reg={dirs['reg']}", "--adapter-root", d / "root", "--max-wait-ms", 30,
                "--max-batch-size", 16, "--max-input-tokens", 32], tmp_path_factory.mktemp("log"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def offline(encoder_files):
    """What `lmforge predict` answers: one Classifier per adapter directory."""
    _, dirs = encoder_files
    return {name: Classifier(path) for name, path in dirs.items()}


def predict(clf, inputs):
    """Offline predictions (texts and pairs go in separate calls, as `lmforge predict` files do)."""
    out = [None] * len(inputs)
    for is_pair in (False, True):
        idx = [i for i, x in enumerate(inputs) if isinstance(x, str) != is_pair]
        if idx:
            examples = [Example(text=inputs[i][0], pair=inputs[i][1], label=None, line=0) if is_pair
                        else Example(text=inputs[i], pair=None, label=None, line=0) for i in idx]
            for i, r in zip(idx, clf.predict(examples)):
                out[i] = r
    return out


def assert_same(got, want, tol=1e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if "score" in w:
            assert abs(g["score"] - w["score"]) < tol, (g, w)
        else:
            assert g["label"] == w["label"], (g, w)
            assert g["probabilities"].keys() == w["probabilities"].keys()
            for k in w["probabilities"]:
                assert abs(g["probabilities"][k] - w["probabilities"][k]) < tol, (g, w)


def error(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()["error"]
    assert body["status"] == status and body["message"]
    return body


def test_cli_refuses_bad_settings_before_serving(encoder_files, capsys, monkeypatch):
    from lmforge.cli import main

    d, dirs = encoder_files
    monkeypatch.delenv("LMFORGE_UNSET_KEY", raising=False)
    for argv, message in [
        (["--adapter", f"a.b={dirs['nli']}"], "adapter name 'a.b' is not valid"),
        (["--adapter", f"x={d / 'nowhere'}"], "no adapter_config.json"),
        (["--adapter", "novalue"], "expected NAME=DIR"),
        (["--api-key-env", "LMFORGE_UNSET_KEY"], "LMFORGE_UNSET_KEY: that environment variable is empty"),
        (["--adapter-root", str(d / "nowhere")], "no such directory"),
        (["--max-batch-size", "0"], "--max-batch-size must be >= 1"),
    ]:
        assert main(["serve", "--model", str(d / "base"), *argv]) == 2
        assert message in capsys.readouterr().err, argv


# -- the encoder server ---------------------------------------------------------------------------

def test_health_page_openapi_and_adapter_list(enc):
    h = enc.client.get("/healthz").json()
    assert h["status"] == "ok" and h["model_type"] == "bert" and h["adapters"] == 3
    assert (h["device"], h["precision"], h["precision_why"]) == ("cpu", "fp32", "asked for")
    page = enc.client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "/v1/classify" in page.text
    spec = enc.client.get("/openapi.json").json()
    assert {"/v1/classify", "/v1/embed", "/v1/generate", "/v1/adapters", "/v1/adapters/{name}", "/healthz",
            "/metrics"} <= set(spec["paths"])
    listed = enc.client.get("/v1/adapters").json()
    assert [a["name"] for a in listed["adapters"]] == ["pos", "nli", "reg"]
    by_name = {a["name"]: a for a in listed["adapters"]}
    assert by_name["nli"]["labels"] == ["entailment", "neutral", "contradiction"]
    assert by_name["reg"]["regression"] and by_name["pos"]["source"].endswith("pos-run/best")
    assert listed["base"]["classifier"] is False  # MiniLM has no trained classification head


def test_concurrent_mixed_adapter_requests_equal_offline_predictions(enc, offline):
    jobs = [("pos", TEXTS[i:i + 3]) for i in range(0, 8, 2)] + [("nli", [p]) for p in PAIRS] + \
           [("reg", TEXTS[i:i + 2]) for i in range(0, 8, 3)] + [("nli", PAIRS + ["a single text"])]
    jobs = jobs * 2
    start = threading.Barrier(len(jobs))

    def call(job):
        start.wait()
        return enc.post("/v1/classify", {"adapter": job[0], "inputs": job[1]})

    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(call, jobs))
    for (name, inputs), r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["adapter"] == name
        assert_same(body["results"], predict(offline[name], inputs))
    # the requests were answered by batches that mixed adapters (one forward pass for several)
    m = enc.client.get("/metrics").text
    single = float(next(ln.split()[-1] for ln in m.splitlines() if ln.startswith('lmforge_batch_adapters_bucket{le="1.0"}')))
    total = float(next(ln.split()[-1] for ln in m.splitlines() if ln.startswith("lmforge_batch_adapters_count")))
    assert total > single, m


def test_embed_equals_offline_embedder(enc, encoder_files):
    d, _ = encoder_files
    r = enc.post("/v1/embed", {"inputs": TEXTS[:4]})
    assert r.status_code == 200, r.text
    body = r.json()
    want = Embedder(str(d / "base")).embed(TEXTS[:4])
    got = torch.tensor(body["embeddings"])
    assert body["dim"] == 384 and got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # with an adapter the vectors change (its LoRA applies), and stay unit length
    a = torch.tensor(enc.post("/v1/embed", {"inputs": TEXTS[:2], "adapter": "pos"}).json()["embeddings"])
    assert not torch.allclose(a, want[:2], atol=1e-4)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(2))


def test_input_errors_name_the_field(enc, offline):
    r = enc.client.post("/v1/classify", content=b'{"adapter": "pos", "inputs": [', headers={"content-type": "application/json"})
    assert "not valid JSON" in error(r, 422)["message"]
    assert error(enc.post("/v1/classify", {"adapter": "pos", "inputs": [3]}), 422)["field"] == "inputs.0"
    assert error(enc.post("/v1/classify", {"adapter": "pos", "inputs": "text"}), 422)["field"] == "inputs"
    assert error(enc.post("/v1/classify", {"adapter": "pos"}), 422)["field"] == "inputs"
    assert error(enc.post("/v1/classify", {"adapter": "pos", "inputs": []}), 422)["field"] == "inputs"
    assert error(enc.post("/v1/classify", {"adapter": "pos", "inputs": [["a", "b", "c"]]}), 422)["field"] == "inputs.0"
    assert error(enc.post("/v1/classify", {"adapter": "pos", "inputs": ["a"], "tmperature": 1}), 422)["field"] == "tmperature"
    assert error(enc.post("/v1/embed", {"inputs": ["a"], "truncate": "maybe"}), 422)["field"] == "truncate"
    r = enc.client.post("/v1/classify", content=b'{"adapter": "pos", "inputs": ["\\ud800"]}',
                        headers={"content-type": "application/json"})  # a lone surrogate escape
    assert error(r, 422)["field"] == "inputs.0"
    # unknown adapter: 404 naming it and listing the loaded ones
    e = error(enc.post("/v1/classify", {"adapter": "sst9", "inputs": ["a"]}), 404)
    assert "'sst9'" in e["message"] and e["loaded"] == ["pos", "nli", "reg"]
    assert error(enc.post("/v1/embed", {"adapter": "sst9", "inputs": ["a"]}), 404)["loaded"]
    # the base model has no trained head: say so and list the adapters
    assert "no trained classification head" in error(enc.post("/v1/classify", {"inputs": ["a"]}), 400)["message"]
    # generation on an encoder: 400 saying why
    assert "needs a decoder" in error(enc.post("/v1/generate", {"prompt": "hello"}), 400)["message"]
    # too long (--max-input-tokens 32): 413 naming the input, unless truncation is asked for
    long = "word " * 60
    e = error(enc.post("/v1/classify", {"adapter": "pos", "inputs": ["short", long]}), 413)
    assert e["field"] == "inputs.1" and "32" in e["message"] and "truncate" in e["message"]
    assert error(enc.post("/v1/embed", {"inputs": [long]}), 413)["field"] == "inputs.0"
    r = enc.post("/v1/classify", {"adapter": "pos", "inputs": ["short", long], "truncate": True})
    assert r.status_code == 200, r.text
    offline["pos"].max_length = 32
    try:
        assert_same(r.json()["results"], predict(offline["pos"], ["short", long]))
    finally:
        offline["pos"].max_length = 512
    assert enc.client.get("/nowhere").status_code == 404
    assert error(enc.client.put("/v1/classify", json={}), 405)
    # the worker survived all of it
    assert enc.post("/v1/classify", {"adapter": "pos", "inputs": ["fine"]}).status_code == 200


def test_hot_load_and_unload_while_requests_are_in_flight(enc, offline, encoder_files):
    d, _ = encoder_files
    want = {"pos": predict(offline["pos"], TEXTS[:3]), "nli": predict(offline["nli"], PAIRS)}
    stop, failures, done = threading.Event(), [], []

    def hammer(name, inputs):
        while not stop.is_set():
            r = enc.post("/v1/classify", {"adapter": name, "inputs": inputs})
            try:
                assert r.status_code == 200, r.text
                assert_same(r.json()["results"], want[name])
                done.append(name)
            except AssertionError as e:
                failures.append(e)

    threads = [threading.Thread(target=hammer, args=a) for a in (("pos", TEXTS[:3]), ("nli", PAIRS))] * 1
    for t in threads:
        t.start()
    try:
        for round_ in range(3):
            r = enc.post("/v1/adapters", {"name": "extra", "path": "extra"})
            assert r.status_code == 201, r.text
            assert r.json()["labels"] == ["no", "yes"]
            r = enc.post("/v1/classify", {"adapter": "extra", "inputs": TEXTS[3:6]})
            assert r.status_code == 200, r.text
            assert_same(r.json()["results"], predict(offline["extra"], TEXTS[3:6]))
            assert error(enc.post("/v1/adapters", {"name": "extra", "path": "extra"}), 409)
            assert enc.client.delete("/v1/adapters/extra").status_code == 204
            assert error(enc.post("/v1/classify", {"adapter": "extra", "inputs": ["a"]}), 404)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:3]
    assert done.count("pos") >= 3 and done.count("nli") >= 3
    # a run directory below the root loads too (its best/ is found)
    assert enc.post("/v1/adapters", {"name": "pos2", "path": "pos-run"}).status_code == 201
    assert enc.client.delete("/v1/adapters/pos2").status_code == 204
    # outside the root, traversal, symlinks out: 403; names that look like paths: 403
    assert error(enc.post("/v1/adapters", {"name": "x", "path": "../outside/extra"}), 403)["field"] == "path"
    assert error(enc.post("/v1/adapters", {"name": "x", "path": str(d / "outside" / "extra")}), 403)
    link = d / "root" / "link"
    if not link.exists():
        link.symlink_to(d / "outside")
    assert error(enc.post("/v1/adapters", {"name": "x", "path": "link/extra"}), 403)
    assert error(enc.post("/v1/adapters", {"name": "../x", "path": "extra"}), 403)["field"] == "name"
    assert error(enc.post("/v1/adapters", {"name": "a.b", "path": "extra"}), 422)["field"] == "name"
    assert error(enc.client.delete("/v1/adapters/..pos"), 403)["field"] == "name"
    assert error(enc.client.delete("/v1/adapters/..%2Fpos"), 404)  # a slash never reaches a name
    assert error(enc.post("/v1/adapters", {"name": "x", "path": "nothing-here"}), 400)
    assert error(enc.client.delete("/v1/adapters/extra"), 404)["loaded"] == ["pos", "nli", "reg"]
    assert [a["name"] for a in enc.client.get("/v1/adapters").json()["adapters"]] == ["pos", "nli", "reg"]


def test_metrics_in_prometheus_format(enc):
    enc.post("/v1/classify", {"adapter": "pos", "inputs": ["x"]})
    text = enc.client.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    m = text.text
    for needle in ("# TYPE lmforge_requests_total counter", 'endpoint="/v1/classify",method="POST",status="200"',
                   "# TYPE lmforge_request_duration_seconds histogram", "lmforge_batch_size_bucket",
                   "lmforge_queue_depth 0", 'lmforge_adapter_requests_total{adapter="pos",endpoint="classify"}',
                   'lmforge_adapter_sequences_total{adapter="nli",kind="classify"}', "lmforge_adapters_loaded 3",
                   'status="404"', 'status="413"', 'status="422"'):
        assert needle in m, needle
    for line in m.splitlines():  # every sample line is `name{labels} number`
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


def test_web_page_in_headless_chromium(enc):
    chromium = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if chromium is None:
        pytest.skip("Chromium not found: install it (Debian/Ubuntu: `sudo apt-get install chromium`) "
                    "to run the web page test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the browser test)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(enc.url + "/")
            page.wait_for_function("document.querySelectorAll('#adapter option').length >= 3")
            page.select_option("#adapter", "nli")
            page.fill("#text", PAIRS[0][0])
            page.fill("#pair", PAIRS[0][1])
            page.click("#classify")
            page.wait_for_selector("#label")
            r = enc.post("/v1/classify", {"adapter": "nli", "inputs": [PAIRS[0]]}).json()["results"][0]
            assert page.inner_text("#label") == r["label"]
            assert page.locator("#probabilities tr").count() == 3
            # an error is shown, not swallowed
            page.select_option("#adapter", "pos")
            page.fill("#pair", "")
            page.fill("#text", "")
            page.evaluate("document.getElementById('adapter').add(new Option('gone', 'gone'))")
            page.select_option("#adapter", "gone")
            page.click("#classify")
            page.wait_for_selector("#error")
            assert "404" in page.inner_text("#error") and "gone" in page.inner_text("#error")
        finally:
            browser.close()


def test_openapi_fuzzing_finds_no_server_error(enc, tmp_path):
    """schemathesis against /openapi.json: valid and invalid bodies for every operation; no 5xx.
    Runs last against this server: it may unload adapters."""
    st = Path(sys.executable).with_name("st")
    if not st.exists():
        pytest.skip("pip install schemathesis (the OpenAPI fuzz test)")
    r = subprocess.run([str(st), "run", enc.url + "/openapi.json", "--checks", "not_a_server_error",
                        "--max-examples", "12", "--seed", "7", "--phases", "examples,coverage,fuzzing",
                        "--no-color", "--request-timeout", "60", "--suppress-health-check", "all"],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "NO_COLOR": "1"},
                       cwd=tmp_path)  # its .schemathesis/ cache goes there
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    # the fuzzer may well have unloaded adapters (DELETE is open without a key); the worker is alive
    assert enc.client.get("/healthz").json()["status"] == "ok"
    assert enc.post("/v1/embed", {"inputs": ["still here"]}).status_code == 200


# -- a decoder server with an API key, a small queue and a long batching window -------------------

@pytest.fixture(scope="module")
def dec(gpt2_dir, tmp_path_factory):
    s = Server(["--model", gpt2_dir, "--api-key-env", "LMFORGE_TEST_KEY", "--max-queue", 4, "--max-wait-ms", 1500,
                "--max-batch-size", 64], tmp_path_factory.mktemp("log"), env={"LMFORGE_TEST_KEY": KEY})
    s.client.headers["Authorization"] = f"Bearer {KEY}"
    yield s
    s.stop()


def test_api_key_is_required_on_v1_endpoints(dec):
    anon = httpx.Client(base_url=dec.url, timeout=30)
    r = anon.post("/v1/embed", json={"inputs": ["hello"]})
    assert "missing API key" in error(r, 401)["message"] and r.headers["www-authenticate"] == "Bearer"
    assert "wrong" in error(anon.post("/v1/generate", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"}), 401)["message"]
    assert error(anon.get("/v1/adapters", headers={"X-API-Key": "nope"}), 401)
    assert error(anon.post("/v1/adapters", json={"name": "a", "path": "b"}), 401)
    assert error(anon.delete("/v1/adapters/a"), 401)
    assert anon.get("/v1/adapters", headers={"X-API-Key": KEY}).status_code == 200
    assert anon.get("/healthz").status_code == 200 and anon.get("/metrics").status_code == 200
    # with the key: hot loading is off without --adapter-root
    assert "--adapter-root" in error(dec.post("/v1/adapters", {"name": "a", "path": "b"}), 403)["message"]


def test_generate_equals_offline_generation(dec, gpt2_dir):
    model = from_pretrained(gpt2_dir).eval()
    tok = load_tokenizer(gpt2_dir)
    ids = torch.tensor([tok.encode("once upon a time")])
    out = generate(model, ids, torch.ones_like(ids), max_new_tokens=12)[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in out:
        out = out[:out.index(tok.eos_token_id)]
    r = dec.post("/v1/generate", {"prompt": "once upon a time", "max_new_tokens": 12})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"] == tok.decode(out) and body["completion_tokens"] == len(out)
    assert body["prompt_tokens"] == ids.shape[1]
    sample = {"prompt": "the dog", "max_new_tokens": 10, "do_sample": True, "top_k": 20, "top_p": 0.9,
              "temperature": 1.5, "seed": 3}
    a, b = dec.post("/v1/generate", sample).json(), dec.post("/v1/generate", sample).json()
    assert a["text"] == b["text"]  # a seed makes sampling reproducible
    assert error(dec.post("/v1/generate", {"prompt": "x", "max_new_tokens": 64}), 422)["field"] == "max_new_tokens"
    assert error(dec.post("/v1/generate", {"prompt": "x", "temperature": 0}), 422)["field"] == "temperature"
    assert error(dec.post("/v1/generate", {"prompt": ""}), 422)["field"] == "prompt"
    assert error(dec.post("/v1/generate", {"prompt": "hello " * 70}), 413)["field"] == "prompt"
    assert error(dec.post("/v1/embed", {"inputs": [["a", "b"]]}), 422)["field"] == "inputs.0"
    assert error(dec.post("/v1/classify", {"inputs": ["a"]}), 400)


def test_generate_with_beams_ngrams_and_stop_strings(dec, gpt2_dir):
    model = from_pretrained(gpt2_dir).eval()
    tok = load_tokenizer(gpt2_dir)
    ids = torch.tensor([tok.encode("once upon a time")])
    kw = dict(max_new_tokens=12, num_beams=3, length_penalty=0.8, no_repeat_ngram_size=2)
    out = generate(model, ids, torch.ones_like(ids), **kw)[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in out:
        out = out[:out.index(tok.eos_token_id)]
    want = tok.decode(out)
    body = dec.post("/v1/generate", {"prompt": "once upon a time", **kw}).json()
    assert body["text"] == want, body
    stop = want.split()[1]
    body = dec.post("/v1/generate", {"prompt": "once upon a time", **kw, "stop": ["zzzq", stop]}).json()
    assert body["text"] == want[:want.index(stop)] and body["finish_reason"] == "stop"
    r = dec.post("/v1/generate", {"prompt": "x", "num_beams": 2, "do_sample": True})
    assert "does not sample" in error(r, 422)["message"]
    assert error(dec.post("/v1/generate", {"prompt": "x", "num_beams": 0}), 422)["field"] == "num_beams"
    assert error(dec.post("/v1/generate", {"prompt": "x", "stop": ["a"] * 9}), 422)["field"] == "stop"


def test_generate_with_the_output_ngram_scope(dec, gpt2_dir):
    """no_repeat_ngram_scope reaches the decoder, greedy and beam; a bad value is a 422."""
    model = from_pretrained(gpt2_dir).eval()
    tok = load_tokenizer(gpt2_dir)

    def offline(prompt, **kw):
        ids = torch.tensor([tok.encode(prompt)])
        out = generate(model, ids, torch.ones_like(ids), **kw)[0, ids.shape[1]:].tolist()
        return tok.decode(out[:out.index(tok.eos_token_id)] if tok.eos_token_id in out else out)

    for beams in (1, 3):
        kw = dict(max_new_tokens=16, num_beams=beams, no_repeat_ngram_size=2)
        # a prompt whose continuation the two scopes decode differently (else the case tests nothing)
        prompt = next(p for p in ("once upon a time", "the cat sat on the mat", "a b c a b c a b c", "hello hello")
                      if offline(p, no_repeat_ngram_scope="output", **kw) != offline(p, **kw))
        want = offline(prompt, no_repeat_ngram_scope="output", **kw)
        body = dec.post("/v1/generate", {"prompt": prompt, **kw, "no_repeat_ngram_scope": "output"}).json()
        assert body["text"] == want, body
        assert dec.post("/v1/generate", {"prompt": prompt, **kw}).json()["text"] == offline(prompt, **kw)
    r = dec.post("/v1/generate", {"prompt": "x", "no_repeat_ngram_scope": "prompt"})
    assert error(r, 422)["field"] == "no_repeat_ngram_scope"


def test_full_queue_answers_429_with_retry_after(dec):
    """--max-queue 4 sequences, a 1.5 s batching window: 3 queued + 2 more do not fit."""
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(dec.post, "/v1/embed", {"inputs": ["a", "b", "c"]})
        deadline = time.monotonic() + 30
        while dec.client.get("/healthz").json()["queue_depth"] < 3:
            assert time.monotonic() < deadline and not first.done()
            time.sleep(0.01)
        r = dec.post("/v1/embed", {"inputs": ["d", "e"]})
        assert "queue is full" in error(r, 429)["message"]
        assert int(r.headers["retry-after"]) >= 1
        assert first.result().status_code == 200 and len(first.result().json()["embeddings"]) == 3
    assert "lmforge_queue_rejections_total 1" in dec.client.get("/metrics").text
    # more inputs than the whole queue holds: retrying cannot help, so 413 rather than 429
    assert "split the request" in error(dec.post("/v1/embed", {"inputs": ["x"] * 5}), 413)["message"]


def test_sigterm_drains_requests_in_flight(gpt2_dir, tmp_path):
    s = Server(["--model", gpt2_dir, "--max-wait-ms", 1500, "--max-batch-size", 64], tmp_path)
    try:
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(s.post, "/v1/embed", {"inputs": ["a", "b"]}),
                       pool.submit(s.post, "/v1/generate", {"prompt": "the cat", "max_new_tokens": 40}),
                       pool.submit(s.post, "/v1/embed", {"inputs": ["c"]})]
            deadline = time.monotonic() + 30
            # the embeddings wait in the queue; the generation runs in its own lane (taken at once)
            while (s.client.get("/healthz").json()["queue_depth"] < 3
                   or 'lmforge_batches_total{kind="generate"}' not in s.client.get("/metrics").text):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            s.proc.send_signal(signal.SIGTERM)
            results = [f.result() for f in futures]
        assert [r.status_code for r in results] == [200, 200, 200], [r.text for r in results]
        assert len(results[0].json()["embeddings"]) == 2 and results[1].json()["prompt_tokens"] > 0
        # uvicorn exits after the drain by re-raising the signal it caught (or with 0)
        assert s.proc.wait(30) in (0, -signal.SIGTERM)
        assert "Finished server process" in s.log.read_text()
        with pytest.raises(httpx.HTTPError):
            httpx.get(s.url + "/healthz", timeout=2)
    finally:
        s.stop()


def test_int8_engine_hot_loads_adapters_after_quantizing(encoder_files, offline):
    """--quantize int8 (in process): adapters loaded after quantization attach to every target
    layer, and answers stay within int8 rounding of the fp32 offline ones."""
    from lmforge.serve.engine import Engine, Seq

    d, dirs = encoder_files
    engine = Engine(str(d / "base"))
    engine.prepare_quantized()
    assert engine.quantized == "int8"
    for name in ("pos", "nli"):  # pos targets q, k, v and the FFN output; nli q and v
        engine.load_adapter(name, dirs[name])
    items = [Seq(e, "pos") for e in engine.encode(TEXTS[:3], False)] + \
            [Seq(e, "nli") for e in engine.encode(PAIRS, False)]
    got = engine.run("classify", items)
    want = predict(offline["pos"], TEXTS[:3]) + predict(offline["nli"], PAIRS)
    for g, w in zip(got, want):
        for k in w["probabilities"]:
            assert abs(g["probabilities"][k] - w["probabilities"][k]) < 0.05, (g, w)


def test_batcher_isolates_a_failing_request_and_keeps_running():
    """In process: requests share passes of at most max_batch_size sequences; a pass that raises is
    rerun request by request, so only the request that breaks it gets the error."""
    from lmforge.serve.batcher import Batcher, QueueFull

    passes = []

    def runner(kind, items):
        passes.append(list(items))
        if "boom" in items:
            raise ValueError("boom")
        return [x.upper() for x in items]

    b = Batcher(runner, max_batch_size=4, max_wait_ms=200, max_queue=8).start()
    try:
        futures = [b.submit("classify", ["a", "b"]), b.submit("classify", ["boom"]), b.submit("classify", ["c", "d", "e"])]
        with pytest.raises(QueueFull):
            b.submit("classify", ["x"] * 3)  # 6 waiting + 3 > 8
        assert futures[0].result(10) == ["A", "B"] and futures[2].result(10) == ["C", "D", "E"]
        with pytest.raises(ValueError, match="boom"):
            futures[1].result(10)
        assert max(len(p) for p in passes) <= 4 and len(passes[0]) == 4  # a, b, boom, c together
        assert b.submit("embed", ["z"]).result(10) == ["Z"]  # the worker lives on
    finally:
        b.stop(10)


def test_adapter_unloaded_while_queued_answers_404_for_its_sequences_only(encoder_files, offline):
    from lmforge.serve.engine import Engine, InputError, Seq

    d, dirs = encoder_files
    engine = Engine(str(d / "base"))
    engine.load_adapter("pos", dirs["pos"])
    engine.load_adapter("extra", dirs["extra"])
    items = [Seq(e, "extra" if i % 2 else "pos") for i, e in enumerate(engine.encode(TEXTS[:4], False))]
    engine.unload_adapter("extra")  # between validation and the forward pass
    out = engine.run("classify", items)
    assert all(isinstance(out[i], InputError) and out[i].status == 404 for i in (1, 3))
    assert_same([out[0], out[2]], predict(offline["pos"], [TEXTS[0], TEXTS[2]]))


# -- streaming generation (server-sent events) ------------------------------------------------------

def sse_events(response) -> list:
    """The data of each server-sent event of a streamed response, in order ("[DONE]" as a string)."""
    assert response.headers["content-type"].startswith("text/event-stream"), response.headers
    text = "".join(response.iter_text()) if hasattr(response, "iter_text") else response.text
    blocks = [b for b in text.split("\n\n") if b.strip()]
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks), text
    return [b[6:] if b[6:] == "[DONE]" else json.loads(b[6:]) for b in blocks]


def test_generate_streams_server_sent_events(dec):
    """Each chunk of text an event as it is decoded, then the non-streamed answer's finish_reason and
    counts, then [DONE]; the chunks add up to the non-streamed text (greedy, seeded sampling, stop
    strings, beams)."""
    base = {"prompt": "once upon a time", "max_new_tokens": 20}
    for extra in ({}, {"do_sample": True, "top_k": 20, "temperature": 1.5, "seed": 3},
                  {"num_beams": 3, "no_repeat_ngram_size": 2}):
        body = {**base, **extra}
        want = dec.post("/v1/generate", body).json()
        stop = want["text"][len(want["text"]) // 2:][:2] or "zz"
        for stops in ([], [stop]):
            want = dec.post("/v1/generate", {**body, "stop": stops}).json()
            with dec.client.stream("POST", "/v1/generate", json={**body, "stop": stops, "stream": True}) as r:
                assert r.status_code == 200
                events = sse_events(r)
            assert events[-1] == "[DONE]"
            *chunks, final = events[:-1]
            assert all(set(c) == {"text"} and c["text"] for c in chunks), chunks
            assert "".join(c["text"] for c in chunks) == want["text"], (extra, stops)
            assert final["finish_reason"] == want["finish_reason"] and final["text"] == ""
            assert final["prompt_tokens"] == want["prompt_tokens"]
            if not stops:   # a stream stops decoding at a stop string; the plain answer decodes on
                assert final["completion_tokens"] == want["completion_tokens"]
            if not extra.get("num_beams"):   # beam search knows its answer only at the end: one chunk
                assert len(chunks) > 1 or len(want["text"]) < 2
    # errors before the stream starts are plain JSON answers
    assert error(dec.post("/v1/generate", {"prompt": "", "stream": True}), 422)["field"] == "prompt"
    assert error(dec.post("/v1/generate", {"prompt": "x", "stream": "maybe"}), 422)["field"] == "stream"


def add_classifier(engine):
    """A LoRA adapter with a classification head (on the last token) added to the served GPT-2 decoder
    in process (PEFT's format has no GPT-2 mapping to load one from)."""
    cfg = {"head": "classification", "id2label": {0: "no", 1: "yes"}}
    with engine.changing_adapters():
        add_adapter(engine.model, "cls", LoraConfig(r=2, alpha=4, target_modules=("query", "value")),
                    head=build_head(engine.model.config.replace(**cfg)), head_config=cfg)


def test_classify_and_embed_run_while_a_stream_decodes(gpt2_dir, tmp_path):
    """In process (uvicorn on a thread), with the generation held mid-decode by a gate: a classify and
    an embed request are answered while the stream waits, and then the stream completes."""
    import uvicorn

    from lmforge.serve.app import ServeSettings, create_app
    from lmforge.serve.engine import Engine

    engine = Engine(str(gpt2_dir))
    add_classifier(engine)
    gate, held, calls = threading.Event(), threading.Event(), []

    def hold_the_generation(module, args):   # the third forward of the generation thread waits
        if threading.current_thread().name == "lmforge-generate":
            calls.append(1)
            if len(calls) == 3:
                held.set()
                assert gate.wait(60)
    hook = engine.model.register_forward_pre_hook(hold_the_generation)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ServeSettings(), engine), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.05)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20)
        body = {"prompt": "once upon a time", "max_new_tokens": 30}
        with ThreadPoolExecutor(1) as pool:
            def streamed():
                with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as r:
                    return sse_events(r)
            stream = pool.submit(streamed)
            assert held.wait(60), "the generation never started"
            r = client.post("/v1/classify", json={"adapter": "cls", "inputs": ["the cat", "hello world"]})
            assert r.status_code == 200, r.text
            assert [x["label"] in ("no", "yes") for x in r.json()["results"]] == [True, True]
            assert client.post("/v1/embed", json={"inputs": ["the dog"]}).status_code == 200
            assert not stream.done()   # still held mid-decode
            gate.set()
            events = stream.result(60)
        assert events[-1] == "[DONE]" and "finish_reason" in events[-2]
        hook.remove()
        want = client.post("/v1/generate", json=body).json()
        assert "".join(e["text"] for e in events[:-2]) == want["text"]
    finally:
        gate.set()
        hook.remove()
        server.should_exit = True
        thread.join(30)
