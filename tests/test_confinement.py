"""Confinement of everything read for an adapter or a run (lmforge/utils/confine.py): hot loads below
--adapter-root, `--adapter NAME=DIR`, and `lmforge evaluate / predict / export --run`.

Every escape is refused with 403 and nothing outside the root is opened: Python-level opens are
recorded by a spy, and the outside targets include FIFOs, so a native open (safetensors' own
file reader, say) would block the request; each request runs with a timeout. Most cases run in
process through the real app (FastAPI's TestClient); two go to a real server process."""

import builtins
import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from test_serve import Server, encoder_files, error  # noqa: F401  (a fixture, reused)

from lmforge.serve.engine import Engine  # noqa: E402
from lmforge.utils.confine import Confined, Escape, MiB, Refused  # noqa: E402

fastapi_testclient = pytest.importorskip("fastapi.testclient")


@pytest.fixture(scope="module")
def layout(encoder_files, tmp_path_factory):  # noqa: F811
    """root/ (the --adapter-root) with good adapters and every kind of escape; outside/ beside it."""
    d, dirs = encoder_files
    t = tmp_path_factory.mktemp("confine")
    root, out = t / "root", t / "outside"
    root.mkdir()
    shutil.copytree(dirs["extra"], root / "good")
    shutil.copytree(dirs["extra"], out / "extra")
    mkfifo(out / "fifo")                        # opening it for reading blocks until a writer comes
    (out / "secret").write_text('{"r": 8, "lora_alpha": 16}')
    shutil.copytree(dirs["extra"], out / "fifo-adapter")
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        (out / "fifo-adapter" / f).unlink()
        mkfifo(out / "fifo-adapter" / f)

    def adapter_with(name, **links):  # a copy of the good adapter with some files replaced by symlinks
        a = root / name
        shutil.copytree(dirs["extra"], a)
        for f, target in links.items():
            (a / f).unlink()
            (a / f).symlink_to(target)
        return a

    (root / "evil-dir").symlink_to(out / "fifo-adapter")                       # the adapter directory
    (root / "evil-run").mkdir()
    (root / "evil-run" / "best").symlink_to(out / "fifo-adapter")              # a run's best/
    adapter_with("evil-weights", **{"adapter_model.safetensors": out / "fifo"})
    adapter_with("evil-config", **{"adapter_config.json": out / "fifo"})
    adapter_with("evil-head", **{"lmforge_head.json": out / "secret"})
    adapter_with("evil-relative", **{"adapter_model.safetensors": Path("../../outside/fifo")})
    (root / "link").symlink_to(out)                                              # a directory link
    (root / "chain").symlink_to(root / "link")                                   # a link to a link
    adapter_with("inside-link", **{"lmforge_head.json": root / "good" / "lmforge_head.json"})  # fine
    fifo_in = adapter_with("fifo-inside")
    (fifo_in / "adapter_model.safetensors").unlink()
    mkfifo(fifo_in / "adapter_model.safetensors")
    big = adapter_with("big-config")
    cfg = json.loads((big / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "x" * (2 * MiB)
    (big / "adapter_config.json").write_text(json.dumps(cfg))
    huge = adapter_with("huge-weights")
    with open(huge / "adapter_model.safetensors", "r+b") as f:
        f.truncate(64 << 30)   # sparse: 64 GiB on paper, far over any bound for this model
    dir_cfg = adapter_with("dir-config")
    (dir_cfg / "adapter_config.json").unlink()
    (dir_cfg / "adapter_config.json").mkdir()
    hard = adapter_with("hard-link")
    (hard / "adapter_model.safetensors").unlink()
    os.link(out / "extra" / "adapter_model.safetensors", hard / "adapter_model.safetensors")
    return d, root, out


@pytest.fixture(scope="module")
def client(layout):
    from lmforge.serve.app import ServeSettings, create_app

    d, root, _ = layout
    engine = Engine(str(d / "base"))
    app = create_app(ServeSettings(model=str(d / "base"), adapter_root=str(root)), engine=engine)
    with fastapi_testclient.TestClient(app) as c:
        yield c


class OpenSpy:
    """Records every path opened through Python (os.open, open) while active."""

    def __init__(self, monkeypatch):
        self.paths: list[str] = []
        real_os_open, real_open = os.open, builtins.open

        def os_open(path, flags, mode=0o777, *, dir_fd=None):
            fd = real_os_open(path, flags, mode, dir_fd=dir_fd)
            self.paths.append(os.path.realpath(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd")
                              else os.fspath(path))
            return fd

        def py_open(file, *a, **kw):
            if isinstance(file, (str, bytes, os.PathLike)):
                self.paths.append(os.path.realpath(file))
            return real_open(file, *a, **kw)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(builtins, "open", py_open)

    def outside(self, out: Path) -> list[str]:
        return [p for p in self.paths if p.startswith(str(out))]


FIFOS: list[Path] = []   # every FIFO the tests make; a reader blocked on one is released on a timeout


def timed(fn, timeout=20):
    """fn(), failing (instead of hanging) if it opens a FIFO: a native open can block while holding
    the GIL, so the watchdog that releases it is another process (it opens every FIFO for writing
    and closes it: a blocked reader's open returns and its read sees EOF)."""
    import subprocess
    import sys

    code = ("import os, sys, time\ntime.sleep(float(sys.argv[1]))\nfor _ in range(50):\n"
            "    for f in sys.argv[2:]:\n        try: os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))\n"
            "        except OSError: pass\n    time.sleep(0.1)\n")
    dog = subprocess.Popen([sys.executable, "-c", code, str(timeout), *map(str, FIFOS)])
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", fn()), daemon=True)
    t.start()
    t.join(timeout + 60)
    fired = dog.poll() is not None
    dog.kill()
    dog.wait()
    if fired or t.is_alive():
        pytest.fail("the request hung: a FIFO was opened")
    return box["r"]


def mkfifo(path: Path) -> None:
    os.mkfifo(path)
    FIFOS.append(path)


def load(client, name, path):
    return timed(lambda: client.post("/v1/adapters", json={"name": name, "path": path}))


ESCAPES = [
    ("dotdot", "../outside/extra"),
    ("dotdot-inside-first", "good/../../outside/extra"),
    ("dot-segments", "./.././outside/./extra/."),
    ("trailing-slash", "../outside/extra/"),
    ("absolute", "{out}/extra"),
    ("double-slash", "/{out}/extra"),
    ("double-slash-inside", "good//..//..//outside//extra"),
    ("symlinked-adapter-dir", "evil-dir"),
    ("symlinked-best", "evil-run"),
    ("symlinked-weights", "evil-weights"),
    ("symlinked-config", "evil-config"),
    ("symlinked-head-file", "evil-head"),
    ("relative-symlink-out", "evil-relative"),
    ("through-a-directory-link", "link/extra"),
    ("through-a-link-to-a-link", "chain/fifo-adapter"),
    ("symlink-dir-then-dotdot", "link/../outside/extra"),
]


@pytest.mark.parametrize("case,path", ESCAPES, ids=[c for c, _ in ESCAPES])
def test_escapes_are_403_and_open_nothing_outside(client, layout, monkeypatch, case, path):
    _, root, out = layout
    spy = OpenSpy(monkeypatch)
    r = load(client, "x", path.format(out=out))
    monkeypatch.undo()
    assert error(r, 403)["field"] == "path", case
    assert spy.outside(out) == [], spy.outside(out)
    assert "x" not in [a["name"] for a in client.get("/v1/adapters").json()["adapters"]]


LOOKALIKES = [
    "\uff0e\uff0e/outside/extra",      # fullwidth full stops
    "..\uff0foutside\uff0fextra",      # fullwidth solidus
    "%2e%2e/outside/extra",            # percent-encoded dots: a JSON body is not URL-decoded
    "..%2Foutside%2Fextra",
    "..\\outside\\extra",              # backslashes are name characters on POSIX
    "\u2024\u2024/outside/extra",      # one-dot leaders
]


@pytest.mark.parametrize("path", LOOKALIKES)
def test_lookalike_paths_are_literal_names_inside_the_root(client, layout, monkeypatch, path):
    _, root, out = layout
    spy = OpenSpy(monkeypatch)
    r = load(client, "x", path)
    monkeypatch.undo()
    assert error(r, 400)["field"] == "path"            # a name inside the root that does not exist
    assert "no adapter_config.json" in r.json()["error"]["message"]
    assert spy.outside(out) == []


@pytest.mark.parametrize("name,status", [("../x", 403), ("a/b", 403), ("..", 403), (".hidden", 403),
                                         ("a\\b", 403), ("x\x00", 403), ("\uff45xtra", 422),
                                         ("%2e%2e", 422), ("a.b", 422), ("", 422)])
def test_names_that_look_like_paths(client, name, status):
    assert error(load(client, name, "good"), status)["field"] == "name"


@pytest.mark.parametrize("path,words", [
    ("fifo-inside", ["adapter_model.safetensors", "FIFO, not a regular file"]),
    ("big-config", ["adapter_config.json", "more than the limit of 1.0 MiB"]),
    ("huge-weights", ["adapter_model.safetensors", "65536.0 MiB, more than the limit"]),
    ("dir-config", ["no adapter_config.json"]),
])
def test_wrong_file_type_or_size_is_400_without_reading(client, monkeypatch, path, words):
    r = load(client, "x", path)
    message = error(r, 400)["message"]
    assert all(w in message for w in words), message


def test_good_adapters_still_load(client, layout):
    for name, path in (("good", "good"), ("viaabs", str(layout[1] / "good")), ("inlink", "inside-link"),
                       ("dotted", "./good/../good/")):
        r = load(client, name, path)
        assert r.status_code == 201, r.text
        assert r.json()["labels"] == ["no", "yes"]
        assert client.delete(f"/v1/adapters/{name}").status_code == 204


def test_hard_links_cannot_be_told_apart_but_sizes_still_bound(client, layout, tmp_path):
    """A hard link inside the root to a file outside is the same file under an inside name: no path
    check can see it (documented in confine.py), so it loads; the size bounds still apply to it."""
    _, root, out = layout
    r = load(client, "hard", "hard-link")
    assert r.status_code == 201, r.text
    assert client.delete("/v1/adapters/hard").status_code == 204
    big = out / "big.json"
    big.write_text(" " * (2 * MiB) + "{}")
    shutil.copytree(root / "good", root / "hard-big")
    (root / "hard-big" / "lmforge_head.json").unlink()
    os.link(big, root / "hard-big" / "lmforge_head.json")
    assert "more than the limit" in error(load(client, "x", "hard-big"), 400)["message"]


# -- the open itself: a symlink swapped in after the check is not followed ------------------------

@pytest.mark.parametrize("swap", ["file", "directory"])
def test_symlink_swapped_in_between_check_and_open_is_caught(tmp_path, monkeypatch, swap):
    root, out = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    out.mkdir()
    (root / "a" / "f.json").write_text("{}")
    (out / "f.json").write_text('{"secret": 1}')
    c = Confined(root)
    real_check = Confined._check_stat
    swapped = []

    def check_then_swap(path, st, max_bytes):
        real_check(path, st, max_bytes)
        if not swapped:  # the attacker wins the race: after the lstat check, before the open
            swapped.append(1)
            if swap == "file":
                (root / "a" / "f.json").unlink()
                (root / "a" / "f.json").symlink_to(out / "f.json")
            else:
                (root / "a").rename(root / "gone")
                (root / "a").symlink_to(out)

    monkeypatch.setattr(Confined, "_check_stat", staticmethod(check_then_swap))
    with pytest.raises(Escape, match="symlink while being opened"):
        c.read_json(root / "a" / "f.json")
    assert swapped


def test_only_expected_names_are_opened(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(Refused, match="not a file this directory is read for"):
        Confined(tmp_path).read_bytes(tmp_path / "notes.txt", {"adapter_config.json"}, MiB)


# -- a real server process ------------------------------------------------------------------------

def test_real_server_refuses_escapes_without_opening_them(layout, tmp_path):
    import httpx

    d, root, out = layout
    s = Server(["--model", d / "base", "--adapter-root", root], tmp_path)
    try:
        c = httpx.Client(base_url=s.url, timeout=30)   # a FIFO opened by the server would time out
        for path in ("evil-weights", "evil-config", "evil-dir", "evil-run", "../outside/extra"):
            assert error(c.post("/v1/adapters", json={"name": "x", "path": path}), 403)["field"] == "path"
        assert "FIFO" in error(c.post("/v1/adapters", json={"name": "x", "path": "fifo-inside"}), 400)["message"]
        assert c.post("/v1/adapters", json={"name": "ok", "path": "good"}).status_code == 201
        assert c.post("/v1/classify", json={"adapter": "ok", "inputs": ["fine"]}).status_code == 200
    finally:
        s.stop()


# -- run directories read by the CLI --------------------------------------------------------------

@pytest.fixture
def runs(layout, tmp_path):
    d, root, out = layout
    good = tmp_path / "run"
    shutil.copytree(root / "good", good / "best")
    return good, out, d / "base"


BREAKAGES = [
    ("best", ["best", "leads outside"]),
    ("adapter_model.safetensors", ["adapter_model.safetensors", "leads outside"]),
    ("adapter_config.json", ["adapter_config.json", "leads outside"]),
    ("tokenizer.json", ["tokenizer.json", "leads outside"]),
    ("fifo", ["adapter_model.safetensors", "FIFO"]),
]
# the server reads no tokenizer from an adapter directory: that case is not one of its
RUN_CASES = [(b, w, c) for b, w in BREAKAGES for c in ("evaluate", "predict", "export", "serve")
             if not (c == "serve" and b == "tokenizer.json")]


@pytest.mark.parametrize("breakage,words,command", RUN_CASES, ids=[f"{b}-{c}" for b, _, c in RUN_CASES])
def test_cli_run_directories_are_confined(runs, tmp_path, capsys, breakage, words, command):
    from lmforge.cli import main

    run, out, base = runs
    best = run / "best"
    if breakage == "best":
        shutil.rmtree(best)
        best.symlink_to(out / "fifo-adapter")
    elif breakage == "fifo":
        (best / "adapter_model.safetensors").unlink()
        mkfifo(best / "adapter_model.safetensors")
    else:
        (best / breakage).unlink()
        (best / breakage).symlink_to(out / "fifo")
    (tmp_path / "in.txt").write_text("a text\n")
    argv = {"evaluate": ["evaluate", "--run", str(run), "--task", "glue/sst2"],
            "predict": ["predict", "--run", str(run), "--input", str(tmp_path / "in.txt")],
            "export": ["export", "--run", str(run), "--merged", "--out", str(tmp_path / "exported")],
            "serve": ["serve", "--model", str(base), "--adapter", f"x={run}"]}[command]
    assert timed(lambda: main(argv)) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("lmforge ")]
    assert len(lines) == 1 and lines[0].startswith(f"lmforge {command}: error: "), lines  # one line
    err = lines[0]
    assert all(w in err for w in words), err
    assert not (tmp_path / "exported").exists()


SWAPS = [("lora", "tokenizer.json", c) for c in ("evaluate", "predict", "export")] + \
    [("full", f, "export") for f in ("config.json", "model.safetensors", "tokenizer_config.json")]


@pytest.mark.parametrize("kind,victim,command", SWAPS)
def test_cli_refuses_a_file_swapped_for_a_symlink_at_open_time(runs, tmp_path, capsys, monkeypatch, kind, victim,
                                                               command):
    """A file of the run passes its check, then becomes a symlink to a valid copy of itself outside the
    run before it is opened: the CLI refuses it (a loader opening the checked name would follow the
    link and succeed)."""
    from lmforge.cli import main

    run, out, base = runs
    if kind == "full":   # a whole-model run: the base model directory as best/
        shutil.rmtree(run / "best")
        shutil.copytree(base, run / "best")
    victim_path = run / "best" / victim
    decoy = tmp_path / "elsewhere" / victim
    decoy.parent.mkdir()
    shutil.copy(victim_path, decoy)
    real_check = Confined._check_stat
    swapped = []

    def check_then_swap(path, st, max_bytes):
        real_check(path, st, max_bytes)
        if os.path.basename(os.fspath(path)) == victim and not swapped:
            swapped.append(path)
            victim_path.unlink()
            victim_path.symlink_to(decoy)

    monkeypatch.setattr(Confined, "_check_stat", staticmethod(check_then_swap))
    (tmp_path / "in.txt").write_text("a text\n")
    argv = {"evaluate": ["evaluate", "--run", str(run), "--task", "glue/sst2"],
            "predict": ["predict", "--run", str(run), "--input", str(tmp_path / "in.txt")],
            "export": ["export", "--run", str(run), "--merged", "--out", str(tmp_path / "exported")]}[command]
    code = timed(lambda: main(argv))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("lmforge ")]
    assert swapped, "the file was never checked"
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"lmforge {command}: error: ") and victim in lines[0] \
        and "became a symlink while being opened" in lines[0], lines
    assert not (tmp_path / "exported").exists()
