"""Reading files only from inside one directory (the root): `--adapter-root` for hot-loaded adapters,
the run or adapter directory itself for everything else.

    c = Confined(root)
    d = c.resolve_dir("sst2-lora/best")                          # 403 if it resolves outside root
    cfg = c.read_json(d / "adapter_config.json", max_bytes=MiB)
    data = c.read_bytes(d / "adapter_model.safetensors", {"adapter_model.safetensors"}, 64 * MiB)

Rules, in order, for every file:
- the name is one the caller expects (`allowed_names`): nothing else in the directory is opened;
- the path, symlinks resolved, is inside the root (else `Escape`, HTTP 403); `..`, absolute paths,
  `//`, `.` segments and symlinks (to files or directories, anywhere on the path) are all resolved
  before the check, so only where a path really leads counts;
- before opening, it is a regular file no larger than `max_bytes` (else `Refused`, HTTP 400): a FIFO
  is never opened (that would block), nor a device;
- the open itself walks the resolved path from the root one component at a time with O_NOFOLLOW
  (`openat`), so a symlink swapped in between the check and the open fails the open instead of being
  followed, and the opened file is checked again with fstat (regular, size) before a byte is read;
  at most `max_bytes` are read, whatever the file does meanwhile.

What no path check can see: a hard link. A hard link inside the root to a file outside it is the
same file under an inside name; nothing distinguishes it from a file written there (refusing every
file with more than one link would refuse legitimate copies made with `cp -l`). Creating one needs
write access to the root and, on Linux with fs.protected_hardlinks=1 (the default), ownership of or
read-write access to the target. The size bounds and the parsers' own checks still apply to it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lmforge.errors import LmforgeError

MiB = 1 << 20
JSON_MAX_BYTES = MiB   # adapter_config.json, lmforge_head.json, config.json and the like

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_NOCTTY = getattr(os, "O_NOCTTY", 0)
_WALK = bool(_NOFOLLOW and _DIRECTORY) and os.open in os.supports_dir_fd


class ConfinementError(LmforgeError):
    """A path or file the caller may not read; `status` is the HTTP code the server answers with."""
    status = 400


class Escape(ConfinementError):
    """The path leads outside the root (through `..`, an absolute path or a symlink)."""
    status = 403


class Refused(ConfinementError):
    """Inside the root but not readable as asked: not a regular file, too large, an unexpected name,
    missing."""
    status = 400


class Missing(Refused):
    """No such file (inside the root)."""


def _size(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n} bytes"


class Confined:
    """Reads below `root` only (see the module docstring for the rules)."""

    def __init__(self, root: str | os.PathLike):
        real = os.path.realpath(os.fspath(root))
        if not os.path.isdir(real):
            raise (Refused if os.path.lexists(real) else Missing)(f"{os.fspath(root)}: not a directory")
        self.root = Path(real)

    def __repr__(self) -> str:
        return f"Confined({str(self.root)!r})"

    # -- paths ------------------------------------------------------------------------------------
    def resolve(self, path: str | os.PathLike) -> Path:
        """`path` (relative to the root, or absolute) with every symlink resolved; Escape unless it
        is the root or below it. The path need not exist."""
        text = os.fspath(path)
        if "\0" in text:
            raise Escape(f"{text!r}: contains a NUL byte")
        try:
            real = os.path.realpath(os.path.join(self.root, text))
        except (OSError, ValueError) as e:
            raise Escape(f"{text}: cannot be resolved ({e})") from None
        if real != str(self.root) and not real.startswith(str(self.root) + os.sep):
            raise Escape(f"{text}: leads outside {self.root} (symlinks resolved)")
        return Path(real)

    def resolve_dir(self, path: str | os.PathLike) -> Path:
        """A directory inside the root (symlinks resolved): Escape if outside, Missing if absent."""
        real = self.resolve(path)
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise Missing(f"{os.fspath(path)}: no such directory") from None
        except OSError as e:
            raise Refused(f"{os.fspath(path)}: cannot be read ({e.strerror})") from None
        if not stat.S_ISDIR(st.st_mode):
            raise Refused(f"{os.fspath(path)}: not a directory")
        return real

    def is_file(self, path: str | os.PathLike) -> bool:
        """Whether `path` names something (a file, a FIFO, a dangling link...); Escape if it leads
        outside the root. Use it to pick a layout; read_bytes still checks what it opens."""
        real = self.resolve(path)
        return os.path.lexists(real) and not os.path.isdir(real)

    def check_file(self, path: str | os.PathLike, max_bytes: int) -> Path:
        """Without opening it: inside the root, a regular file, at most max_bytes. For files another
        library opens by name (this cannot stop a swap after the check; read_bytes can)."""
        real = self.resolve(path)
        self._check_stat(path, self._lstat(path, real), max_bytes)
        return real

    # -- reading ----------------------------------------------------------------------------------
    def open_file(self, path: str | os.PathLike, allowed_names, max_bytes: int):
        """A binary file object for `path`, opened under the rules above."""
        name = os.path.basename(os.path.normpath(os.fspath(path)))
        if allowed_names is not None and name not in allowed_names:
            raise Refused(f"{os.fspath(path)}: not a file this directory is read for "
                          f"(expected {', '.join(sorted(allowed_names))})")
        real = self.resolve(path)
        self._check_stat(path, self._lstat(path, real), max_bytes)  # never open a FIFO or a device
        fd = self._open(path, real)
        try:
            st = os.fstat(fd)
            self._check_stat(path, st, max_bytes)
            if _NONBLOCK:
                os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def read_bytes(self, path: str | os.PathLike, allowed_names, max_bytes: int) -> bytes:
        with self.open_file(path, allowed_names, max_bytes) as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:  # it grew after the check
            raise Refused(f"{os.fspath(path)}: larger than the limit of {_size(max_bytes)}")
        return data

    def read_json(self, path: str | os.PathLike, max_bytes: int = JSON_MAX_BYTES):
        """The parsed JSON of `path` (its own name is the one allowed); invalid JSON is a Refused
        naming the line."""
        data = self.read_bytes(path, {os.path.basename(os.fspath(path))}, max_bytes)
        try:
            return json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise Refused(f"{os.fspath(path)}: not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise Refused(f"{os.fspath(path)}: invalid JSON at line {e.lineno}: {e.msg}") from None

    # -- internals --------------------------------------------------------------------------------
    @staticmethod
    def _lstat(path, real: Path) -> os.stat_result:
        try:
            return os.lstat(real)
        except FileNotFoundError:
            raise Missing(f"{os.fspath(path)}: not found") from None
        except OSError as e:
            raise Refused(f"{os.fspath(path)}: cannot be read ({e.strerror})") from None

    @staticmethod
    def _check_stat(path, st: os.stat_result, max_bytes: int) -> None:
        if not stat.S_ISREG(st.st_mode):
            kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                    else "a socket" if stat.S_ISSOCK(st.st_mode) else "a symlink" if stat.S_ISLNK(st.st_mode)
                    else "not a regular file")
            raise Refused(f"{os.fspath(path)}: {kind}, not a regular file")
        if st.st_size > max_bytes:
            raise Refused(f"{os.fspath(path)}: {_size(st.st_size)}, more than the limit of {_size(max_bytes)}")

    def _open(self, path, real: Path) -> int:
        flags = os.O_RDONLY | _CLOEXEC | _NONBLOCK | _NOCTTY | _NOFOLLOW
        try:
            if not _WALK:  # no openat: open, then make sure it is the file that was checked
                fd = os.open(real, flags)
                if not os.path.samestat(os.fstat(fd), os.stat(real)):
                    os.close(fd)
                    raise Escape(f"{os.fspath(path)}: changed while being opened")
                return fd
            parts = real.relative_to(self.root).parts
            if not parts:
                raise Refused(f"{os.fspath(path)}: a directory, not a regular file")
            dir_fd = os.open(self.root, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
            try:
                for part in parts[:-1]:
                    nxt = os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=dir_fd)
                    os.close(dir_fd)
                    dir_fd = nxt
                return os.open(parts[-1], flags, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
        except FileNotFoundError:
            raise Missing(f"{os.fspath(path)}: not found") from None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):  # a symlink appeared on the path
                raise Escape(f"{os.fspath(path)}: became a symlink while being opened") from None
            raise Refused(f"{os.fspath(path)}: cannot be read ({e.strerror})") from None


# -- run directories (`lmforge evaluate / predict / export --run`) ---------------------------------
# What the loaders read from a run's best/ (or a model / adapter directory), by kind of file.
_TEXT_MAX = 64 * MiB            # tokenizer.json, vocab.txt, merges.txt ... (a large vocabulary's is ~20 MB)
_WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pt")
_TEXT_SUFFIXES = (".json", ".txt", ".bpe", ".model")
_BIG_TEXT = {"tokenizer.json", "vocab.json", "vocab.txt", "merges.txt", "encoder.json", "vocab.bpe",
             "added_tokens.json", "model.safetensors.index.json"}


def _weights_limit(directory: Path, confined: Confined) -> int:
    """Twice the fp32 bytes of the model config.json describes, plus 64 MiB (8 GiB without one)."""
    cfg = confined.read_json(directory / "config.json") if confined.is_file(directory / "config.json") else {}
    if not isinstance(cfg, dict):
        raise Refused(f"{directory / 'config.json'}: expected a JSON object")
    h = int(cfg.get("hidden_size") or cfg.get("n_embd") or 0)
    if not h:
        return 8 << 30
    layers = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 1)
    inner = int(cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * h)
    vocab = int(cfg.get("vocab_size") or 0)
    positions = int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 0)
    params = (vocab + positions + 2) * h + layers * (4 * h * h + 2 * h * inner + 10 * h + inner) + h * h
    return 2 * 4 * params + 64 * MiB


def _model_files(run: str | os.PathLike) -> tuple[Path, Confined, list[tuple[Path, int]]]:
    """(the model directory of `run`: its best/ or itself, the Confined of the run directory, every
    file the loaders may read from it with its size bound), without opening any: Escape if the
    directory leads outside the run (symlinks resolved), Missing when there is no model."""
    # absolute: the paths below are built from `run`, and Confined reads a relative path as relative
    # to its root (a relative run directory would be counted twice)
    run = os.path.abspath(os.fspath(run))
    try:
        confined = Confined(run)
    except Missing:
        raise Missing(f"{os.fspath(run)}: no such run directory") from None
    for d in (Path(os.fspath(run)) / "best", Path(os.fspath(run))):
        if any(confined.is_file(d / f) for f in ("config.json", "adapter_config.json", "delta.json")):
            real = confined.resolve_dir(d)
            limit = _weights_limit(d, confined)
            files = []
            for entry in sorted(os.listdir(real)):
                sub = d / entry
                if confined.resolve(sub).is_dir():
                    if entry == "1_Pooling" and confined.is_file(sub / "config.json"):
                        files.append((sub / "config.json", JSON_MAX_BYTES))
                    continue
                if entry.endswith(_WEIGHTS_SUFFIXES):
                    files.append((sub, limit))
                elif entry.endswith(_TEXT_SUFFIXES):
                    files.append((sub, _TEXT_MAX if entry in _BIG_TEXT else JSON_MAX_BYTES))
            return d, confined, files
    raise Missing(f"{os.fspath(run)}: not a run directory (no best/config.json or best/adapter_config.json) "
                  "nor a model or adapter directory")


@contextlib.contextmanager
def private_run_copy(run: str | os.PathLike) -> Iterator[tuple[Path, Path]]:
    """(the model directory of `run`: its best/, or the directory itself when it is a model or adapter
    directory; a private copy of it). Missing when there is no model. Every file a
    loader may read is opened through Confined (inside the run directory, walked with O_NOFOLLOW, so
    a symlink swapped in after the check fails its open; regular, bounded) and copied into a new
    temporary directory only this user can write; the loaders then read the copy, where nothing can
    be swapped. Errors raised inside the block name the run's files, not the copy's. The copy is
    removed at the end of the block (it costs the disk space of the run's files meanwhile)."""
    d, confined, files = _model_files(run)
    with tempfile.TemporaryDirectory(prefix="lmforge-run-") as tmp:
        for f, limit in files:
            target = Path(tmp) / f.relative_to(d)
            target.parent.mkdir(exist_ok=True)
            with confined.open_file(f, None, limit) as src, open(target, "wb") as dst:
                copied = 0
                while chunk := src.read(MiB):
                    copied += len(chunk)
                    if copied > limit:   # it grew after the check
                        raise Refused(f"{os.fspath(f)}: larger than the limit of {_size(limit)}")
                    dst.write(chunk)
        try:
            yield d, Path(tmp)
        except LmforgeError as e:
            message = str(e).replace(tmp, os.fspath(d))
            if message == str(e):
                raise
            try:
                renamed = type(e)(message)
            except TypeError:   # an error type that takes other arguments: as it is
                raise e from None
            raise renamed from None
