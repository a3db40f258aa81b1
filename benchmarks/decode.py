"""Decoding speed against transformers' generate, side by side in one run (issue #16).

  python -m benchmarks.decode                       # 128 new tokens (64 with beams), 3 rounds
  python -m benchmarks.decode --quick               # 16 new tokens, 1 round (a smoke run)
  python -m benchmarks.decode --quick --new-tokens 4 --no-write --threads 1   # prints, writes nothing

The same model on both sides: SmolLM2-135M-Instruct (`lmforge.models.from_pretrained("smollm2-135m")`,
its 4-bit GGUF dequantized to float32) saved once as a LlamaForCausalLM directory
(runs/bench/decode/smollm2-135m), which lmforge and transformers' AutoModelForCausalLM both load. The
same prompts: fixed questions in SmolLM2's chat template, tokenized once by lmforge's tokenizer; both
sides get the same token ids and stop at the same end tokens (<|im_end|> and the model's end token).

Cases (greedy unless beams are named), each in two precisions:
  batch 1         one prompt alone, one whose answer runs long (a poem: a decoding speed, not a prefill's;
                  the first prompt, answered in 8 tokens, had made this case mostly prefill)
  batch 16 mixed  16 prompts of different lengths: transformers left-pads them (its documented way)
                  and computes every row until the last one ends; lmforge decodes them packed, each
                  row at its own length, and a row that ends leaves the batch
  beam 10         4 prompts of different lengths, beam 10, length penalty 0.8, no-repeat n-gram 4
                  (the LoRA paper's NLG decoding)

Precisions: fp32 on both sides; and bf16 on both sides: lmforge as `--precision bf16` (and `auto` on a
CPU with AMX or AVX512_BF16) runs it, under torch.autocast with its bf16 weight copies and a bf16 KV
cache; transformers as its documentation runs bf16, the model loaded with dtype=torch.bfloat16. The
two precisions may pick different tokens; within one precision both sides are compared token for token.

Every measurement runs in a fresh subprocess (model load, one short warm-up generation, then the
timed one), lmforge and transformers alternating, their order swapped every round; a case's figure is
the median over rounds of new tokens per second (each row's tokens up to and including its end
token, counted from the side's own output, over the timed generation's wall time). The report also
says whether both sides produced the same tokens. Both sides use --threads torch threads (default:
every core). Targets, in each precision: batch 16 at least 2x transformers' tokens/s, batch 1 no slower (1x).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.report import ROOT, cached_kernels, write_section

WORK = ROOT / "runs" / "bench" / "decode"
MODEL = "smollm2-135m"
QUESTIONS = [
    "What is the capital of France?",
    "Hi!",
    "Write a short poem about the sea.",
    "Explain, in a few sentences, why the sky looks blue during the day and red at sunset.",
    "List three fruits.",
    "What does a compiler do, and how is it different from an interpreter? Give an example of each.",
    "Translate 'good morning' into Spanish.",
    "Summarize the plot of Romeo and Juliet.",
    "How many legs does a spider have?",
    "I have a meeting tomorrow at nine, then lunch with a friend, and in the afternoon I need to finish a "
    "report about sales in the last quarter. Can you help me plan the day so that I also have time to exercise?",
    "Name a famous painter.",
    "Why do cats purr?",
    "Give me a recipe for pancakes with the ingredients and the steps.",
    "What is 12 times 12?",
    "Describe the water cycle for a ten-year-old, mentioning evaporation, condensation and precipitation.",
    "Who wrote Hamlet?",
]
# case -> (prompts: indices into QUESTIONS, beams)
CASES = {
    "batch 1, greedy": ([2], 1),
    "batch 16, mixed lengths, greedy": (list(range(16)), 1),
    "beam 10, 4 prompts of mixed lengths": ([2, 5, 9, 14], 10),
}
TARGETS = {"batch 1, greedy": 1.0, "batch 16, mixed lengths, greedy": 2.0}
BEAM_SETTINGS = {"length_penalty": 0.8, "no_repeat_ngram_size": 4}
PRECISIONS = ("fp32", "bf16")


# -- workers: each runs in its own process ----------------------------------------------------------
def worker_export() -> dict:
    """Save smollm2-135m as a LlamaForCausalLM directory and the benchmark's prompt ids beside it."""
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.models import from_pretrained, save_pretrained

    model = from_pretrained(MODEL).eval()
    tok = load_tokenizer(MODEL)
    save_pretrained(model, WORK / MODEL)
    prompts = []
    for q in QUESTIONS:
        text = tok.apply_chat_template([{"role": "user", "content": q}])
        prompts.append(tok([text], padding="none", add_special_tokens=False)["input_ids"][0])
    ends = tok.end_ids(model.config.eos_token_id, chat=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else ends[0]
    spec = {"prompts": prompts, "ends": ends, "pad": pad}
    (WORK / "prompts.json").write_text(json.dumps(spec))
    return {"lengths": [len(p) for p in prompts], "ends": ends}


def answer(row: list[int], ends: list[int]) -> list[int]:
    """New tokens up to and including the first end token."""
    end = next((i for i, t in enumerate(row) if t in ends), None)
    return row if end is None else row[:end + 1]


def worker_decode(side: str, case: str, new: int, threads: int, precision: str) -> dict:
    import contextlib

    import torch

    torch.set_num_threads(threads)
    spec = json.loads((WORK / "prompts.json").read_text())
    indices, beams = CASES[case]
    prompts, ends, pad = [spec["prompts"][i] for i in indices], spec["ends"], spec["pad"]
    kw = dict(num_beams=beams, **(BEAM_SETTINGS if beams > 1 else {}))
    if side == "lmforge":
        from lmforge.models import from_pretrained, generate

        model = from_pretrained(WORK / MODEL).eval()
        # what `lmforge generate --precision bf16` does: autocast (kernels/precision.py)
        bf16 = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

        def run(n: int) -> list[list[int]]:
            with torch.inference_mode(), bf16:   # a list of prompts: decoded packed, no padding
                out = generate(model, prompts, max_new_tokens=n, eos_token_id=ends, **kw)
            return [answer(o[len(p):], ends) for o, p in zip(out, prompts)]
    else:
        import transformers

        transformers.logging.set_verbosity_error()
        model = transformers.AutoModelForCausalLM.from_pretrained(
            WORK / MODEL, dtype=torch.bfloat16 if precision == "bf16" else torch.float32).eval()
        T = max(map(len, prompts))
        ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])         # left-padded
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
        extra = {"early_stopping": False} if beams > 1 else {}

        def run(n: int) -> list[list[int]]:
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=ends,
                                     pad_token_id=pad, **kw, **extra)
            return [answer(row[T:], ends) for row in out.tolist()]
    run(min(new, 4))   # warm-up: first-call allocations, weight layouts, kernel choices
    start = time.perf_counter()
    outputs = run(new)
    seconds = time.perf_counter() - start
    tokens = sum(map(len, outputs))
    return {"side": side, "case": case, "precision": precision, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "outputs": outputs, "threads": threads}


def run_worker(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.decode", "--worker", json.dumps(args)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- the report ---------------------------------------------------------------------------------------
def render(results: dict, lengths: list[int], new_tokens: dict, rounds: int, threads: int,
           precisions: list[str]) -> str:
    rows = ["| precision | case | prompt tokens | max new tokens | lmforge tokens/s | transformers tokens/s | ratio "
            "| target | |", "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for precision in precisions:
        for case, (indices, _) in CASES.items():
            res = results[f"{precision}|{case}"]
            a = statistics.median(r["tokens_per_s"] for r in res["lmforge"])
            b = statistics.median(r["tokens_per_s"] for r in res["transformers"])
            ratio = a / b
            target = TARGETS.get(case)
            verdict = "" if target is None else ("met" if ratio >= target else "missed")
            plens = [lengths[i] for i in indices]
            shown = str(plens[0]) if len(plens) == 1 else f"{min(plens)}-{max(plens)}"
            rows.append(f"| {precision} | {case} | {shown} | {new_tokens[case]} | {a:.1f} | {b:.1f} | {ratio:.2f}x | "
                        f"{'reported' if target is None else f'>= {target:g}x'} | {verdict} |")
            o, t = res["lmforge"][0]["outputs"], res["transformers"][0]["outputs"]
            same = sum(x == y for x, y in zip(o, t))
            notes.append(f"{precision}, {case}: {same} of {len(o)} rows the same tokens as transformers; "
                         f"{res['lmforge'][0]['tokens']} new tokens (lmforge), "
                         f"{res['transformers'][0]['tokens']} (transformers)")
    body = "\n".join(rows) + "\n\n"
    body += (f"Median of {rounds} round(s), each side in a fresh process per measurement, sides alternating; "
             f"{threads} torch thread(s) on both sides. "
             + ("fp32: both sides in fp32. " if "fp32" in precisions else "")
             + ("bf16: lmforge under bf16 autocast (its `--precision bf16`, and `auto` on a CPU with AMX or "
                "AVX512_BF16), transformers loaded with dtype=torch.bfloat16. " if "bf16" in precisions else "")
             + "Tokens per second count each row's new tokens up to and including its end token.\n\n")
    body += "\n".join(f"- {n}" for n in notes) + "\n"
    return body


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="16 new tokens, 1 round (a smoke run)")
    p.add_argument("--new-tokens", type=int, help="max new tokens (default 128, beams 64; --quick 16)")
    p.add_argument("--rounds", type=int, help="measurements per side and case (default 3; --quick 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads on both sides (default: every core)")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated, of fp32 and bf16 (default both)")
    p.add_argument("--no-write", action="store_true", help="print the table; leave BENCHMARKS.md alone")
    p.add_argument("--section", help="name the BENCHMARKS.md section 'Decoding against transformers generate: "
                   "SECTION' (another machine's figures beside the main ones, e.g. --section 'AMD EPYC, AVX2')")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        kind, *rest = json.loads(args.worker)
        out = worker_export() if kind == "export" else worker_decode(rest[0], rest[1], int(rest[2]), int(rest[3]), rest[4])
        print(json.dumps(out))
        return 0
    for name in ("new_tokens", "rounds", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    rounds = args.rounds or (1 if args.quick else 3)
    precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
    if not precisions or any(x not in PRECISIONS for x in precisions):
        p.error(f"--precisions: expected a comma-separated list of {', '.join(PRECISIONS)}, got {args.precisions!r}")
    WORK.mkdir(parents=True, exist_ok=True)
    print(f"exporting {MODEL} to {WORK / MODEL} ...", flush=True)
    info = run_worker(["export"])
    new_tokens = {case: args.new_tokens or (16 if args.quick else 64 if beams > 1 else 128)
                  for case, (_, beams) in CASES.items()}
    results = {f"{pr}|{case}": {"lmforge": [], "transformers": []} for pr in precisions for case in CASES}
    for r in range(rounds):
        for precision in precisions:
            for case in CASES:
                sides = ("lmforge", "transformers") if r % 2 == 0 else ("transformers", "lmforge")
                for side in sides:
                    out = run_worker(["decode", side, case, new_tokens[case], args.threads, precision])
                    results[f"{precision}|{case}"][side].append(out)
                    print(f"round {r + 1} {precision} {case} {side}: {out['tokens']} tokens in {out['seconds']:.2f} s "
                          f"= {out['tokens_per_s']:.1f} tokens/s", flush=True)
    body = render(results, info["lengths"], new_tokens, rounds, args.threads, precisions)
    print(body)
    (WORK / "results.json").write_text(json.dumps(results))
    if args.no_write:
        return 0
    cmd = "python -m benchmarks.decode " + shlex.join(argv if argv is not None else sys.argv[1:])
    name = "Decoding against transformers generate" + (f": {args.section}" if args.section else "")
    write_section(name + (" (quick)" if args.quick else ""), cmd.strip(), body,
                  precision=" and ".join(f"{x} on both sides" for x in precisions), kernels=cached_kernels())
    return 0


if __name__ == "__main__":
    sys.exit(main())
