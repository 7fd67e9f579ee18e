"""Pure-logic unit tests of the runtime library: no root, no containers, no cgroups made."""

import copy
import json
import os
import signal
from pathlib import Path

import pytest
from corral.runtime import _cgroups, _cli
from corral.runtime._container import parse_signal
from corral.runtime._errors import ConfigError, CorralError
from corral.runtime._init import parse_mount_options, secure_join
from corral.runtime._spec import default_spec, load_bundle, validate
from corral.runtime._state import FIFO, STATE_FILE, Root, proc_stat, validate_id, write_atomic

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC = 4096, 16384
MS_PRIVATE, MS_SLAVE, MS_SHARED = 1 << 18, 1 << 19, 1 << 20

# -- validate_id -----------------------------------------------------------------------------


@pytest.mark.parametrize("cid", ["a", "abc-123", "A_b.c+d:e@f", "x" * 1024, "...", ".hidden", "0"])
def test_validate_id_good(cid):
    assert validate_id(cid) == cid


@pytest.mark.parametrize("cid", [".", "..", "a/b", "../x", "x\0", "with space", " ", "é", "a\nb"])
def test_validate_id_bad_names_the_id(cid):
    with pytest.raises(CorralError) as exc:
        validate_id(cid)
    assert repr(cid) in str(exc.value)


def test_validate_id_empty():
    with pytest.raises(CorralError, match="empty"):
        validate_id("")


def test_validate_id_too_long():
    cid = "y" * 1025
    with pytest.raises(CorralError) as exc:
        validate_id(cid)
    assert "yyyyyyyyyy" in str(exc.value)
    assert "1024" in str(exc.value)


# -- parse_signal ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("KILL", 9),
        ("SIGKILL", 9),
        ("kill", 9),
        ("sigkill", 9),
        ("9", 9),
        ("TERM", 15),
        ("sigterm", 15),
        ("15", 15),
        ("HUP", 1),
        ("USR1", int(signal.SIGUSR1)),
        ("1", 1),
        ("64", 64),
        ("RTMIN", int(signal.SIGRTMIN)),
        ("SIGRTMIN", int(signal.SIGRTMIN)),
        ("RTMIN+1", int(signal.SIGRTMIN) + 1),
        ("rtmin+2", int(signal.SIGRTMIN) + 2),
        ("RTMAX", int(signal.SIGRTMAX)),
        ("RTMAX-1", int(signal.SIGRTMAX) - 1),
        (" KILL ", 9),
    ],
)
def test_parse_signal_good(text, want):
    assert parse_signal(text) == want


@pytest.mark.parametrize(
    "text", ["NOSUCH", "SIGNOSUCH", "0", "65", "-1", "", "RTMIN+99", "RTMAX+1", "RTMINx", "9x"]
)
def test_parse_signal_bad_names_the_text(text):
    with pytest.raises(CorralError) as exc:
        parse_signal(text)
    assert repr(text) in str(exc.value)


# -- secure_join -----------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    (root / "host" / "etc").mkdir(parents=True)
    (root / "real").mkdir()
    os.symlink("/host/etc", root / "etc")  # absolute: must resolve inside root
    os.symlink("../../../../../x", root / "real" / "up")  # climbs above root
    os.symlink("real", root / "rel")  # relative, same directory
    os.symlink("loop-b", root / "loop-a")
    os.symlink("loop-a", root / "loop-b")
    os.symlink("self", root / "self")
    os.symlink("/etc/../etc", root / "twisty")
    return root


@pytest.mark.parametrize(
    ("unsafe", "want"),
    [
        ("/etc", "host/etc"),
        ("/etc/passwd", "host/etc/passwd"),
        ("etc/passwd", "host/etc/passwd"),
        ("/twisty/x", "host/etc/x"),
        ("../../x", "x"),
        ("/../../../x/y", "x/y"),
        ("/real/up", "x"),
        ("/real/up/z", "x/z"),
        ("/rel/sub", "real/sub"),
        ("/real/./a/../b", "real/b"),
        ("/missing/a/b", "missing/a/b"),
        ("/", ""),
        ("", ""),
    ],
)
def test_secure_join_stays_inside(tree, unsafe, want):
    got = secure_join(str(tree), unsafe)
    assert got.rstrip("/") == os.path.join(str(tree), want).rstrip("/")
    assert os.path.commonpath([got, str(tree)]) == str(tree)


@pytest.mark.parametrize("unsafe", ["/loop-a", "/loop-b/x", "/self"])
def test_secure_join_symlink_loop(tree, unsafe):
    with pytest.raises(CorralError) as exc:
        secure_join(str(tree), unsafe)
    assert unsafe in str(exc.value)


# -- parse_mount_options ---------------------------------------------------------------------


def test_mount_flags():
    flags, prop, data = parse_mount_options(["ro", "nosuid", "nodev", "noexec", "rbind"])
    assert flags == MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_BIND | MS_REC
    assert prop == []
    assert data == ""


def test_mount_flags_cleared_by_later_options():
    flags, _, _ = parse_mount_options(["ro", "nosuid", "nodev", "rw", "suid"])
    assert flags == MS_NODEV


def test_mount_propagation():
    flags, prop, data = parse_mount_options(["bind", "rprivate", "shared"])
    assert flags == MS_BIND
    assert prop == [MS_PRIVATE | MS_REC, MS_SHARED]
    assert data == ""
    assert parse_mount_options(["rslave"])[1] == [MS_SLAVE | MS_REC]


def test_mount_data_passthrough():
    flags, prop, data = parse_mount_options(["nosuid", "mode=755", "size=64k", "newinstance"])
    assert flags == MS_NOSUID
    assert prop == []
    assert data == "mode=755,size=64k,newinstance"


# -- spec validation -------------------------------------------------------------------------


def _ns(cfg, kind):
    return next(i for i, n in enumerate(cfg["linux"]["namespaces"]) if n["type"] == kind)


def _drop_ns(kind):
    def change(c):
        del c["linux"]["namespaces"][_ns(c, kind)]

    return change


def _set(path, value):
    """Change setting value at a dotted path (list indexes as ints)."""

    def change(c):
        keys = path.split(".")
        obj = c
        for k in keys[:-1]:
            obj = obj[int(k)] if isinstance(obj, list) else obj[k]
        last = keys[-1]
        if isinstance(obj, list):
            obj[int(last)] = value
        else:
            obj[last] = value

    return change


def _append(path, value):
    def change(c):
        obj = c
        for k in path.split("."):
            obj = obj[k]
        obj.append(value)

    return change


def _delete(path):
    def change(c):
        keys = path.split(".")
        obj = c
        for k in keys[:-1]:
            obj = obj[k]
        del obj[keys[-1]]

    return change


def _hook(**fields):
    return _set("hooks", {"prestart": [{"path": "/bin/true", **fields}]})


BAD = [
    ("args-not-list", _set("process.args", "sh -c true"), "process.args"),
    ("args-empty", _set("process.args", []), "process.args"),
    ("args-int", _set("process.args", ["sh", 1]), "process.args[1]"),
    ("args0-empty", _set("process.args", [""]), "process.args[0]"),
    ("args-missing", _delete("process.args"), "process.args"),
    ("cwd-relative", _set("process.cwd", "tmp"), "process.cwd"),
    ("uid-negative", _set("process.user.uid", -1), "process.user.uid"),
    ("uid-string", _set("process.user.uid", "0"), "process.user.uid"),
    ("uid-bool", _set("process.user.uid", True), "process.user.uid"),
    ("gid-float", _set("process.user.gid", 1.5), "process.user.gid"),
    ("env-no-equals", _append("process.env", "JUSTAKEY"), "process.env[2]"),
    ("env-int", _append("process.env", 5), "process.env[2]"),
    (
        "cap-unknown",
        _append("process.capabilities.bounding", "CAP_NOPE"),
        "process.capabilities.bounding[3]",
    ),
    (
        "rlimit-type",
        _set("process.rlimits", [{"type": "RLIMIT_NOPE", "soft": 1, "hard": 1}]),
        "process.rlimits[0].type",
    ),
    (
        "rlimit-soft-above-hard",
        _set("process.rlimits", [{"type": "RLIMIT_NOFILE", "soft": 2048, "hard": 1024}]),
        "process.rlimits[0].soft",
    ),
    (
        "rlimit-duplicate",
        _append("process.rlimits", {"type": "RLIMIT_NOFILE", "soft": 1, "hard": 1}),
        "process.rlimits[1].type",
    ),
    ("oom-1001", _set("process.oomScoreAdj", 1001), "process.oomScoreAdj"),
    ("oom--1001", _set("process.oomScoreAdj", -1001), "process.oomScoreAdj"),
    ("terminal-string", _set("process.terminal", "yes"), "process.terminal"),
    ("ns-unknown", _set("linux.namespaces.1", {"type": "time-travel"}), "linux.namespaces[1].type"),
    ("ns-duplicate", _append("linux.namespaces", {"type": "pid"}), "linux.namespaces[5].type"),
    (
        "ns-path-missing",
        _set("linux.namespaces.1", {"type": "network", "path": "/no/such/ns"}),
        "linux.namespaces[1].path",
    ),
    (
        "ns-path-relative",
        _set("linux.namespaces.1", {"type": "network", "path": "proc/1/ns/net"}),
        "linux.namespaces[1].path",
    ),
    (
        "uidmap-without-userns",
        _set("linux.uidMappings", [{"containerID": 0, "hostID": 1000, "size": 1}]),
        "linux.uidMappings",
    ),
    (
        "sysctl-not-namespaced",
        _set("linux.sysctl", {"kernel.panic": "1"}),
        "linux.sysctl.kernel.panic",
    ),
    (
        "sysctl-net-without-netns",
        lambda c: (_drop_ns("network")(c), _set("linux.sysctl", {"net.ipv4.ip_forward": "1"})(c)),
        "linux.sysctl.net.ipv4.ip_forward",
    ),
    (
        "sysctl-value-int",
        _set("linux.sysctl", {"net.ipv4.ip_forward": 1}),
        "linux.sysctl.net.ipv4.ip_forward",
    ),
    ("mount-dest-relative", _set("mounts.0.destination", "proc"), "mounts[0].destination"),
    ("mount-dest-dotdot", _set("mounts.1.destination", "/dev/../../etc"), "mounts[1].destination"),
    (
        "mount-bind-no-source",
        _append("mounts", {"destination": "/x", "type": "bind"}),
        "mounts[7].source",
    ),
    (
        "mount-rbind-no-source",
        _append("mounts", {"destination": "/x", "options": ["rbind"]}),
        "mounts[7].source",
    ),
    ("hook-path-relative", _hook(path="bin/true"), "hooks.prestart[0].path"),
    ("hook-timeout-zero", _hook(timeout=0), "hooks.prestart[0].timeout"),
    ("hook-args-int", _hook(args=["true", 1]), "hooks.prestart[0].args[1]"),
    ("masked-relative", _set("linux.maskedPaths.0", "proc/kcore"), "linux.maskedPaths[0]"),
    ("readonly-relative", _set("linux.readonlyPaths.2", "proc/irq"), "linux.readonlyPaths[2]"),
    ("hostname-without-uts", _drop_ns("uts"), "hostname"),
    ("propagation-bogus", _set("linux.rootfsPropagation", "bogus"), "linux.rootfsPropagation"),
    ("cgroups-path-dotdot", _set("linux.cgroupsPath", "/a/../../b"), "linux.cgroupsPath"),
    ("cgroups-path-int", _set("linux.cgroupsPath", 7), "linux.cgroupsPath"),
    ("root-missing", _delete("root"), "root"),
    ("root-path-missing", _set("root", {"readonly": True}), "root.path"),
    ("root-path-int", _set("root.path", 1), "root.path"),
    ("root-readonly-string", _set("root.readonly", "true"), "root.readonly"),
    ("process-not-object", _set("process", []), "process"),
    ("annotation-not-string", _set("annotations", {"a": 1}), "annotations.a"),
]


@pytest.mark.parametrize(("change", "field"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_validate_names_the_bad_field(change, field):
    cfg = copy.deepcopy(default_spec())
    change(cfg)
    with pytest.raises(ConfigError) as exc:
        validate(cfg)
    assert exc.value.field == field
    assert field in str(exc.value)


def test_default_spec_is_valid():
    cfg = default_spec()
    assert validate(copy.deepcopy(cfg)) == cfg


def test_validate_ignores_unknown_properties():
    cfg = copy.deepcopy(default_spec())
    cfg["futureTopLevel"] = {"anything": [1, 2, 3]}
    cfg["process"]["futureProcessField"] = True
    cfg["process"]["user"]["futureUserField"] = "x"
    cfg["root"]["futureRootField"] = 1
    cfg["mounts"][0]["futureMountField"] = {}
    cfg["linux"]["futureLinuxField"] = None
    cfg["linux"]["namespaces"][0]["futureNsField"] = "x"
    cfg["process"]["rlimits"][0]["futureRlimitField"] = 0
    cfg["hooks"] = {
        "futureHookKind": [{"whatever": 1}],
        "prestart": [{"path": "/bin/true", "future": 1}],
    }
    cfg["vm"] = {"hypervisor": {"path": "relative/is/fine/here"}}
    assert validate(cfg) is not None


# -- load_bundle -----------------------------------------------------------------------------


def _write_bundle(d, cfg):
    d.mkdir(exist_ok=True)
    (d / "rootfs").mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg) if not isinstance(cfg, str) else cfg)
    return d


def test_load_bundle_ok(tmp_path):
    b = _write_bundle(tmp_path / "b", default_spec())
    bundle, cfg, rootfs = load_bundle(str(b))
    assert bundle == str(b)
    assert rootfs == str(b / "rootfs")
    assert cfg["process"]["args"] == ["sh"]


def test_load_bundle_missing_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CorralError) as exc:
        load_bundle(str(missing))
    assert str(missing) in str(exc.value)


def test_load_bundle_missing_config(tmp_path):
    with pytest.raises(CorralError) as exc:
        load_bundle(str(tmp_path))
    assert str(tmp_path / "config.json") in str(exc.value)


def test_load_bundle_invalid_json(tmp_path):
    b = _write_bundle(tmp_path / "b", '{\n  "ociVersion": "1.0.2",\n  oops\n}')
    with pytest.raises(CorralError) as exc:
        load_bundle(str(b))
    msg = str(exc.value)
    assert str(b / "config.json") in msg
    assert "line 3" in msg
    assert "column 3" in msg


def test_load_bundle_invalid_field(tmp_path):
    cfg = default_spec()
    cfg["process"]["args"] = ["sh", None]
    b = _write_bundle(tmp_path / "b", cfg)
    with pytest.raises(ConfigError) as exc:
        load_bundle(str(b))
    assert exc.value.field == "process.args[1]"
    assert str(b / "config.json") in str(exc.value)
    assert "process.args[1]" in str(exc.value)


def test_load_bundle_rootfs_missing(tmp_path):
    cfg = default_spec()
    cfg["root"]["path"] = "no-rootfs-here"
    b = _write_bundle(tmp_path / "b", cfg)
    with pytest.raises(ConfigError) as exc:
        load_bundle(str(b))
    assert exc.value.field == "root.path"
    assert str(b / "no-rootfs-here") in str(exc.value)


def test_load_bundle_top_level_not_object(tmp_path):
    b = _write_bundle(tmp_path / "b", "[1, 2]")
    with pytest.raises(ConfigError) as exc:
        load_bundle(str(b))
    assert str(b / "config.json") in str(exc.value)


# -- CLI parsing -----------------------------------------------------------------------------

CREATE_FLAGS = _cli.COMMANDS["create"][0]
RUN_FLAGS = _cli.COMMANDS["run"][0]


@pytest.mark.parametrize(
    "argv",
    [
        ["--bundle", "/b", "id1"],
        ["--bundle=/b", "id1"],
        ["-bundle", "/b", "id1"],
        ["-bundle=/b", "id1"],
        ["-b", "/b", "id1"],
        ["id1", "--bundle", "/b"],
    ],
)
def test_parse_value_flag_spellings(argv):
    opts, pos = _cli._parse(argv, CREATE_FLAGS, "create")
    assert opts == {"bundle": "/b"}
    assert pos == ["id1"]


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["--detach"], True),
        (["-d"], True),
        (["-detach"], True),
        (["--detach=true"], True),
        (["--detach=1"], True),
        (["--detach=false"], False),
        (["--detach=FALSE"], False),
        (["--detach=0"], False),
    ],
)
def test_parse_bool_flag(argv, want):
    opts, pos = _cli._parse([*argv, "cid"], RUN_FLAGS, "run")
    assert opts == {"detach": want}
    assert pos == ["cid"]


def test_parse_bool_flag_bad_value():
    with pytest.raises(_cli.UsageError, match="--detach"):
        _cli._parse(["--detach=maybe", "cid"], RUN_FLAGS, "run")


def test_parse_double_dash_ends_flags():
    opts, pos = _cli._parse(["--no-pivot", "--", "--bundle", "x"], CREATE_FLAGS, "create")
    assert opts == {"no_pivot": True}
    assert pos == ["--bundle", "x"]


def test_parse_stop_at_positional():
    opts, pos = _cli._parse(
        ["-b", "x", "cid", "sh", "-c", "--bundle"], CREATE_FLAGS, "exec", stop_at_positional=True
    )
    assert opts == {"bundle": "x"}
    assert pos == ["cid", "sh", "-c", "--bundle"]


def _main(capsys, *argv):
    rc = _cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_main_unknown_flag(capsys, tmp_path):
    rc, _, err = _main(capsys, "--root", str(tmp_path), "create", "--bogus-flag", "x")
    assert rc == 1
    assert "--bogus-flag" in err
    assert os.listdir(tmp_path) == []


def test_main_unknown_global_flag(capsys):
    rc, _, err = _main(capsys, "--no-such-global", "list")
    assert rc == 1
    assert "--no-such-global" in err


def test_main_missing_value(capsys, tmp_path):
    rc, _, err = _main(capsys, "--root", str(tmp_path), "create", "--bundle")
    assert rc == 1
    assert "--bundle" in err
    assert "value" in err


@pytest.mark.parametrize(
    "cmd", [*_cli.COMMANDS, "checkpoint", "restore", "exec", "ps", "pause", "update"]
)
def test_main_command_help_exits_0(capsys, cmd):
    rc, out, _ = _main(capsys, cmd, "--help")
    assert rc == 0
    assert cmd in out
    rc, out, _ = _main(capsys, cmd, "-h")
    assert rc == 0


def test_main_global_help(capsys):
    rc, out, _ = _main(capsys, "--help")
    assert rc == 0
    for cmd in _cli.COMMANDS:
        assert cmd in out
    rc, out, _ = _main(capsys, "help", "create")
    assert rc == 0
    assert "--bundle" in out


def test_main_no_command(capsys):
    rc, out, _ = _main(capsys)
    assert rc == 1
    assert "usage" in out


@pytest.mark.parametrize("flag", ["--version", "-v"])
def test_main_version(capsys, flag):
    rc, out, _ = _main(capsys, flag)
    assert rc == 0
    assert out.startswith(f"corral version {_cli.VERSION}\n")
    assert "spec: " in out


def test_main_unknown_command(capsys):
    rc, _, err = _main(capsys, "frobnicate", "x")
    assert rc == 1
    assert "frobnicate" in err


def test_main_not_yet_command_names_it(capsys):
    rc, _, err = _main(capsys, "checkpoint", "x")
    assert rc == 1
    assert "checkpoint" in err


def test_main_list_bad_format(capsys, tmp_path):
    rc, out, err = _main(capsys, "--root", str(tmp_path), "list", "--format", "yaml")
    assert rc == 1
    assert "yaml" in err
    assert out == ""


def test_main_bad_log_format(capsys, tmp_path):
    rc, _, err = _main(capsys, "--root", str(tmp_path), "--log-format", "xml", "list")
    assert rc == 1
    assert "xml" in err


@pytest.mark.parametrize(
    "root_args", [("--root", "{}"), ("--root={}",), ("-root", "{}"), ("-root={}",)]
)
def test_main_global_root_spellings(capsys, tmp_path, root_args):
    _fake_container(tmp_path, "c1", pid=0, start_time=0)
    args = [a.format(tmp_path) for a in root_args]
    rc, out, err = _main(capsys, *args, "list", "--format", "json")
    assert rc == 0, err
    assert [s["id"] for s in json.loads(out)] == ["c1"]
    assert json.loads(out)[0]["status"] == "stopped"


def test_main_state_unknown_id(capsys, tmp_path):
    rc, out, err = _main(capsys, "--root", str(tmp_path), "state", "no-such-ctr")
    assert rc == 1
    assert "no-such-ctr" in err
    assert out == ""


def test_main_spec_writes_valid_config(capsys, tmp_path):
    rc, _, err = _main(capsys, "spec", "--bundle", str(tmp_path))
    assert rc == 0, err
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg == default_spec()
    validate(cfg)


# -- write_atomic ----------------------------------------------------------------------------


def test_write_atomic_replaces(tmp_path):
    path = tmp_path / "f.json"
    write_atomic(str(path), b"first")
    assert path.read_bytes() == b"first"
    assert (path.stat().st_mode & 0o777) == 0o600
    write_atomic(str(path), b"second, longer content", 0o644)
    assert path.read_bytes() == b"second, longer content"
    write_atomic(str(path), b"3")
    assert path.read_bytes() == b"3"
    assert os.listdir(tmp_path) == ["f.json"]


def test_write_atomic_failure_leaves_no_temp_file(tmp_path):
    # The target is a non-empty directory: the rename fails and nothing may be left behind.
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(IsADirectoryError):
        write_atomic(str(target), b"data")
    assert sorted(os.listdir(tmp_path)) == ["target"]
    assert os.listdir(target) == ["keep"]


# -- state and status ------------------------------------------------------------------------


def _fake_container(root_dir, cid, *, pid, start_time, fifo=False, cgroup=None):
    d = root_dir / cid
    d.mkdir(parents=True)
    data = {
        "id": cid,
        "pid": pid,
        "start_time": start_time,
        "bundle": "/b",
        "rootfs": "/b/rootfs",
        "created": "2024-01-01T00:00:00.000000000Z",
        "owner": "",
        "annotations": {},
        "cgroup": cgroup or {},
        "config": {},
    }
    (d / STATE_FILE).write_text(json.dumps(data))
    if fifo:
        os.mkfifo(d / FIFO)
    return d


def _absent_pid():
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    for pid in range(pid_max - 1, 1, -1):
        if not os.path.exists(f"/proc/{pid}"):
            return pid
    raise AssertionError("no free pid")


def test_root_ids(tmp_path):
    _fake_container(tmp_path, "b-ctr", pid=0, start_time=0)
    _fake_container(tmp_path, "a-ctr", pid=0, start_time=0)
    (tmp_path / "half-made").mkdir()  # an aborted create: no state.json
    (tmp_path / "stray-file").write_text("")
    assert Root(str(tmp_path)).ids() == ["a-ctr", "b-ctr"]
    assert Root(str(tmp_path / "missing")).ids() == []


def test_status_dead_pid_is_stopped(tmp_path):
    _fake_container(tmp_path, "c", pid=_absent_pid(), start_time=12345, fifo=True)
    st = Root(str(tmp_path)).load("c")
    assert st.status() == "stopped"
    assert st.oci()["pid"] == 0
    assert st.oci()["status"] == "stopped"


def test_status_zero_pid_is_stopped(tmp_path):
    _fake_container(tmp_path, "c", pid=0, start_time=0)
    assert Root(str(tmp_path)).load("c").status() == "stopped"


def test_status_created_and_running(tmp_path):
    me = os.getpid()
    stat = proc_stat(me)
    assert stat is not None
    _fake_container(tmp_path, "c", pid=me, start_time=stat[1], fifo=True)
    root = Root(str(tmp_path))
    st = root.load("c")
    assert st.status() == "created"
    assert st.oci() == {
        "ociVersion": "1.0.2",
        "id": "c",
        "pid": me,
        "status": "created",
        "bundle": "/b",
        "rootfs": "/b/rootfs",
        "created": "2024-01-01T00:00:00.000000000Z",
        "owner": "",
    }
    os.unlink(tmp_path / "c" / FIFO)
    assert root.load("c").status() == "running"


def test_status_pid_reuse_guard(tmp_path):
    me = os.getpid()
    stat = proc_stat(me)
    assert stat is not None
    _fake_container(tmp_path, "c", pid=me, start_time=stat[1] + 1, fifo=True)
    st = Root(str(tmp_path)).load("c")
    assert not st.init_alive()
    assert st.status() == "stopped"
    assert st.oci()["pid"] == 0


def test_state_save_round_trip(tmp_path):
    _fake_container(tmp_path, "c", pid=0, start_time=0)
    root = Root(str(tmp_path))
    st = root.load("c")
    st.annotations = {"k": "v"}
    st.save()
    again = root.load("c")
    assert again.to_json() == st.to_json()
    assert again.oci()["annotations"] == {"k": "v"}
    assert sorted(os.listdir(tmp_path / "c")) == [STATE_FILE]


def test_load_corrupt_state_names_the_id(tmp_path):
    d = tmp_path / "broken-ctr"
    d.mkdir()
    (d / STATE_FILE).write_text("{not json")
    with pytest.raises(CorralError, match="broken-ctr"):
        Root(str(tmp_path)).load("broken-ctr")


def test_load_rejects_bad_id(tmp_path):
    with pytest.raises(CorralError, match=r"\.\./x"):
        Root(str(tmp_path)).load("../x")


def test_make_container_dir_twice(tmp_path):
    root = Root(str(tmp_path / "r"))
    root.make_container_dir("dup")
    with pytest.raises(CorralError, match="dup"):
        root.make_container_dir("dup")


# -- cgroup paths ----------------------------------------------------------------------------

MEM = "/sys/fs/cgroup/memory"


@pytest.mark.parametrize(
    ("own", "mount_root", "cgroups_path", "want"),
    [
        ("/process_api/abc", "/", "/corral/x", f"{MEM}/corral/x"),
        ("/", "/", "/corral/x", f"{MEM}/corral/x"),
        ("/process_api/abc", "/", "corral/x", f"{MEM}/process_api/abc/corral/x"),
        ("/", "/", "corral/x", f"{MEM}/corral/x"),
        ("/user.slice", "/", "a/./b//c/", f"{MEM}/user.slice/a/b/c"),
        ("/", "/", "//a//b/", f"{MEM}/a/b"),
        # Docker without a cgroup namespace: own cgroup shown in full, mount rooted there.
        ("/docker/xyz", "/docker/xyz", "c/x", f"{MEM}/c/x"),
        ("/docker/xyz/sub", "/docker/xyz", "c/x", f"{MEM}/sub/c/x"),
        ("/docker/xyz", "/docker/xyz", "/abs/x", f"{MEM}/abs/x"),
    ],
)
def test_cgroup_rel(own, mount_root, cgroups_path, want):
    assert _cgroups._rel(MEM, own, mount_root, cgroups_path) == want


def _cgroup_layout():
    """(v2 at /sys/fs/cgroup?, v1 mountpoints, unified mountpoint or None) from mountinfo."""
    v2_root = False
    v1: list[str] = []
    unified = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            point = left.split()[4]
            fstype = right.split()[0]
            if not point.startswith(_cgroups.CGROUP_ROOT):
                continue
            if fstype == "cgroup2":
                if point == _cgroups.CGROUP_ROOT:
                    v2_root = True
                elif point == _cgroups.CGROUP_ROOT + "/unified":
                    unified = point
            elif fstype == "cgroup":
                v1.append(point)
    return v2_root, v1, unified


def test_new_manager_default_paths():
    v2_root, v1, unified = _cgroup_layout()
    if not v2_root and not v1:
        pytest.skip("no cgroup filesystem under /sys/fs/cgroup")
    mgr = _cgroups.new_manager(None, "unit-ctr")
    if v2_root:
        assert isinstance(mgr, _cgroups.V2Manager)
        assert mgr.path == "/sys/fs/cgroup/corral/unit-ctr"
        return
    assert isinstance(mgr, _cgroups.V1Manager)
    assert sorted(mgr.mounts.values()) == sorted(v1)
    assert set(mgr.paths) == set(mgr.mounts)
    for key, d in mgr.paths.items():
        assert d == os.path.join(mgr.mounts[key], "corral", "unit-ctr"), key
    if "/sys/fs/cgroup/memory" in v1:
        assert mgr.paths["memory"] == "/sys/fs/cgroup/memory/corral/unit-ctr"
    if "/sys/fs/cgroup/systemd" in v1:
        assert mgr.paths["name=systemd"] == "/sys/fs/cgroup/systemd/corral/unit-ctr"
    if unified:
        assert mgr.unified == "/sys/fs/cgroup/unified/corral/unit-ctr"
    else:
        assert mgr.unified is None
    assert mgr.created == []
    for d in mgr.paths.values():
        assert not os.path.exists(d)
    state = mgr.to_state()
    again = _cgroups.manager_from_state(json.loads(json.dumps(state)))
    assert again.to_state() == state


def test_new_manager_explicit_paths():
    v2_root, v1, _ = _cgroup_layout()
    if v2_root or not v1:
        pytest.skip("not a cgroup v1 / hybrid host")
    if any(h.mount_root != "/" for h in _cgroups.hierarchies()):
        pytest.skip("a cgroup hierarchy is mounted below its root")
    own = _cgroups.own_cgroups()
    absolute = _cgroups.new_manager("/corraltest/abs", "ignored-id")
    relative = _cgroups.new_manager("corraltest/rel", "ignored-id")
    assert isinstance(absolute, _cgroups.V1Manager)
    assert isinstance(relative, _cgroups.V1Manager)
    for key, mount in absolute.mounts.items():
        assert absolute.paths[key] == f"{mount}/corraltest/abs"
        want = os.path.normpath(f"{mount}/{own.get(key, '/')}/corraltest/rel")
        assert relative.paths[key] == want, key


def test_new_manager_refuses_dotdot_and_systemd():
    with pytest.raises(ConfigError) as exc:
        _cgroups.new_manager("/a/../../etc", "x")
    assert exc.value.field == "linux.cgroupsPath"
    with pytest.raises(CorralError, match="systemd"):
        _cgroups.new_manager(None, "x", systemd=True)


def test_v1_manager_pids_and_destroy_only_created(tmp_path):
    # A fake hierarchy in a plain directory: destroy removes exactly what `created` lists.
    mount = tmp_path / "pids"
    parent = mount / "kept-parent"
    d = parent / "ctr"
    d.mkdir(parents=True)
    mgr = _cgroups.V1Manager({"pids": str(d)}, {"pids": str(mount)}, created=[str(d)])
    assert mgr.pids() == []
    (d / "cgroup.procs").write_text("11\n12\n")
    assert mgr.pids() == [11, 12]
    (d / "cgroup.procs").unlink()
    mgr.destroy()
    assert not d.exists()
    assert parent.is_dir()
