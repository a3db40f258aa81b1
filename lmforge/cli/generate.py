"""Generate text with a causal LM: one prompt streamed to the terminal, or a file of prompts.

  lmforge generate --model smollm2-135m --prompt "What is a transformer?"
  lmforge generate --model runs/gpt/model --prompt "Once upon" --temperature 0.8 --top-p 0.95 --seed 1
  lmforge generate --model runs/e2e/best --input mrs.txt --beams 10 --no-repeat-ngram 4 --no-repeat-ngram-scope output

Decoding: greedy by default; sampling when --temperature, --top-k or --top-p is given (seeded by
--seed); beam search with --beams N > 1 (the LoRA paper's NLG setting: --beams 10 --length-penalty
0.8 --no-repeat-ngram 4 --no-repeat-ngram-scope output). --no-repeat-ngram blocks repeats of the
n-grams of the prompt and the output together (--no-repeat-ngram-scope all, the default, as
transformers does) or of the output alone (output, as the LoRA paper's decoding code does).
Generation ends at the model's end token, at any --stop string (cut from the output) or after
--max-new-tokens. A model whose tokenizer has a chat template (SmolLM2) gets each prompt as a user
message, unless --no-chat-template. --input: one prompt per line, one JSON line out per prompt
({"prompt", "text", "finish_reason"}), in batches of --batch-size (decoded together without
padding; a prompt that has ended leaves its batch).
"""

from __future__ import annotations

import json
import sys

from lmforge.cli.runtime import add_runtime_args, resolve_runtime
from lmforge.cli.validate import non_negative_int, positive_int, ranged
from lmforge.errors import ConfigError, DataError
from lmforge.models.beam_search import NGRAM_SCOPES
from lmforge.utils import checks
from lmforge.utils.stops import cut_at_stop


def add_parser(p) -> None:
    p.add_argument("--model", required=True, help="causal LM: a model directory, alias (smollm2-135m) or .gguf file")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter directory (PEFT format) to generate with")
    p.add_argument("--prompt", help="one prompt; its tokens are streamed as they are decoded")
    p.add_argument("--input", help="a file with one prompt per line ('-' for stdin)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--beams", type=positive_int, default=1, help="beam search with this many beams (default 1: none)")
    p.add_argument("--length-penalty", type=ranged(float, checks.Range()), default=1.0,
                   help="beam search: a hypothesis scores log p / length ** this (default 1.0)")
    p.add_argument("--no-repeat-ngram", type=non_negative_int, default=0,
                   help="never repeat an n-gram of this size (0: off)")
    p.add_argument("--no-repeat-ngram-scope", choices=NGRAM_SCOPES, default="all",
                   help="the n-grams --no-repeat-ngram blocks: the prompt's and the output's (all, as transformers "
                        "does) or the output's alone (output, as the LoRA paper's gpt2_beam.py does)")
    p.add_argument("--temperature", type=ranged(float, checks.POSITIVE), help="sample at this temperature")
    p.add_argument("--top-k", type=positive_int, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=ranged(float, checks.UNIT_INTERVAL), help="sample from the nucleus of mass p")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of sampling (default 0)")
    p.add_argument("--stop", nargs="+", default=(), metavar="TEXT", help="end the output at any of these strings")
    p.add_argument("--no-chat-template", action="store_true", help="feed prompts as they are")
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts decoded together with --input")
    add_runtime_args(p)


def _prompts(args) -> list[str]:
    from lmforge.data.tables import decode_text, read_text_file

    if (args.prompt is None) == (args.input is None):
        raise DataError("give one of --prompt TEXT or --input FILE")
    if args.prompt is not None:
        if not args.prompt.strip():
            raise DataError("--prompt is empty")
        return [args.prompt]
    text = decode_text(sys.stdin.buffer.read(), "<stdin>") if args.input == "-" else read_text_file(args.input)
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"{args.input if args.input != '-' else '<stdin>'}: no prompts (expected one per line)")
    return prompts


class Session:
    """A loaded model, its tokenizer and the decoding settings of one command."""

    def __init__(self, args):
        import torch

        from lmforge.data.tokenizer import load_tokenizer
        from lmforge.models import from_pretrained
        from lmforge.models.checkpoint import load_config

        if args.beams > 1 and self._sampling(args):
            raise ConfigError("--beams does not sample: drop --temperature/--top-k/--top-p, or use --beams 1")
        saved = load_config(args.model, "auto")
        if not saved.causal:
            raise ConfigError(f"{args.model}: a {saved.model_type} model is not a decoder (generate needs a "
                              "causal LM: gpt2 or llama)")
        self.args = args
        self.device, self.precision = resolve_runtime(args)
        self.model = from_pretrained(args.model, head="causal-lm", device=self.device).eval()
        self.tokenizer = load_tokenizer(args.model)
        self.adapter = None
        if args.adapter:
            from lmforge.adapters.peft_format import load_adapter
            load_adapter(self.model, args.adapter, "adapter")
            self.adapter = "adapter"
        self.ends = self.tokenizer.end_ids(self.model.config.eos_token_id, chat=not args.no_chat_template)
        self.generator = torch.Generator(device=self.device).manual_seed(args.seed)

    @staticmethod
    def _sampling(args) -> bool:
        return args.temperature is not None or args.top_k is not None or args.top_p is not None

    def encode(self, prompt: str) -> list[int]:
        tok, args = self.tokenizer, self.args
        if tok.chat_template and not args.no_chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}])
            ids = tok([text], padding="none", add_special_tokens=False)["input_ids"][0]
        else:
            ids = tok([prompt], padding="none")["input_ids"][0]
        limit = self.model.config.max_position_embeddings
        if not ids:
            raise DataError(f"prompt {prompt[:40]!r}: no tokens")
        if len(ids) + args.max_new_tokens > limit:
            raise DataError(f"prompt of {len(ids)} tokens + --max-new-tokens {args.max_new_tokens} exceed the "
                            f"model's {limit} positions")
        return ids

    def _kwargs(self) -> dict:
        a = self.args
        return dict(max_new_tokens=a.max_new_tokens, no_repeat_ngram_size=a.no_repeat_ngram,
                    no_repeat_ngram_scope=a.no_repeat_ngram_scope, eos_token_id=self.ends, do_sample=self._sampling(a), temperature=a.temperature or 1.0,
                    top_k=a.top_k or 0, top_p=1.0 if a.top_p is None else a.top_p, generator=self.generator)

    def stream(self, prompt: str, out) -> dict:
        """Decode one prompt, writing the text to `out` as it grows (held back while it could be
        the start of a stop string)."""
        import torch

        from lmforge.models import routing
        from lmforge.models.generate import decode_steps

        ids = torch.tensor([self.encode(prompt)], device=self.device)
        new: list[int] = []
        shown, finish = "", "length"
        hold = max((len(s) for s in self.args.stop), default=0)
        with torch.inference_mode(), self.precision.autocast(self.device), routing.using(self.adapter):
            for token, finished in decode_steps(self.model, ids, **self._kwargs()):
                if bool(finished[0]):
                    finish = "eos"
                    break
                new.append(int(token[0]))
                text = self.tokenizer.decode(new)
                text, stopped = cut_at_stop(text, self.args.stop)
                safe = text if stopped else text[:max(len(shown), len(text) - hold)]
                if text.endswith("\ufffd") and not stopped:   # half of a multi-byte character
                    safe = safe[:len(shown)]
                out.write(safe[len(shown):])
                out.flush()
                shown = safe
                if stopped:
                    finish = "stop"
                    break
        text = cut_at_stop(self.tokenizer.decode(new), self.args.stop)[0]
        out.write(text[len(shown):] + "\n")
        out.flush()
        return {"text": text, "finish_reason": finish}

    def batch(self, prompts: list[str]) -> list[dict]:
        import torch

        from lmforge.models import generate, routing

        encoded = [self.encode(p) for p in prompts]   # of any lengths: decoded packed, without padding
        kw = self._kwargs()
        with torch.inference_mode(), self.precision.autocast(self.device), routing.using(self.adapter):
            if self.args.beams > 1:
                for k in ("do_sample", "temperature", "top_k", "top_p", "generator"):
                    kw.pop(k)
                out = generate(self.model, encoded, num_beams=self.args.beams,
                               length_penalty=self.args.length_penalty, **kw)
            else:
                out = generate(self.model, encoded, **kw)
        results = []
        for prompt, row in zip(prompts, (o[len(e):] for o, e in zip(out, encoded))):
            end = next((i for i, t in enumerate(row) if t in self.ends), None)
            text, stopped = cut_at_stop(self.tokenizer.decode(row if end is None else row[:end]), self.args.stop)
            results.append({"prompt": prompt, "text": text,
                            "finish_reason": "stop" if stopped else "eos" if end is not None else "length"})
        return results


def run(args) -> int:
    prompts = _prompts(args)
    session = Session(args)
    if args.prompt is not None and args.beams == 1:
        session.stream(prompts[0], sys.stdout)
        return 0
    for i in range(0, len(prompts), args.batch_size):
        for r in session.batch(prompts[i:i + args.batch_size]):
            print(json.dumps(r, ensure_ascii=False) if args.input is not None else r["text"], flush=True)
    return 0
