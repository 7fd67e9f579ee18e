"""The OCI lifecycle through the runc-compatible command line."""

import json
import time

import pytest

STATE_KEYS = {"ociVersion", "id", "pid", "status", "bundle", "rootfs", "created", "owner"}
SLEEP = ("sleep", "30")
TRAP_TERM = ("sh", "-c", 'trap "exit 3" TERM; while true; do sleep 0.1; done')


def list_json(rt):
    res = rt("list", "--format", "json")
    data = json.loads(res.stdout or "null")
    return data or []


def list_ids(rt):
    return rt("list", "-q").stdout.split()


# -- spec ------------------------------------------------------------------------------------


def test_spec_writes_config(rt, tmp_path):
    d = tmp_path / "b"
    d.mkdir()
    rt("spec", "--bundle", d, cwd=d)
    config = json.loads((d / "config.json").read_text())
    assert isinstance(config["ociVersion"], str)
    assert config["ociVersion"]
    assert isinstance(config["process"]["args"], list)
    assert "path" in config["root"]
    types = {ns["type"] for ns in config["linux"]["namespaces"]}
    assert {"pid", "mount"} <= types


def test_spec_refuses_to_overwrite(rt, tmp_path):
    d = tmp_path / "b"
    d.mkdir()
    (d / "config.json").write_text('{"keep": "me"}')
    res = rt("spec", "--bundle", d, cwd=d, check=False)
    assert res.returncode == 1
    assert "config.json" in res.stderr
    assert "exists" in res.stderr
    assert json.loads((d / "config.json").read_text()) == {"keep": "me"}


# -- create / start / kill / delete ----------------------------------------------------------


@pytest.mark.root
def test_full_lifecycle(rt, make_bundle):
    b = make_bundle(args=SLEEP)
    cid = rt.new_id()
    rt("create", "--bundle", b.path, cid)

    state = rt.state(cid)
    assert state["status"] == "created"
    assert state["id"] == cid
    assert isinstance(state["pid"], int)
    assert state["pid"] > 0
    assert state["bundle"] == str(b.path)

    table = rt("list").stdout.splitlines()
    assert table[0].split()[0] == "ID"
    rows = [line.split() for line in table[1:]]
    assert [cid, str(state["pid"]), "created"] in [r[:3] for r in rows]
    assert cid in [c["id"] for c in list_json(rt)]
    assert cid in list_ids(rt)

    rt("start", cid)
    assert rt.wait_status(cid, "running") == "running"
    assert [c["status"] for c in list_json(rt) if c["id"] == cid] == ["running"]

    rt("kill", cid, "KILL")
    assert rt.wait_status(cid, "stopped") == "stopped"

    rt("delete", cid)
    assert cid not in list_ids(rt)
    res = rt("state", cid, check=False)
    assert res.returncode == 1


@pytest.mark.root
@pytest.mark.parametrize("sig", ["KILL", "SIGKILL", "9"])
def test_kill_sigkill_spellings(rt, make_bundle, sig):
    cid = rt.create(make_bundle(args=SLEEP))
    rt("start", cid)
    rt("kill", cid, sig)
    assert rt.wait_status(cid, "stopped") == "stopped"
    rt("delete", cid)
    assert cid not in list_ids(rt)


@pytest.mark.root
def test_create_does_not_start_process(rt, make_bundle, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    b = make_bundle(
        args=("sh", "-c", "echo started > /out/started; sleep 30"),
        changes=lambda c: c["mounts"].append(
            {"destination": "/out", "type": "bind", "source": str(out), "options": ["rbind", "rw"]}
        ),
    )
    cid = rt.create(b)
    time.sleep(0.5)
    assert not (out / "started").exists()
    assert rt.status(cid) == "created"
    rt("start", cid)
    deadline = time.monotonic() + 5
    while not (out / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (out / "started").read_text() == "started\n"
    rt("delete", "--force", cid)


@pytest.mark.root
def test_pid_file(rt, make_bundle, tmp_path):
    pid_file = tmp_path / "pid"
    cid = rt.create(make_bundle(args=SLEEP), "--pid-file", str(pid_file))
    pid = int(pid_file.read_text().strip())
    assert pid == rt.state(cid)["pid"]
    assert pid > 0


# -- run -------------------------------------------------------------------------------------


@pytest.mark.root
def test_run_exit_status_and_stdout(rt, make_bundle):
    b = make_bundle(args=("sh", "-c", "echo out-line; echo err-line >&2; exit 7"))
    cid = rt.new_id()
    res = rt("run", "--bundle", b.path, cid, check=False)
    assert res.returncode == 7
    assert "out-line" in res.stdout
    assert "err-line" in res.stderr
    assert cid not in list_ids(rt)
    assert rt("state", cid, check=False).returncode == 1


@pytest.mark.root
def test_run_passes_stdin(rt, make_bundle):
    b = make_bundle(args=("cat",))
    res = rt("run", "--bundle", b.path, rt.new_id(), input="from-stdin\n")
    assert res.stdout == "from-stdin\n"


@pytest.mark.root
def test_run_keep(rt, make_bundle):
    b = make_bundle(args=("sh", "-c", "exit 0"))
    cid = rt.new_id()
    rt("run", "--keep", "--bundle", b.path, cid)
    assert cid in list_ids(rt)
    assert rt.status(cid) == "stopped"
    rt("delete", cid)
    assert cid not in list_ids(rt)


@pytest.mark.root
def test_run_detach(rt, make_bundle):
    b = make_bundle(args=SLEEP)
    cid = rt.new_id()
    res = rt("run", "--detach", "--bundle", b.path, cid)
    assert res.returncode == 0
    assert rt.status(cid) == "running"
    rt("kill", cid, "KILL")
    assert rt.wait_status(cid, "stopped") == "stopped"
    rt("delete", cid)
    assert cid not in list_ids(rt)


# -- kill ------------------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.parametrize("sig", ["TERM", "SIGTERM", "15", None])
def test_kill_term_spellings(rt, make_bundle, sig):
    cid = rt.create(make_bundle(args=TRAP_TERM))
    rt("start", cid)
    assert rt.status(cid) == "running"
    time.sleep(0.2)  # let sh install its trap
    rt("kill", cid, *([sig] if sig else []))
    assert rt.wait_status(cid, "stopped") == "stopped"
    rt("delete", cid)


@pytest.mark.root
def test_kill_all(rt, make_bundle):
    b = make_bundle(args=("sh", "-c", "sleep 30 & sleep 30 & wait"))
    cid = rt.create(b)
    rt("start", cid)
    assert rt.status(cid) == "running"
    rt("kill", "--all", cid, "KILL")
    assert rt.wait_status(cid, "stopped") == "stopped"
    rt("delete", cid)
    assert cid not in list_ids(rt)


@pytest.mark.root
def test_delete_force_running(rt, make_bundle):
    cid = rt.create(make_bundle(args=SLEEP))
    rt("start", cid)
    pid = rt.state(cid)["pid"]
    rt("delete", "--force", cid)
    assert cid not in list_ids(rt)
    assert rt("state", cid, check=False).returncode == 1
    # The container's init is gone (a zombie awaiting the reaper counts as gone).
    deadline = time.monotonic() + 5
    alive = True
    while alive and time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                alive = f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            alive = False
        time.sleep(0.05)
    assert not alive


@pytest.mark.root
def test_delete_force_created(rt, make_bundle):
    cid = rt.create(make_bundle(args=SLEEP))
    rt("delete", "--force", cid)
    assert cid not in list_ids(rt)


# -- state, features, logging ----------------------------------------------------------------


@pytest.mark.root
def test_state_fields(rt, make_bundle, rootfs):
    b = make_bundle(args=SLEEP)
    cid = rt.create(b)
    state = rt.state(cid)
    assert set(state) >= STATE_KEYS
    assert set(state) - STATE_KEYS <= {"annotations"}
    assert state["id"] == cid
    assert state["bundle"] == str(b.path)
    assert state["rootfs"] == str(rootfs)
    assert isinstance(state["created"], str)
    assert state["created"]
    assert isinstance(state["ociVersion"], str)


@pytest.mark.root
def test_state_annotations(rt, make_bundle):
    b = make_bundle(args=SLEEP, changes={"annotations": {"org.example.key": "value"}})
    cid = rt.create(b)
    assert rt.state(cid)["annotations"] == {"org.example.key": "value"}


def test_features(rt):
    data = json.loads(rt("features").stdout)
    assert isinstance(data["ociVersionMin"], str)
    assert isinstance(data["ociVersionMax"], str)
    assert {"prestart", "createRuntime", "poststart", "poststop"} <= set(data["hooks"])
    assert {"bind", "rbind", "ro", "nosuid"} <= set(data["mountOptions"])
    assert {"pid", "network", "mount", "uts", "ipc", "user"} <= set(data["linux"]["namespaces"])


def test_log_json_on_failure(rt, tmp_path):
    log = tmp_path / "log.json"
    res = rt("--log", log, "--log-format", "json", "state", "t-nonexistent", check=False)
    assert res.returncode == 1
    assert res.stderr.strip()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert lines
    errors = [e for e in lines if e.get("level") == "error"]
    assert errors
    assert {"level", "msg", "time"} <= set(errors[-1])
    assert errors[-1]["msg"]
    assert errors[-1]["msg"] in res.stderr
