"""What keeps a create cheap in the namespace helper (issue 5), checked as behaviour.

* state.json is written whole and renamed into place, without fsync (runc does not sync its
  state either); `write_atomic` still syncs when asked to be durable (IPAM, bundles).
* The helper imports, before it forks, every module a create needs, so that no creator (and
  no init) imports anything; and it does not carry corrald's config parser at all
  (`corral.supervisor` re-exports lazily).
* `_jsonfast.dumps` without indent (the C encoder) writes what `json.dumps` writes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from corral.runtime import _jsonfast
from corral.runtime._state import STATE_FILE, Root, State, write_atomic

Runtime = Any  # conftest's Runtime: with --import-mode=importlib conftest cannot be imported


def _state(directory: Path, pid: int) -> State:
    return State(str(directory), {
        "id": "c1", "pid": pid, "start_time": 42, "bundle": "/b", "rootfs": "/b/rootfs",
        "created": "2026-11-28T00:00:00.000000000Z", "annotations": {"a": "b"},
        "cgroup": {"version": 2, "path": "/sys/fs/cgroup/corral/c1", "created": []},
        "config": {"process": {"args": ["sleep", "1"]}, "pad": "x" * 200_000},
    })


def test_state_file_is_complete_and_atomic_without_fsync(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "c1"
    d.mkdir()
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    _state(d, 1).save()
    path = d / STATE_FILE
    first_inode = path.stat().st_ino
    with open(path, "rb") as old_reader:  # a reader that opened the old file
        _state(d, 2).save()
        old = json.loads(old_reader.read())
    assert synced == []
    assert old["pid"] == 1  # the old file was replaced, not rewritten under its reader
    assert path.stat().st_ino != first_inode
    loaded = Root(str(tmp_path)).load("c1")
    assert (loaded.pid, loaded.start_time, loaded.annotations) == (2, 42, {"a": "b"})
    assert loaded.config["pad"] == "x" * 200_000  # all of a large document
    assert sorted(os.listdir(d)) == [STATE_FILE]  # no temporary file left
    assert (path.stat().st_mode & 0o777) == 0o600


def test_write_atomic_is_durable_by_default(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    write_atomic(str(tmp_path / "f"), b"data")
    assert len(synced) == 2  # the file before the rename, the directory after it
    write_atomic(str(tmp_path / "f"), b"more", durable=False)
    assert len(synced) == 2
    assert (tmp_path / "f").read_bytes() == b"more"
    assert os.listdir(tmp_path) == ["f"]


def _python(code: str, *args: str) -> str:
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_helper_does_not_load_the_config_parser() -> None:
    out = _python("import sys, corral.supervisor._nshelper\n"
                  "print(' '.join(sorted(sys.modules)))")
    loaded = set(out.split())
    assert "corral.supervisor._nshelper" in loaded
    assert not loaded & {"corral.supervisor._config", "attr", "attrs", "tomllib", "ipaddress",
                         "trio"}
    # What a create and the container's init import lazily is there before any fork.
    assert {"corral.runtime._cgroups", "corral.runtime._init", "corral.runtime._spec",
            "corral.runtime._hooks", "corral.runtime._stub", "corral.runtime._seccomp",
            "encodings.utf_8_sig"} <= loaded


def test_supervisor_package_reexports_lazily() -> None:
    import corral.supervisor as sup
    from corral.supervisor import ContainerSpec, parse_size
    from corral.supervisor._config import ContainerSpec as Real
    from corral.supervisor._units import parse_size as real_parse_size

    assert ContainerSpec is Real
    assert parse_size is real_parse_size
    assert "load_dir" in dir(sup)
    with pytest.raises(AttributeError, match="no_such_name"):
        sup.no_such_name  # noqa: B018 - the attribute access is the test
    # What mypy sees (the TYPE_CHECKING imports) is what the runtime resolves.
    source = Path(sup.__file__).read_text()
    typed = dict((name, module) for module, name in
                 re.findall(r"from \.(\w+) import (\w+) as \2", source))
    assert typed == sup._EXPORTS
    for name in typed:
        assert getattr(sup, name) is not None


_CREATOR = r"""
import json, os, sys
from corral.runtime._state import Root
from corral.supervisor import _nshelper
before = set(sys.modules)
r, w = os.pipe()
pid = os.fork()
if pid == 0:  # as the helper's creator: create and start, in a forked child
    os.close(r)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # the container's stdio, as the helper gives it log pipes
        os.dup2(null, fd)
    res = _nshelper._create_and_start(Root(sys.argv[1]), sys.argv[2], sys.argv[3])
    os.write(w, json.dumps({"result": res, "new": sorted(set(sys.modules) - before)}).encode())
    os._exit(0)
os.close(w)
out = b""
while chunk := os.read(r, 65536):
    out += chunk
os.waitpid(pid, 0)
print(out.decode())
"""


@pytest.mark.root
def test_a_create_in_the_helper_imports_nothing(rt: Runtime) -> None:
    bundle = rt.make_bundle(args=["sleep", "1000"])
    cid = rt.new_id()
    report = json.loads(_python(_CREATOR, str(rt.state_root), cid, str(bundle.path)))
    assert report["result"].get("ok"), report
    assert rt.status(cid) == "running"
    assert report["new"] == []


@pytest.mark.parametrize("doc", [
    {"a": [1, -2, 2.5, 1e300, None, True, False], "b": {}, "c": [], "d": {"e": [[{}]]}},
    {"text": "é ü \n \t \" \\ \u2028 \U0001f600", "": ""},
    [], {}, "", 0, 0.1, None,
])
def test_jsonfast_dumps_like_json(doc: Any) -> None:
    assert _jsonfast.dumps(doc) == json.dumps(doc)
    assert _jsonfast.dumps(doc, indent=1) == json.dumps(doc, indent=1)
    assert _jsonfast.loads(_jsonfast.dumps(doc)) == doc


def test_jsonfast_dumps_refuses_what_json_cannot_hold() -> None:
    with pytest.raises(ValueError, match="not JSON compliant"):
        _jsonfast.dumps({"x": float("nan")})
    with pytest.raises(TypeError, match="object is not JSON serialisable"):
        _jsonfast.dumps({"x": object()})


def test_migration_warmup_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from corral.runtime import _cgroups

    monkeypatch.setattr(_cgroups.MigrationWarmup, "wanted", False)
    before = sorted(os.listdir("/proc/self/task"))
    warmup = _cgroups.MigrationWarmup()
    assert sorted(os.listdir("/proc/self/task")) == before  # no thread was started
    warmup.wait()  # returns at once
    monkeypatch.setattr(_cgroups.MigrationWarmup, "wanted", True)
    warmup = _cgroups.MigrationWarmup()
    warmup.wait()
    assert not warmup._done.locked()
