"""corrald's records (supervisor/_records.py): round trip, damaged files, pruning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from corral.supervisor._config import ContainerSpec
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
    records, problems = load_all(str(tmp_path))
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
