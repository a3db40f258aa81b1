"""Classification and regression inference on a model + tokenizer: logits, labels, probabilities."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from lmforge.data.batches import Encoded, collate, collate_packed, encode_examples, model_inputs
from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import ConfigError
from lmforge.infer.features import example_features
from lmforge.infer.quantize import quantize_model
from lmforge.models import from_pretrained
from lmforge.models.routing import INHERIT


@torch.inference_mode()
def predict_logits(model, encoded: list[Encoded], pad_id: int, batch_size: int = 64,
                   packed: bool = True, adapters=INHERIT) -> torch.Tensor:
    """Logits [N, C] ([N, 1] for regression) in the order of `encoded`. Batches are formed from
    examples of similar length and run unpadded (packed=True) or padded to their longest.
    `adapters`: the adapter every example runs with (Model.forward's argument; left out, the
    routing of an enclosing routing.using block, e.g. the one a LoRA training run evaluates in)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    out = None
    device = model.device
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        items = [Encoded(encoded[i].input_ids, encoded[i].token_type_ids) for i in idx]
        b = collate_packed(items) if packed else collate(items, pad_id)
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
        logits = model(**model_inputs(b), adapters=adapters).logits.float().cpu()
        if out is None:
            out = torch.empty(len(encoded), logits.shape[-1])
        out[idx] = logits
    model.train(was_training)
    return out if out is not None else torch.empty(0, model.config.num_labels)


def load_adapter_run(directory: Path, device: str = "cpu", name: str = "default"):
    """A LoRA run's best/: the base model it names with the adapter (and its head) loaded as `name`;
    run it with `model(..., adapters=name)`."""
    from lmforge.adapters.methods import get_method

    return get_method("lora").load(Path(directory), device, name)[0]


class Probe(torch.nn.Module):
    """A linear model fitted on frozen, pooled encoder features (the `features` method)."""

    def __init__(self, directory: Path):
        super().__init__()
        self.spec = json.loads((directory / "probe.json").read_text())
        t = load_file(str(directory / "probe.safetensors"))
        self.weight, self.bias, self.mean, self.scale = t["weight"], t["bias"], t["mean"], t["scale"]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.scale @ self.weight.T + self.bias


class Classifier:
    """A fine-tuned classifier directory (config.json + weights + tokenizer) ready to predict."""

    def __init__(self, model_dir: str | Path, max_length: int = 512, device: str = "cpu",
                 quantize: str | None = None):
        from lmforge.adapters.methods import load_run

        model_dir = Path(model_dir)
        self.probe = Probe(model_dir) if (model_dir / "probe.json").is_file() else None
        # the method that wrote the directory loads it; `adapter` is what every forward pass routes to
        self.model, self.adapter = load_run(model_dir, device)
        self.config = self.model.config_for(self.adapter)
        if self.probe is None and self.config.head != "classification":
            raise ConfigError(f"{model_dir}: not a classifier (head {self.config.head!r})")
        if quantize:
            quantize_model(self.model, quantize)
        self.tokenizer = load_tokenizer(model_dir)
        self.max_length = min(max_length, self.config.max_position_embeddings)

    @property
    def labels(self) -> list[str]:
        return self.probe.spec["labels"] if self.probe else self.config.labels

    @property
    def regression(self) -> bool:
        return self.probe.spec["regression"] if self.probe else self.config.is_regression

    @torch.no_grad()
    def logits(self, examples) -> torch.Tensor:
        if self.probe is None:
            encoded = encode_examples(self.tokenizer, examples, self.max_length)
            return predict_logits(self.model, encoded, self.tokenizer.pad_token_id, adapters=self.adapter)
        x = example_features(self.model, self.tokenizer, examples, self.max_length, self.probe.spec["pooling"],
                             self.probe.spec.get("pairs", "joint"))  # probes saved before "pairs" were joint
        return self.probe(torch.from_numpy(x))

    def predict(self, examples) -> list[dict]:
        """Per example: {"label", "probabilities": {name: p}} or {"score"} for regression."""
        logits = self.logits(examples)
        if self.regression:
            return [{"score": float(v)} for v in logits[:, 0]]
        probs = logits.softmax(-1)
        return [{"label": self.labels[int(p.argmax())],
                 "probabilities": {n: float(x) for n, x in zip(self.labels, p)}} for p in probs]
