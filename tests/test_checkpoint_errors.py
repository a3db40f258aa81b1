"""Bad checkpoints get one clear error naming the file and the problem; saving never half-replaces."""

import json
import pickle

import pytest
import torch

from lmforge.errors import CheckpointError, ConfigError
from lmforge.models import Model, ModelConfig, from_pretrained, save_pretrained
from lmforge.models import checkpoint

TINY = ModelConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                   max_position_embeddings=32)


@pytest.fixture
def good(tmp_path):
    torch.manual_seed(0)
    return save_pretrained(Model(TINY), tmp_path / "model")


def edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def truncate(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def garbage(d):
    (d / "model.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 10)


def pickle_with_code(d):
    (d / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Evil()}))


def drop_tensor(d):
    from safetensors.torch import load_file, save_file
    state = load_file(d / "model.safetensors")
    del state["encoder.layer.1.output.dense.weight"]
    save_file(state, d / "model.safetensors")


CASES = [
    ("missing config", lambda d: (d / "config.json").unlink(), ConfigError, ["config.json", "not found"]),
    ("bad json", lambda d: (d / "config.json").write_text("{\n  'x': 1"), ConfigError,
     ["config.json", "invalid JSON at line 2"]),
    ("unknown model_type", lambda d: edit_config(d, model_type="xlnet"), ConfigError,
     ["config.json", "model_type 'xlnet' is not supported"]),
    ("missing field", lambda d: edit_config(d, hidden_size=None) or _drop_key(d, "hidden_size"), ConfigError,
     ["config.json", "missing field 'hidden_size'"]),
    ("truncated weights", truncate, CheckpointError, ["model.safetensors", "corrupt or truncated"]),
    ("garbage weights", garbage, CheckpointError, ["model.safetensors", "corrupt or truncated"]),
    ("no weights", lambda d: (d / "model.safetensors").unlink(), CheckpointError, ["no weights"]),
    ("pickle with code", pickle_with_code, CheckpointError, ["pytorch_model.bin", "cannot be read"]),
    ("shape mismatch", lambda d: edit_config(d, intermediate_size=64), CheckpointError,
     ["model.safetensors", "encoder.layer.0.intermediate.dense.weight", "[32, 16]", "[64, 16]"]),
    ("missing tensor", drop_tensor, CheckpointError,
     ["model.safetensors", "missing 1 tensor", "encoder.layer.1.output.dense.weight"]),
]


def _drop_key(d, key):
    cfg = json.loads((d / "config.json").read_text())
    del cfg[key]
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("name,damage,error,words", CASES, ids=[c[0] for c in CASES])
def test_bad_checkpoint_is_named(good, capsys, name, damage, error, words):
    damage(good)
    with pytest.raises(error) as e:
        from_pretrained(good)
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w in message, (w, message)
    assert "this must never run" not in capsys.readouterr().out


def test_unknown_alias_says_how_to_get_it():
    with pytest.raises(ConfigError, match="not a known alias"):
        from_pretrained("no-such-model-dir")


def test_failed_save_keeps_the_good_checkpoint(good, monkeypatch):
    before = {p.name: p.read_bytes() for p in good.iterdir()}

    def crash(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint, "save_file", crash)
    model = Model(TINY.replace(hidden_dropout=0.5))
    with pytest.raises(OSError):
        save_pretrained(model, good)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert [p.name for p in good.parent.iterdir()] == ["model"]  # no temporary left behind


def test_resave_replaces_whole_directory(good):
    (good / "stale.bin").write_bytes(b"old")
    save_pretrained(Model(TINY), good)
    assert sorted(p.name for p in good.iterdir()) == ["config.json", "model.safetensors"]
    from_pretrained(good)
