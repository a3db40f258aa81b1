"""Soak and fault benchmark for the server: sustained mixed load for minutes, RSS over time, slow and
disconnecting clients, adapters hot-loaded and unloaded, then SIGTERM while requests are in flight.

  python -m benchmarks.soak                    # 10 minutes of load, section 'Soak' of BENCHMARKS.md
  python -m benchmarks.soak --minutes 1 --out /tmp/soak --report /tmp/soak/BENCHMARKS.md   # a smoke

Two servers run, each in its own process on 127.0.0.1, because no one server can do everything:

- encoder: `lmforge serve --model minilm --adapter-root ROOT` (the CLI itself), 4 LoRA adapters
  loaded at start, classification and embedding requests with mixed adapters, hot loads and unloads
  of other adapters below ROOT, slow clients (request bodies trickled in over seconds), clients that
  disconnect in the middle of sending a body or before reading the answer, and inputs longer than
  --max-input-tokens (the designed 413).
- decoder: a random 4-layer GPT-2 with a byte-level BPE trained here, whose two in-memory LoRA
  adapters bring classification heads (a classifier on a causal LM), served by the same app
  (lmforge.serve.app.create_app + uvicorn, as `lmforge serve` runs it) from a hidden mode of this
  script: `lmforge serve` can load PEFT-format adapters onto bert/roberta only, so a decoder served by
  the CLI cannot classify. It takes generation, classification and embedding requests.

RSS of both server processes is sampled every --sample-seconds (psutil, else /proc/PID/status) and
written as JSON and a PNG. Every answer's status code is counted. After the soak, with the load off:
median classification latency on the decoder server alone vs while a long generation runs on it, in
alternating rounds (target <= 2x). Last, requests are put in flight on both servers and both get
SIGTERM: every one of those requests must be answered 200, and both servers must exit 0.

Targets: RSS at the end within 10% of RSS at the end of the warm-up; no status other than 200 (201 and
204 for adapter loads and unloads) and the designed 413 (over-long input) and 429 (queue full).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from benchmarks import report
from benchmarks.report import ROOT, write_section
from benchmarks.serve import free_port, make_adapters, sentences, start

STARTUP_ADAPTERS = 4             # encoder adapters loaded at start, used by the steady traffic
HOT_ADAPTERS = 3                 # adapter directories below --adapter-root that are loaded and unloaded
MAX_INPUT_TOKENS = 128           # the encoder server's limit; longer inputs get the designed 413
DECODER_LABELS = {"pos": ["negative", "positive"], "topic": ["cats", "dogs", "other"]}
ALLOWED = {"/v1/classify": {200, 413, 429}, "/v1/embed": {200, 413, 429}, "/v1/generate": {200, 429},
           "POST /v1/adapters": {201, 429}, "DELETE /v1/adapters": {204}}


# -- the decoder server ---------------------------------------------------------------------------
def build_decoder(out: Path, texts: list[str]) -> Path:
    """A random GPT-2 (4 layers, width 128, 512 positions) and a 1,000-token byte-level BPE trained on
    `texts`, saved as a model directory."""
    import torch
    from tokenizers import ByteLevelBPETokenizer

    from lmforge.data.tokenizer import Tokenizer
    from lmforge.models import Model, ModelConfig, save_pretrained

    tok_dir = out / "tokenizer"
    tok_dir.mkdir(parents=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=1000, special_tokens=["<|endoftext|>"])
    bpe.save_model(str(tok_dir))
    (tok_dir / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    tok = Tokenizer.from_dir(tok_dir)
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="gpt2", vocab_size=tok.vocab_size, hidden_size=128, num_layers=4, num_heads=4,
                      intermediate_size=512, max_position_embeddings=512, type_vocab_size=0,
                      hidden_act="gelu_new", layer_norm_eps=1e-5, head="causal-lm", bos_token_id=None,
                      eos_token_id=None, pad_token_id=tok.eos_token_id, hidden_dropout=0.0, attention_dropout=0.0)
    save_pretrained(Model(cfg).eval(), out / "model", tokenizer=tok)
    return out / "model"


def decoder_server(port: int, model_dir: str, threads: int) -> int:
    """Serve the decoder with two LoRA adapters that bring classification heads (random weights)."""
    import torch
    import uvicorn

    from lmforge.adapters.lora import LoraConfig
    from lmforge.adapters.manager import add_adapter, lora_layers
    from lmforge.models.heads import build_head
    from lmforge.serve.app import ServeSettings, create_app
    from lmforge.serve.engine import Engine

    torch.set_num_threads(threads)
    engine = Engine(model_dir)
    with engine.changing_adapters(), torch.no_grad():
        for seed, (name, labels) in enumerate(DECODER_LABELS.items()):
            head_config = {"head": "classification", "id2label": dict(enumerate(labels))}
            head = build_head(engine.model.config.replace(**head_config))
            add_adapter(engine.model, name, LoraConfig(r=8, alpha=16), head=head, head_config=head_config)
            g = torch.Generator().manual_seed(seed)
            for layer in lora_layers(engine.model).values():
                if name in layer.lora_B:
                    w = layer.lora_B[name].weight
                    w.copy_(torch.randn(w.shape, generator=g) * 0.1)
    app = create_app(ServeSettings(model=model_dir), engine)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    return 0


# -- RSS ------------------------------------------------------------------------------------------
def rss_mb(pid: int) -> float | None:
    try:
        import psutil
        return psutil.Process(pid).memory_info().rss / 2**20
    except ImportError:
        pass
    except Exception:   # the process is gone
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def thread_niceness(pid: int) -> dict[str, list[int]]:
    """{thread name: [niceness of each thread of that name]} of a process (Linux; {} elsewhere): the
    generation lane is meant to run at a lower priority than the batches."""
    out: dict[str, list[int]] = {}
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            stat = (task / "stat").read_text()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            out.setdefault(name, []).append(int(stat[stat.rindex(")") + 2:].split()[16]))
    except (OSError, ValueError):
        pass
    return out


class RssSampler(threading.Thread):
    def __init__(self, pids: dict[str, int], every: float):
        super().__init__(daemon=True)
        self.pids, self.every, self.t0 = pids, every, time.monotonic()
        self.samples: dict[str, list[tuple[float, float]]] = {name: [] for name in pids}
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            t = time.monotonic() - self.t0
            for name, pid in self.pids.items():
                mb = rss_mb(pid)
                if mb:   # None or 0: the process is gone (a zombie has no resident memory)
                    self.samples[name].append((round(t, 2), round(mb, 1)))
            self.done.wait(self.every)


def level(samples: list[tuple[float, float]], at: float, window: float) -> float:
    """Mean RSS over the samples in [at - window, at] (one sample is noisy: a batch's activations)."""
    xs = [mb for t, mb in samples if at - window <= t <= at]
    return statistics.fmean(xs) if xs else float("nan")


def plot(samples: dict, warmup_end: float, soak_end: float, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    for name, pts in samples.items():
        ax.plot([t / 60 for t, _ in pts], [mb for _, mb in pts], label=name)
    for x, what in ((warmup_end, "warm-up end"), (soak_end, "soak end")):
        ax.axvline(x / 60, color="grey", linestyle=":", linewidth=1)
        ax.text(x / 60, ax.get_ylim()[0], what, fontsize=7, rotation=90, va="bottom")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MiB)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# -- load -----------------------------------------------------------------------------------------
class Tally:
    def __init__(self):
        self.codes: Counter = Counter()        # (server, endpoint, status) -> n
        self.faults: Counter = Counter()       # (server, kind) -> n: slow / disconnect clients, transport errors
        self.unexpected: list[str] = []

    def count(self, server: str, endpoint: str, status: int, body: str = "") -> None:
        self.codes[(server, endpoint, status)] += 1
        if status not in ALLOWED[endpoint] and len(self.unexpected) < 20:
            self.unexpected.append(f"{server} {endpoint} {status}: {body[:300]}")


async def post(http, tally: Tally, server: str, url: str, endpoint: str, body: dict, path: str | None = None):
    import httpx
    try:
        r = await http.post(url + (path or endpoint), json=body)
    except httpx.HTTPError as e:
        tally.faults[(server, f"transport error: {type(e).__name__}")] += 1
        return None
    tally.count(server, endpoint, r.status_code, r.text)
    return r


async def trickle(payload: bytes, chunks: int, seconds: float):
    step = max(1, len(payload) // chunks)
    for i in range(0, len(payload), step):
        yield payload[i:i + step]
        await asyncio.sleep(seconds / chunks)


async def raw_disconnect(port: int, payload: bytes, send_all: bool) -> None:
    """A client that goes away: after half of its body, or after all of it without reading the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    writer.write(head + (payload if send_all else payload[:len(payload) // 2]))
    await writer.drain()
    await asyncio.sleep(0.05 if send_all else 0.5)
    writer.transport.abort()     # RST, no goodbye


async def soak(enc: dict, dec: dict, texts: list[str], seconds: float, tally: Tally, seed: int = 0) -> dict:
    import httpx

    rnd = random.Random(seed)
    stop_at = time.monotonic() + seconds
    done = Counter()
    long_text = " ".join(texts[:40])      # far more than MAX_INPUT_TOKENS
    adapters = [f"a{k}" for k in range(STARTUP_ADAPTERS)]

    def alive() -> bool:
        return time.monotonic() < stop_at

    async def classify_encoder(http):
        while alive():
            n = rnd.randint(1, 8)
            inputs = [rnd.choice(texts) for _ in range(n)]
            if rnd.random() < 0.02:
                inputs[0] = long_text                       # the designed 413
            await post(http, tally, "encoder", enc["url"], "/v1/classify",
                       {"adapter": rnd.choice(adapters), "inputs": inputs})
            done["encoder classify"] += 1

    async def embed_encoder(http):
        while alive():
            body = {"inputs": [rnd.choice(texts) for _ in range(rnd.randint(1, 4))]}
            if rnd.random() < 0.5:
                body["adapter"] = rnd.choice(adapters)
            await post(http, tally, "encoder", enc["url"], "/v1/embed", body)
            done["encoder embed"] += 1

    async def hot_loads(http):
        k = 0
        while alive():
            name, path = f"hot{k}", f"h{k % HOT_ADAPTERS}"
            r = await post(http, tally, "encoder", enc["url"], "POST /v1/adapters", {"name": name, "path": path},
                           "/v1/adapters")
            if r is not None and r.status_code == 201:
                for _ in range(3):
                    await post(http, tally, "encoder", enc["url"], "/v1/classify",
                               {"adapter": name, "inputs": [rnd.choice(texts)]})
                try:
                    r = await http.delete(f"{enc['url']}/v1/adapters/{name}")
                    tally.count("encoder", "DELETE /v1/adapters", r.status_code, r.text)
                except httpx.HTTPError as e:
                    tally.faults[("encoder", f"transport error: {type(e).__name__}")] += 1
            done["encoder hot load+unload"] += 1
            k += 1
            await asyncio.sleep(0.5)

    async def slow_clients(http):
        while alive():
            payload = json.dumps({"adapter": rnd.choice(adapters), "inputs": rnd.sample(texts, 4)}).encode()
            try:
                r = await http.post(enc["url"] + "/v1/classify", content=trickle(payload, 10, 2.0),
                                    headers={"content-type": "application/json"})
                tally.count("encoder", "/v1/classify", r.status_code, r.text)
            except httpx.HTTPError as e:
                tally.faults[("encoder", f"transport error: {type(e).__name__}")] += 1
            tally.faults[("encoder", "slow client (body over 2 s)")] += 1
            await asyncio.sleep(1.0)

    async def disconnecting():
        k = 0
        while alive():
            payload = json.dumps({"adapter": rnd.choice(adapters), "inputs": rnd.sample(texts, 16)}).encode()
            send_all = k % 2 == 0
            try:
                await raw_disconnect(enc["port"], payload, send_all)
            except OSError as e:
                tally.faults[("encoder", f"transport error: {type(e).__name__}")] += 1
            tally.faults[("encoder", "disconnect after the whole body" if send_all
                          else "disconnect in the middle of the body")] += 1
            k += 1
            await asyncio.sleep(1.0)

    async def generate_decoder(http):
        while alive():
            body = {"prompt": rnd.choice(texts)[:200], "max_new_tokens": rnd.randint(16, 96)}
            if rnd.random() < 0.5:
                body.update(do_sample=True, temperature=0.8, top_p=0.9, seed=rnd.randint(0, 1000))
            await post(http, tally, "decoder", dec["url"], "/v1/generate", body)
            done["decoder generate"] += 1

    async def classify_decoder(http):
        while alive():
            await post(http, tally, "decoder", dec["url"], "/v1/classify",
                       {"adapter": rnd.choice(list(DECODER_LABELS)), "inputs": rnd.sample(texts, rnd.randint(1, 4))})
            done["decoder classify"] += 1
            await asyncio.sleep(0.05)

    async def embed_decoder(http):
        while alive():
            await post(http, tally, "decoder", dec["url"], "/v1/embed", {"inputs": [rnd.choice(texts)]})
            done["decoder embed"] += 1
            await asyncio.sleep(0.5)

    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        await asyncio.gather(*(classify_encoder(http) for _ in range(4)), embed_encoder(http), hot_loads(http),
                             slow_clients(http), disconnecting(), generate_decoder(http), classify_decoder(http),
                             embed_decoder(http))
    return dict(done)


async def latency_ratio(dec: dict, texts: list[str], rounds: int, per_round: int) -> dict:
    """Median classification latency on the decoder server alone vs while a 400-token generation runs
    on it; the two conditions alternate, so a neighbour process waking up costs both alike."""
    import httpx

    alone: list[float] = []
    beside: list[float] = []
    url = dec["url"]
    async with httpx.AsyncClient(timeout=120) as http:
        async def one() -> float:
            t = time.perf_counter()
            r = await http.post(url + "/v1/classify", json={"adapter": "pos", "inputs": [texts[0]]})
            r.raise_for_status()
            return time.perf_counter() - t

        for _ in range(3):
            await one()
        for _ in range(rounds):
            for _ in range(per_round):
                alone.append(await one())
            gen = asyncio.create_task(http.post(url + "/v1/generate", json={"prompt": "the film", "max_new_tokens": 400}))
            await asyncio.sleep(0.3)      # the generation is decoding by now
            for _ in range(per_round):
                x = await one()
                if gen.done():
                    break
                beside.append(x)
            (await gen).raise_for_status()
    a, b = statistics.median(alone), statistics.median(beside) if beside else float("nan")
    return {"alone_ms": a * 1000, "during_generation_ms": b * 1000, "ratio": b / a, "n_alone": len(alone),
            "n_during_generation": len(beside), "rounds": rounds}


async def sigterm_in_flight(enc: dict, dec: dict, texts: list[str]) -> dict:
    """Put requests in flight on both servers, SIGTERM both, and collect every answer."""
    import httpx

    async with httpx.AsyncClient(timeout=180, limits=httpx.Limits(max_connections=64)) as http:
        async def call(url, path, body):
            try:
                r = await http.post(url + path, json=body)
                return r.status_code
            except httpx.HTTPError as e:
                return f"no answer ({type(e).__name__})"

        tasks = [asyncio.create_task(call(enc["url"], "/v1/classify",
                                          {"adapter": f"a{k % STARTUP_ADAPTERS}", "inputs": texts[k * 16:(k + 1) * 16]}))
                 for k in range(24)]
        tasks += [asyncio.create_task(call(enc["url"], "/v1/embed", {"inputs": texts[k * 8:(k + 1) * 8]}))
                  for k in range(4)]
        tasks += [asyncio.create_task(call(dec["url"], "/v1/generate", {"prompt": "once upon a time",
                                                                        "max_new_tokens": 200})) for _ in range(2)]
        tasks += [asyncio.create_task(call(dec["url"], "/v1/classify", {"adapter": "topic", "inputs": texts[:8]}))
                  for _ in range(8)]
        await asyncio.sleep(0.5)               # every request sent and queued or running
        t0 = time.monotonic()
        for proc in (enc["proc"], dec["proc"]):
            proc.send_signal(signal.SIGTERM)
        answers = await asyncio.gather(*tasks)
    exits = {}
    for name, s in (("encoder", enc), ("decoder", dec)):
        try:
            code = s["proc"].wait(120)
        except Exception:
            s["proc"].kill()
            code = "killed after 120 s"
        exits[name] = {"exit_code": code, "seconds_after_sigterm": round(time.monotonic() - t0, 2)}
    # uvicorn answers what is open, runs the app's shutdown (the batcher drains), then re-raises the
    # signal it caught: a clean SIGTERM exit is status -15 (0 if the signal were not re-raised)
    clean = all(e["exit_code"] in (0, -signal.SIGTERM) for e in exits.values())
    return {"in_flight": len(answers), "answers": dict(Counter(map(str, answers))), "exits": exits,
            "all_answered_200": all(a == 200 for a in answers), "clean_exits": clean}


def log_problems(path: Path) -> list[str]:
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return [ln for ln in lines if "Traceback" in ln or "ERROR" in ln or "error" in ln.lower()][:20]


# -- report ---------------------------------------------------------------------------------------
def render(res: dict) -> str:
    rss, codes = res["rss"], res["status_codes"]
    rows = ["| server | RSS at warm-up end (MiB) | RSS at the end (MiB) | change | peak (MiB) |",
            "|---|---:|---:|---:|---:|"]
    for name, r in rss.items():
        rows.append(f"| {name} | {r['warmup_end_mb']:.0f} | {r['end_mb']:.0f} | {r['change'] * 100:+.1f}% "
                    f"| {r['peak_mb']:.0f} |")
    ok_rss = all(abs(r["change"]) <= 0.10 for r in rss.values())
    code_rows = ["| server | endpoint | status | answers |", "|---|---|---:|---:|"]
    code_rows += [f"| {s} | {e} | {c} | {n:,} |" for (s, e, c), n in sorted(res["_codes"].items())]
    fault_rows = ", ".join(f"{k[1]} ({k[0]}): {n:,}" for k, n in sorted(res["_faults"].items())) or "none"
    lat, term = res["latency"], res["sigterm"]
    return ("\n".join(rows) + "\n\n"
            f"RSS within 10% of the warm-up level at the end: **{'yes' if ok_rss else 'NO'}** "
            f"(each level is the mean of the samples over the {res['level_window_s']:g} s before that point; "
            f"warm-up: the first {res['warmup_s']:g} s of {res['soak_s']:g} s of load; curve: "
            f"`{res['rss_png']}`, samples every {res['sample_s']:g} s in `{res['json']}`).\n\n"
            + "\n".join(code_rows) + "\n\n"
            f"Statuses outside the designed ones (200, 201/204 for adapter loads and unloads, 413 over-long "
            f"input, 429 queue full): **{codes['unexpected']}**. Fault clients: {fault_rows}. Server log lines "
            f"with an error: encoder {len(res['log_problems']['encoder'])}, decoder "
            f"{len(res['log_problems']['decoder'])}.\n\n"
            f"Classification on the decoder server (one sentence, adapter `pos`), median of {lat['n_alone']} alone "
            f"{lat['alone_ms']:.1f} ms vs median of {lat['n_during_generation']} while a 400-token generation runs "
            f"{lat['during_generation_ms']:.1f} ms: **{lat['ratio']:.2f}x** (target: at most 2x; "
            f"{lat['rounds']} alternating rounds, the soak load off; the decoder server's threads by niceness: "
            + ", ".join(f"{n} at {nice}" for nice, n in sorted(Counter(
                x for v in res["thread_niceness"]["decoder"].values() for x in v).items()))
            + f", the benchmark process at {res['thread_niceness']['benchmark process']}).\n\n"
            f"SIGTERM with {term['in_flight']} requests in flight on the two servers: answers "
            + ", ".join(f"{k}: {v}" for k, v in term["answers"].items())
            + f"; every one answered 200: **{'yes' if term['all_answered_200'] else 'NO'}**; exit statuses "
            + ", ".join(f"{n} {e['exit_code']} after {e['seconds_after_sigterm']} s" for n, e in term["exits"].items())
            + f" (clean: **{'yes' if term['clean_exits'] else 'NO'}**; -15 is uvicorn re-raising the SIGTERM "
            "it caught once the requests are answered and the batcher has drained).\n\n"
            f"Load (closed loop, asyncio + httpx in the benchmark process, sharing the cores with both servers): "
            + ", ".join(f"{k} {v:,}" for k, v in res["requests"].items())
            + ". Encoder: `lmforge serve --model minilm --adapter-root ROOT --max-input-tokens "
            f"{MAX_INPUT_TOKENS} --threads {res['threads']}` with {STARTUP_ADAPTERS} LoRA adapters at start; "
            f"{HOT_ADAPTERS} more below ROOT loaded, used 3 times and unloaded in turn. Decoder: a random "
            "4-layer GPT-2 (width 128) with two LoRA adapters bringing classification heads, served by "
            "`create_app` + uvicorn from this script (the CLI loads PEFT-format adapters onto encoders only).\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="minutes of load (default 10; 1 for a smoke)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each server (default 1)")
    p.add_argument("--sample-seconds", type=float, default=3.0, help="RSS sampling period (default 3)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench",
                   help="where soak.json, soak-rss.png and the server logs go (default runs/bench)")
    p.add_argument("--report", type=Path, default=report.BENCHMARKS,
                   help="the Markdown file the section goes to (default BENCHMARKS.md; a scratch path for smokes)")
    p.add_argument("--decoder-server", nargs=2, metavar=("PORT", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.decoder_server:
        return decoder_server(int(args.decoder_server[0]), args.decoder_server[1], args.threads)

    soak_s = args.minutes * 60
    warmup_s = min(60.0, 0.2 * soak_s)
    window = max(3 * args.sample_seconds, min(30.0, 0.1 * soak_s))
    texts = sentences()
    args.out.mkdir(parents=True, exist_ok=True)
    res: dict = {"soak_s": soak_s, "warmup_s": warmup_s, "sample_s": args.sample_seconds, "threads": args.threads,
                 "level_window_s": window}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("building adapters and the decoder ...", flush=True)
        make_adapters(tmp / "adapters", STARTUP_ADAPTERS, "a")
        root = tmp / "root"
        make_adapters(root, HOT_ADAPTERS, "h")
        decoder_dir = build_decoder(tmp / "decoder", texts[:2000])
        enc_port, dec_port = free_port(), free_port()
        enc_cmd = [sys.executable, "-m", "lmforge", "serve", "--model", "minilm", "--port", str(enc_port),
                   "--adapter-root", str(root), "--max-input-tokens", str(MAX_INPUT_TOKENS), "--log-level",
                   "warning", "--threads", str(args.threads),
                   *[a for k in range(STARTUP_ADAPTERS) for a in ("--adapter", f"a{k}={tmp / 'adapters' / f'a{k}'}")]]
        dec_cmd = [sys.executable, "-m", "benchmarks.soak", "--threads", str(args.threads), "--decoder-server",
                   str(dec_port), str(decoder_dir)]
        logs = {"encoder": args.out / "soak-encoder.log", "decoder": args.out / "soak-decoder.log"}
        enc = {"port": enc_port, "url": f"http://127.0.0.1:{enc_port}", "proc": start(enc_cmd, enc_port, logs["encoder"])}
        try:
            dec = {"port": dec_port, "url": f"http://127.0.0.1:{dec_port}",
                   "proc": start(dec_cmd, dec_port, logs["decoder"])}
        except BaseException:
            enc["proc"].kill()
            raise
        sampler = RssSampler({"encoder": enc["proc"].pid, "decoder": dec["proc"].pid}, args.sample_seconds)
        sampler.start()
        tally = Tally()
        try:
            print(f"soak: {soak_s:g} s of mixed load ...", flush=True)
            load_t0 = time.monotonic() - sampler.t0
            res["requests"] = asyncio.run(soak(enc, dec, texts, soak_s, tally))
            soak_end = time.monotonic() - sampler.t0
            res["thread_niceness"] = {"benchmark process": os.nice(0), **{
                name: thread_niceness(s["proc"].pid) for name, s in (("encoder", enc), ("decoder", dec))}}
            print("latency: classification alone vs beside a generation ...", flush=True)
            rounds = 6 if args.minutes >= 5 else 2
            res["latency"] = asyncio.run(latency_ratio(dec, texts, rounds, 20))
            print("SIGTERM with requests in flight ...", flush=True)
            res["sigterm"] = asyncio.run(sigterm_in_flight(enc, dec, texts))
        finally:
            for s in (enc, dec):
                if s["proc"].poll() is None:
                    s["proc"].kill()
                    s["proc"].wait(30)
            sampler.done.set()
            sampler.join()
    warmup_end = load_t0 + warmup_s
    res["rss"] = {}
    for name, pts in sampler.samples.items():
        w, e = level(pts, warmup_end, window), level(pts, soak_end, window)
        res["rss"][name] = {"warmup_end_mb": w, "end_mb": e, "change": e / w - 1,
                            "peak_mb": max(mb for t, mb in pts if t <= soak_end) if pts else float("nan")}
    res["_codes"], res["_faults"] = tally.codes, tally.faults
    res["status_codes"] = {"by_endpoint": {f"{s} {e} {c}": n for (s, e, c), n in sorted(tally.codes.items())},
                           "unexpected": sum(n for (s, e, c), n in tally.codes.items() if c not in ALLOWED[e]),
                           "unexpected_examples": tally.unexpected}
    res["faults"] = {f"{s}: {k}": n for (s, k), n in sorted(tally.faults.items())}
    res["log_problems"] = {name: log_problems(path) for name, path in logs.items()}
    res["rss_samples"] = sampler.samples
    res["load_start_s"], res["warmup_end_s"], res["soak_end_s"] = load_t0, warmup_end, soak_end
    png = args.out / "soak-rss.png"
    res["rss_png"] = str(png.relative_to(ROOT) if png.is_relative_to(ROOT) else png)
    plot(sampler.samples, warmup_end, soak_end, png)
    js = args.out / "soak.json"
    res["json"] = str(js.relative_to(ROOT) if js.is_relative_to(ROOT) else js)
    js.write_text(json.dumps({k: v for k, v in res.items() if not k.startswith("_")}, indent=2) + "\n")
    body = render(res)
    command = "python -m benchmarks.soak" + (f" --minutes {args.minutes:g}" if args.minutes != 10 else "")
    report.BENCHMARKS = args.report       # write_section writes to this module-level path
    write_section("Soak" + (" (smoke)" if args.minutes < 10 else ""), command, body)
    print(body)
    ok = (all(abs(r["change"]) <= 0.10 for r in res["rss"].values()) and not res["status_codes"]["unexpected"]
          and res["sigterm"]["all_answered_200"] and res["sigterm"]["clean_exits"] and res["latency"]["ratio"] <= 2.0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
