"""The model side of the server: one base model with its tokenizer and LoRA adapters; encodes
requests (on the callers' threads) and runs forward passes (on the batcher's threads).

No lock is held around computation that another forward pass needs: which adapters a pass uses is
an argument of that pass (models/routing.py, per thread), and the tokenizer keeps no per-call state,
so a generation and classification batches run at the same time on different threads. Changing the
adapter table (hot load, unload, quantization) takes an exclusive turn of a read-write lock: it waits
until the passes in flight finish (so an adapter is never removed under a batch that uses it) and new
passes wait for it (writers first). Passes themselves only ever take the shared side."""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from lmforge.adapters.manager import adapters, classify_mixed, delete_adapter, mixed_batch
from lmforge.data.batches import Encoded, collate_packed, model_inputs
from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import ConfigError
from lmforge.kernels.precision import Precision
from lmforge.models import from_pretrained
from lmforge.models.checkpoint import load_config
from lmforge.models.generate import RowDecoder, RowSettings, generate
from lmforge.models.hub import resolve
from lmforge.models.packing import Packed
from lmforge.utils.stops import cut_at_stop

log = logging.getLogger(__name__)


class InputError(Exception):
    """A request the model cannot take; status is the HTTP code to answer with."""

    def __init__(self, status: int, message: str, field: str | None = None, **extra):
        super().__init__(message)
        self.status, self.field, self.extra = status, field, extra


@dataclass
class Seq:
    """One sequence to classify or embed, with the adapter it names (None: the base model)."""
    enc: Encoded
    adapter: str | None


@dataclass
class GenJob:
    input_ids: list[int]
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    no_repeat_ngram_scope: str = "all"   # "all": the prompt's and the output's n-grams; "output": the output's
    stop: tuple[str, ...] = ()
    # streaming: called (on the generation thread) with each chunk of text as it is decoded
    emit: Callable[[dict], None] | None = None
    cancelled: threading.Event | None = None   # set when the client has gone: decoding stops


class TextStream:
    """The text of a growing list of tokens, released in chunks. Text that could still be the start
    of a stop string, or half of a multi-byte character, is held back until later tokens decide it."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops = tokenizer, stops
        self.hold = max((len(s) for s in stops), default=0)
        self.shown = ""          # what has been released
        self.stopped = False     # a stop string has appeared: the text is complete

    def push(self, tokens: list[int]) -> str:
        """The chunk the tokens so far add to what was released (maybe empty)."""
        text, self.stopped = cut_at_stop(self.tokenizer.decode(tokens), self.stops)
        safe = text if self.stopped else text[:max(len(self.shown), len(text) - self.hold)]
        if safe.endswith("\ufffd") and not self.stopped:   # half of a multi-byte character
            safe = safe[:len(self.shown)]
        chunk, self.shown = safe[len(self.shown):], safe
        return chunk

    def rest(self, text: str) -> str:
        """What remains of the final text after the released chunks."""
        return text[len(self.shown):]


class ReadWriteLock:
    """Any number of readers (forward passes) or one writer (a change of the adapter table). A waiting
    writer goes next: readers that arrive after it wait, so writers are not starved by a busy queue."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def shared(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


FP32 = Precision("fp32", "asked for")


class Engine:
    """`precision`: the compute every forward pass runs in (bf16: autocast, with the weights fp32).
    Autocast is per thread, so each pass enters it on the thread that runs it (Engine.run)."""

    def __init__(self, model: str, max_input_tokens: int | None = None, device: str = "cpu",
                 precision: Precision = FP32):
        directory = resolve(model)
        saved = load_config(directory, "auto")
        self.name = str(model)
        self.directory = directory
        self.model_type = saved.model_type
        self.can_generate = saved.head == "causal-lm"
        # every other base gets a classification head, so that adapters can bring their own
        self.model = from_pretrained(directory, head="causal-lm" if self.can_generate else "classification",
                                     device=device).eval()
        self.base_classifier = saved.head == "classification"
        self.tokenizer = load_tokenizer(directory)
        from lmforge.infer.embed import _sentence_transformers_settings
        self.pooling, _ = _sentence_transformers_settings(directory)
        limit = self.model.config.max_position_embeddings
        self.max_input_tokens = min(max_input_tokens or limit, limit)
        self.lock = ReadWriteLock()            # forward passes (shared) vs adapter-table changes (exclusive)
        self.quantized = None
        self.precision = precision
        # generation ends at the model's end token, and at a chat turn's end where the tokenizer has one
        self.end_ids = self.tokenizer.end_ids(self.model.config.eos_token_id, chat=True) if self.can_generate else []
        self._info: dict = {}                  # head_info per adapter, cleared when adapters change

    # -- adapters ---------------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(adapters(self.model))

    def changing_adapters(self):
        """The exclusive side of the lock, for changes of the adapter table made from outside
        (load_adapter and unload_adapter take it themselves)."""
        return self._changing()

    @contextlib.contextmanager
    def _changing(self):
        with self.lock.exclusive():
            self._info.clear()
            try:
                yield
            finally:
                self.model.eval()  # new heads and LoRA dropout modules are created in training mode
                self._info.clear()

    def head_info(self, adapter: str | None) -> dict:
        """Labels and kind of the head that answers for `adapter` (None: the base model)."""
        cached = self._info.get(adapter)
        if cached is None:
            cached = self._info[adapter] = self._head_info(adapter)
        return cached

    def _head_info(self, adapter: str | None) -> dict:
        if adapter is None:
            base = self.model.config
            return {"labels": base.labels, "regression": base.is_regression, "classifier": self.base_classifier}
        cfg = self.model.config_for(adapter)
        return {"labels": cfg.labels, "regression": cfg.is_regression,
                "classifier": adapter in self.model.adapter_heads and cfg.head == "classification"}

    def load_adapter(self, name: str, directory: Path, confined=None) -> None:
        from lmforge.adapters.peft_format import load_adapter
        from lmforge.adapters.methods import method_of_dir
        method = method_of_dir(directory)
        if not method.servable:   # hot-loaded onto the served base, side by side with the others
            raise ConfigError(f"{directory}: a {method.names[0]} run cannot be served as an adapter (the server "
                              "hot-loads LoRA adapters, which run side by side in one batch)")
        with self._changing():
            load_adapter(self.model, directory, name, confined)

    def unload_adapter(self, name: str) -> None:
        # waits for the batches in flight (some may use it); batches queued after it answer 404
        with self._changing():
            delete_adapter(self.model, name)

    def prepare_quantized(self) -> None:
        """int8 dynamic quantization of the frozen base. Every target Linear is wrapped for LoRA
        first, so that adapters loaded later still find a layer to attach to."""
        from lmforge.adapters.lora import LoraConfig
        from lmforge.adapters.manager import LAYER_TARGETS, add_adapter
        from lmforge.infer.quantize import quantize_model
        with self._changing():
            if self.model_type != "gpt2":  # PEFT-format adapters exist for encoders only
                add_adapter(self.model, "__wrap__", LoraConfig(r=1, target_modules=LAYER_TARGETS), head=False)
                delete_adapter(self.model, "__wrap__")
            self.model = quantize_model(self.model, "int8")
        self.quantized = "int8"

    # -- encoding (request threads) ---------------------------------------------------------------
    def encode(self, inputs: list, truncate: bool, field: str = "inputs") -> list[Encoded]:
        """Token ids of texts and [text, pair] inputs; too long -> 413 unless truncating."""
        limit = self.max_input_tokens
        singles = [i for i, x in enumerate(inputs) if isinstance(x, str)]
        pairs = [i for i, x in enumerate(inputs) if not isinstance(x, str)]
        if pairs and self.model_type == "gpt2":
            raise InputError(422, f"{field}[{pairs[0]}]: sentence pairs need an encoder (bert or roberta); "
                             f"this server runs a {self.model_type} model", f"{field}.{pairs[0]}")
        out: list[Encoded | None] = [None] * len(inputs)
        for idx, texts, seconds in ((singles, [inputs[i] for i in singles], None),
                                    (pairs, [inputs[i][0] for i in pairs], [inputs[i][1] for i in pairs])):
            if not idx:
                continue  # the tokenizer is thread-safe: no lock (data/tokenizer.py)
            enc = self.tokenizer(texts, pairs=seconds, max_length=limit if truncate else None, padding="none")
            for i, ids, types in zip(idx, enc["input_ids"], enc["token_type_ids"]):
                out[i] = Encoded(ids, types)
        for i, e in enumerate(out):
            if len(e.input_ids) > limit:
                raise InputError(413, f"{field}[{i}] has {len(e.input_ids)} tokens, more than the limit of {limit} "
                                 '(--max-input-tokens); send "truncate": true to cut it', f"{field}.{i}",
                                 tokens=len(e.input_ids), limit=limit)
            if not e.input_ids:
                raise InputError(422, f"{field}[{i}]: no tokens", f"{field}.{i}")
        return out

    def encode_prompt(self, prompt: str, max_new_tokens: int) -> list[int]:
        ids = self.tokenizer([prompt], padding="none")["input_ids"][0]
        if not ids:
            raise InputError(422, "prompt: no tokens (an empty prompt)", "prompt")
        if len(ids) > self.max_input_tokens:
            raise InputError(413, f"prompt has {len(ids)} tokens, more than the limit of {self.max_input_tokens} "
                             "(--max-input-tokens)", "prompt", tokens=len(ids), limit=self.max_input_tokens)
        positions = self.model.config.max_position_embeddings
        if len(ids) + max_new_tokens > positions:
            raise InputError(422, f"max_new_tokens: the prompt ({len(ids)} tokens) + max_new_tokens "
                             f"({max_new_tokens}) exceed the model's {positions} positions", "max_new_tokens")
        return ids

    # -- forward passes (the batcher's thread) ----------------------------------------------------
    def run(self, kind: str, items: list) -> list:
        """One forward pass (or a generation) for `items`; any number of threads may call this at
        once. The shared side of the lock keeps the adapter table fixed for the pass; the precision's
        autocast is entered here because autocast state belongs to the calling (worker) thread."""
        with self.lock.shared(), torch.inference_mode(), self.precision.autocast(self.model.device):
            if kind == "classify":
                return self._classify(items)
            if kind == "embed":
                return self._embed(items)
            if kind == "generate":
                return self._generate(items)
        raise ValueError(f"unknown kind {kind!r}")

    def _split_gone(self, items: list[Seq]) -> tuple[list[int], list]:
        """Indices of items whose adapter is still loaded; a result list with a 404 for the others
        (an adapter unloaded while its requests waited)."""
        loaded = set(self.adapter_names())
        out: list = [None] * len(items)
        keep = []
        for i, s in enumerate(items):
            if s.adapter is not None and s.adapter not in loaded:
                out[i] = InputError(404, f"adapter {s.adapter!r} was unloaded before this request ran "
                                    f"(loaded: {', '.join(sorted(loaded)) or 'none'})", "adapter")
            else:
                keep.append(i)
        return keep, out

    def _batch(self, items: list[Seq]) -> tuple[dict, Packed]:
        """One unpadded stream for the batch (no work is spent on padding, whatever the lengths)."""
        device = self.model.device
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate_packed([s.enc for s in items]).items()}
        inputs = model_inputs(b)
        return inputs, inputs["packed"]

    def _classify(self, items: list[Seq]) -> list:
        keep, out = self._split_gone(items)
        if not keep:
            return out
        run = [items[i] for i in keep]
        b, packed = self._batch(run)
        logits = classify_mixed(self.model, b["input_ids"], None, b["token_type_ids"],
                                [s.adapter for s in run], packed=packed)
        groups: dict[str | None, list[int]] = {}
        for j, s in enumerate(run):
            groups.setdefault(s.adapter, []).append(j)
        for adapter, rows in groups.items():  # one softmax and one copy per adapter, not per sequence
            info = self.head_info(adapter)
            lg = torch.stack([logits[j] for j in rows]).float()
            values = (lg[:, 0] if info["regression"] else lg.softmax(-1)).cpu().tolist()
            for j, v in zip(rows, values):
                if info["regression"]:
                    out[keep[j]] = {"score": v}
                else:
                    best = max(range(len(v)), key=v.__getitem__)
                    out[keep[j]] = {"label": info["labels"][best], "probabilities": dict(zip(info["labels"], v))}
        return out

    def _embed(self, items: list[Seq]) -> list:
        keep, out = self._split_gone(items)
        if not keep:
            return out
        run = [items[i] for i in keep]
        b, packed = self._batch(run)
        with mixed_batch(self.model, [s.adapter for s in run], packed):   # the trunk only: no head
            hidden = self.model.transformer(b["input_ids"], None, b["token_type_ids"], packed=packed)
        from lmforge.infer.embed import pool_packed
        vec = pool_packed(hidden, packed, self.pooling)
        vec = F.normalize(vec, dim=-1).float().cpu()
        for i, v in zip(keep, vec):
            out[i] = v
        return out

    def _generate(self, jobs: list[GenJob]) -> list:
        """Generation requests: beam search one at a time (its answer is known only at the end); the
        greedy and sampled ones decoded together (models.generate.RowDecoder: each row with its own
        settings and random stream, leaving the batch when it ends), streamed through job.emit where
        it is set. A failure answers only the rows it concerns when it can be pinned to one."""
        out: list = [None] * len(jobs)
        rows = [i for i, j in enumerate(jobs) if j.num_beams <= 1]
        for i, j in enumerate(jobs):
            if j.num_beams > 1:
                try:
                    out[i] = self._beam_search(j)
                except Exception as e:   # this request's failure, not its neighbours'
                    out[i] = e
        if rows:
            for i, answer in zip(rows, self._decode_together([jobs[i] for i in rows])):
                out[i] = answer
        return out

    def _decode_together(self, jobs: list[GenJob]) -> list[dict]:
        settings = []
        for job in jobs:
            g = None
            if job.do_sample:
                g = torch.Generator(device=self.model.device)
                g.manual_seed(job.seed if job.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
            settings.append(RowSettings(job.max_new_tokens, job.do_sample, job.temperature, job.top_k, job.top_p,
                                        job.no_repeat_ngram_size, job.no_repeat_ngram_scope, g))
        streams = [TextStream(self.tokenizer, job.stop) if job.emit is not None else None for job in jobs]
        new: list[list[int]] = [[] for _ in jobs]
        finish = ["length"] * len(jobs)
        eos = self.model.config.eos_token_id
        ends = self.end_ids or ([] if eos is None else [eos])   # the tokenizer's, else the model's
        dec = RowDecoder(self.model, [job.input_ids for job in jobs], settings, ends)
        while not dec.done:
            for row, token, _ in dec.step():
                job, stream = jobs[row], streams[row]
                if token in ends:
                    finish[row] = "eos"
                    continue            # the row has left the batch
                new[row].append(token)
                if stream is not None:
                    chunk = stream.push(new[row])
                    if chunk:
                        job.emit({"text": chunk})
                    if stream.stopped or (job.cancelled is not None and job.cancelled.is_set()):
                        dec.stop(row)   # the text is complete, or nobody reads it any more
        return [self._answer(job, n, f, st) for job, n, f, st in zip(jobs, new, finish, streams)]

    def _beam_search(self, job: GenJob) -> dict:
        out = generate(self.model, [job.input_ids], max_new_tokens=job.max_new_tokens, num_beams=job.num_beams,
                       length_penalty=job.length_penalty, no_repeat_ngram_size=job.no_repeat_ngram_size,
                       no_repeat_ngram_scope=job.no_repeat_ngram_scope, eos_token_id=self.end_ids or None)[0]
        new = out[len(job.input_ids):]
        end = next((i for i, t in enumerate(new) if t in self.end_ids), None)
        return self._answer(job, new if end is None else new[:end], "length" if end is None else "eos",
                            TextStream(self.tokenizer, job.stop) if job.emit is not None else None)

    def _answer(self, job: GenJob, new: list[int], finish: str, stream: TextStream | None) -> dict:
        """The response for the new tokens (end token excluded); a stream gets what it has not seen."""
        text, stopped = cut_at_stop(self.tokenizer.decode(new), job.stop)
        if stream is not None and stream.rest(text):
            job.emit({"text": stream.rest(text)})
        return {"text": text, "completion_tokens": len(new), "prompt_tokens": len(job.input_ids),
                "finish_reason": "stop" if stopped else finish}
