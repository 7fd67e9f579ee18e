"""corrald's records (supervisor/_records.py): round trip, damaged files, pruning."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
from corral.supervisor._config import ContainerSpec, RestartSpec
from corral.supervisor._records import Record, digest, load_all, prune, remove, save


def test_round_trip_and_digest(tmp_path: Path) -> None:
    spec = ContainerSpec("web", rootfs="/srv/web", command=("httpd",))
    rec = Record("web", digest(spec), "running", "", 3, 1, 1, {"kind": "exit", "code": 1},
                 {"starts_ago": []}, (123, 456), 99, 1.5)
    save(str(tmp_path), rec)
    assert load_all(str(tmp_path)) == ({"web": rec}, [])
    moved = ContainerSpec("web", rootfs="/srv/web", command=("httpd",), source="/elsewhere")
    assert digest(moved) == digest(spec)  # where the file is does not count
    assert digest(ContainerSpec("web", rootfs="/srv/web", command=("httpd", "-f"))) != \
        digest(spec)
    # A key added later leaves the digest of a file that does not set it as it was: these
    # are what corrald computed before `restart.in_place` existed (an upgraded daemon must
    # not take every adopted container's file for a changed one).
    always = ContainerSpec("web", rootfs="/srv/web", command=("httpd",),
                           restart=RestartSpec(policy="always"))
    assert (digest(spec), digest(always)) == ("09feee67445f3492c84eff21e60c695f",
                                              "fae6ebb3ae56e0079e6f9ac1152c0a7f")
    assert digest(attrs.evolve(always, restart=RestartSpec(policy="always", in_place=False))
                  ) != digest(always)
    remove(str(tmp_path), "web")
    remove(str(tmp_path), "web")  # twice is fine
    assert load_all(str(tmp_path)) == ({}, [])


@pytest.mark.parametrize(("text", "problem"), [
    ("{", "Expecting"),
    ("[]", "not a JSON object"),
    ('{"name": "a"}', "digest: missing"),
    ('{"name": "a", "digest": "d", "starts": -1}', "starts: not a count"),
    ('{"name": "a", "digest": "d", "init": [1]}', "init: not"),
    ('{"name": "a", "digest": "d", "colour": 1}', "unknown keys"),
    ('{"name": "b", "digest": "d"}', "does not match the file name"),
])
def test_a_damaged_record_is_reported_by_path_and_others_still_load(
        tmp_path: Path, text: str, problem: str) -> None:
    d = tmp_path / "corrald"
    d.mkdir()
    (d / "a.json").write_text(text)
    save(str(tmp_path), Record("good", "d"))
    (d / "good.json.tmp").write_text("half a save")
    assert load_all(str(tmp_path))[0].keys() == {"good"}
    assert (d / "good.json.tmp").exists()  # a daemon may be saving: left alone
    records, problems = load_all(str(tmp_path), clean=True)
    assert list(records) == ["good"]
    assert len(problems) == 1
    assert str(d / "a.json") in problems[0]
    assert problem in problems[0]
    assert not (d / "good.json.tmp").exists()  # an interrupted save is dropped


def test_prune_keeps_only_what_is_asked(tmp_path: Path) -> None:
    for n in ("a", "b"):
        save(str(tmp_path), Record(n, "d"))
    prune(str(tmp_path), {"b"})
    assert list(load_all(str(tmp_path))[0]) == ["b"]
    prune(str(tmp_path), set())
    assert not (tmp_path / "corrald").exists()
    assert json.dumps(Record("x", "d").to_json())  # JSON-ready
