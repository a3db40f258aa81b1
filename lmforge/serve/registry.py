"""Which adapters the server holds, where they came from, and whether a directory may be loaded.
Everything read for an adapter (its directory, best/, adapter_config.json, adapter_model.safetensors,
lmforge_head.json, nothing else) must resolve inside a root, symlinks resolved, and is opened
without following a symlink swapped in meanwhile (lmforge/utils/confine.py): for hot loads the root
is --adapter-root, for --adapter NAME=DIR at startup DIR itself. Adapter names are plain
identifiers, so that neither a name nor a path can reach outside it."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.serve.engine import Engine, InputError
from lmforge.utils.confine import Confined, ConfinementError, Missing

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}")


def _refused(e: ConfinementError) -> InputError:
    """403 for a path leading outside the root, 400 for a wrong file type, size or a missing file."""
    return InputError(e.status, str(e), "path")


def adapter_dir(path: Path, confined: Confined | None = None) -> Path:
    """A fine-tuning run directory's best/ adapter, or the adapter directory itself, resolved inside
    `confined` (default: `path` is its own root)."""
    try:
        confined = confined or Confined(path)
        d = confined.resolve_dir(path)
        for cand in (d / "best", d):
            if confined.is_file(cand / "adapter_config.json"):
                return confined.resolve_dir(cand)
    except Missing:
        pass
    except ConfinementError as e:
        raise _refused(e) from None
    except OSError as e:  # a name too long, a permission denied, ...
        raise InputError(400, f"{path}: cannot be read ({e.strerror})", "path") from None
    raise InputError(400, f"{path}: no adapter_config.json (expected a LoRA run directory or its best/ "
                     "adapter directory)", "path")


def check_name(name: str) -> str:
    if any(c in name for c in "/\\\0") or ".." in name or name.startswith("."):
        raise InputError(403, f"adapter name {name!r} looks like a path; names are letters, digits, '_' "
                         "and '-'", "name")
    if not NAME.fullmatch(name):
        raise InputError(422, f"adapter name {name!r} is not valid: 1-64 letters, digits, '_' or '-', "
                         "starting with a letter or digit", "name")
    return name


class Registry:
    def __init__(self, engine: Engine, adapter_root: str | os.PathLike | None = None):
        self.engine = engine
        self.confined = Confined(adapter_root) if adapter_root else None
        self.root = self.confined.root if self.confined else None
        self.sources: dict[str, str] = {}
        self._lock = threading.Lock()   # one load/unload at a time; name checks stay consistent

    def names(self) -> list[str]:
        return self.engine.adapter_names()

    def unknown(self, name: str) -> InputError:
        loaded = self.names()
        return InputError(404, f"no adapter named {name!r} (loaded: {', '.join(loaded) or 'none'})",
                          "adapter", loaded=loaded)

    def require(self, name: str | None) -> None:
        if name is not None and name not in self.names():
            raise self.unknown(name)

    def describe(self) -> list[dict]:
        out = []
        for name in self.names():
            info = self.engine.head_info(name)
            out.append({"name": name, "source": self.sources.get(name), **info})
        return out

    def resolve_allowed(self, path: str) -> Path:
        """`path` (relative to --adapter-root, or absolute) if it leads inside the root, symlinks
        resolved; else 403."""
        if self.confined is None:
            raise InputError(403, "hot loading is off: start the server with --adapter-root DIR to allow "
                             "loading adapters from below DIR", "path")
        try:
            return self.confined.resolve(path)
        except ConfinementError as e:
            raise _refused(e) from None

    def add(self, name: str, directory: Path, source: str | None = None, confined: Confined | None = None) -> dict:
        """Load from `directory`, every file read inside `confined` (hot loads: the --adapter-root;
        default, for startup adapters: the directory itself)."""
        check_name(name)
        with self._lock:
            if name in self.names():
                raise InputError(409, f"adapter {name!r} is already loaded; DELETE /v1/adapters/{name} first",
                                 "name")
            d = adapter_dir(directory, confined)
            try:
                self.engine.load_adapter(name, d, confined or Confined(directory))
            except ConfinementError as e:
                raise _refused(e) from None
            except (LmforgeError, OSError) as e:
                raise InputError(400, f"cannot load adapter {name!r}: {e}", "path") from None
            self.sources[name] = source or str(d)
        self.engine_metrics_hook()
        return {"name": name, "source": self.sources[name], **self.engine.head_info(name)}

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self.names():
                raise self.unknown(name)
            self.engine.unload_adapter(name)
            self.sources.pop(name, None)
        self.engine_metrics_hook()

    def engine_metrics_hook(self) -> None:  # replaced by the app to update the adapters gauge
        pass
