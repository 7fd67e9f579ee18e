"""corrald's config files: units, container files, the directory loader, corrald.toml,
to_oci and plan_reload. Pure logic: no root, no containers."""

from __future__ import annotations

import copy
import signal

import pytest
from corral.runtime import _resources
from corral.runtime._spec import DEFAULT_PATH, default_spec, validate
from corral.supervisor import (
    ConfigError,
    ContainerSpec,
    DaemonSpec,
    LogSpec,
    Mount,
    ReloadPlan,
    ResourceSpec,
    RestartSpec,
    StopSpec,
    User,
    load_container,
    load_daemon,
    load_dir,
    parse_duration,
    parse_size,
    plan_reload,
    to_oci,
)

MIN = '[container]\nrootfs = "/srv/rootfs"\ncommand = ["/bin/true"]\n'


def write(tmp_path, text, name="web.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# -- units ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("100ms", 0.1), ("10s", 10.0), ("1m", 60.0), ("1h", 3600.0), ("1.5s", 1.5),
    ("0s", 0.0), ("300ms", 0.3), ("1m30s", 90.0), ("1h 30m", 5400.0), (" 2s ", 2.0),
    (".5s", 0.5),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text, "f.toml", "stop.timeout") == seconds


@pytest.mark.parametrize("value", [
    10, 1.5, True, "10", "", "s", "-1s", "10S", "1 minute", "1d", "1.s", "1e3s", "10s5",
    "nan", "inf", "1ms5", ["1s"],
])
def test_parse_duration_refuses(value):
    with pytest.raises(ConfigError) as exc:
        parse_duration(value, "f.toml", "stop.timeout")
    assert exc.value.file == "f.toml"
    assert exc.value.key == "stop.timeout"
    assert str(exc.value).startswith("f.toml: stop.timeout: ")


def test_parse_duration_bare_number_says_why():
    with pytest.raises(ConfigError, match="ambiguous"):
        parse_duration(10, "f.toml", "stop.timeout")


@pytest.mark.parametrize(("value", "size"), [
    ("64M", 64 << 20), ("512K", 512 << 10), ("1G", 1 << 30), ("100", 100), (100, 100),
    ("1.5G", 3 << 29), ("64m", 64 << 20), ("64MiB", 64 << 20), ("64MB", 64 << 20),
    ("2T", 2 << 40), ("0", 0), ("10B", 10),
])
def test_parse_size(value, size):
    assert parse_size(value, "f.toml", "resources.memory") == size


@pytest.mark.parametrize("value", [
    "-64M", -1, "64X", "M", "", "1.5", "1e3", "64 MM", 1.5, True, "0x10", "100iB", ["1M"],
])
def test_parse_size_refuses(value):
    with pytest.raises(ConfigError) as exc:
        parse_size(value, "f.toml", "resources.memory")
    assert (exc.value.file, exc.value.key) == ("f.toml", "resources.memory")


def test_config_error_message_and_pickle():
    import pickle

    err = ConfigError("/etc/x.toml", "restart.backoff_max", "too small")
    assert str(err) == "/etc/x.toml: restart.backoff_max: too small"
    assert str(ConfigError("/etc/x.toml", "", "invalid TOML")) == "/etc/x.toml: invalid TOML"
    back = pickle.loads(pickle.dumps(err))
    assert (back.file, back.key, back.problem, str(back)) == (
        err.file, err.key, err.problem, str(err))


# -- a good file ---------------------------------------------------------------------------


def test_minimal_file_gets_the_docker_and_systemd_defaults(tmp_path):
    spec = load_container(write(tmp_path, MIN))
    assert spec.name == "web"
    assert spec.source == str(tmp_path / "web.toml")
    assert spec.rootfs == "/srv/rootfs"
    assert spec.bundle is None
    assert spec.command == ("/bin/true",)
    assert spec.resources == ResourceSpec(None, None, None)
    r = spec.restart
    assert r.policy == "no"  # Docker's and systemd's default
    assert (r.backoff_initial, r.backoff_factor, r.backoff_max, r.reset_after) == (
        0.1, 2.0, 60.0, 10.0)  # Docker: 100 ms, x2, 1 min cap, reset after 10 s
    assert (r.start_limit_burst, r.start_limit_interval) == (5, 10.0)  # systemd
    assert r.max_retries == 0
    assert r.success_exit_codes == (0,)
    assert r.backoff_jitter == 0.1
    assert spec.stop == StopSpec(signal.SIGTERM, 10.0)  # Docker: SIGTERM, 10 s
    assert spec.logs == LogSpec(10 << 20, 5)
    assert spec == ContainerSpec("web", rootfs="/srv/rootfs", command=("/bin/true",))


FULL = """
[container]
rootfs = "/srv/web/rootfs"
command = ["/bin/httpd", "-f", "-p", "8080"]
env = { PORT = "8080", A_B = "x=y" }
cwd = "/www"
user = "1000:100"
hostname = "web-1.example"
mounts = [
  { source = "/srv/data", destination = "/data", readonly = true },
  { source = "/srv/cache", destination = "/cache" },
]

[resources]
memory = "64M"
pids = 100
cpus = 0.5

[restart]
policy = "on-failure"
max_retries = 3
success_exit_codes = [3, 0, 3]
backoff_initial = "250ms"
backoff_factor = 1.5
backoff_max = "30s"
backoff_jitter = 0.0
reset_after = "1m"
start_limit_burst = 10
start_limit_interval = "1m30s"

[stop]
signal = "SIGQUIT"
timeout = "1.5s"

[logs]
max_size = "1M"
keep = 0
"""


def test_full_file(tmp_path):
    spec = load_container(write(tmp_path, FULL))
    assert spec.command == ("/bin/httpd", "-f", "-p", "8080")
    assert spec.env == (("A_B", "x=y"), ("PORT", "8080"))
    assert spec.cwd == "/www"
    assert spec.user == User(1000, 100)
    assert spec.hostname == "web-1.example"
    assert spec.mounts == (Mount("/srv/data", "/data", True), Mount("/srv/cache", "/cache"))
    assert spec.resources == ResourceSpec(64 << 20, 100, 0.5)
    assert spec.restart == RestartSpec(
        policy="on-failure", max_retries=3, success_exit_codes=(0, 3), backoff_initial=0.25,
        backoff_factor=1.5, backoff_max=30.0, backoff_jitter=0.0, reset_after=60.0,
        start_limit_burst=10, start_limit_interval=90.0)
    assert spec.stop == StopSpec(signal.SIGQUIT, 1.5)
    assert spec.logs == LogSpec(1 << 20, 0)


@pytest.mark.parametrize(("text", "expect"), [
    ('[stop]\nsignal = "TERM"', signal.SIGTERM),
    ('[stop]\nsignal = "sigint"', signal.SIGINT),
    ('[stop]\nsignal = "SIGRTMIN"', signal.SIGRTMIN),
])
def test_signal_names(tmp_path, text, expect):
    assert load_container(write(tmp_path, MIN + text)).stop.signal == expect


def test_user_without_group_is_gid_0(tmp_path):
    spec = load_container(write(tmp_path, MIN.replace("rootfs", 'user = "7"\nrootfs', 1)))
    assert spec.user == User(7, 0)


def test_bundle_without_command(tmp_path):
    spec = load_container(write(tmp_path, '[container]\nbundle = "/srv/bundle"\n'))
    assert (spec.bundle, spec.rootfs, spec.command) == ("/srv/bundle", None, None)


def test_integer_cpus_and_byte_count_memory(tmp_path):
    spec = load_container(write(tmp_path, MIN + "[resources]\ncpus = 2\nmemory = 1048576\n"))
    assert spec.resources == ResourceSpec(1 << 20, None, 2.0)


# -- every kind of bad file ----------------------------------------------------------------

C = "[container]\n"
GOOD_C = 'rootfs = "/r"\ncommand = ["/bin/true"]\n'

BAD = [
    # (file body, the key the error names, a piece of the problem)
    (MIN + "[volumes]\nmode = 'host'\n", "volumes", "unknown section"),
    ('rootfs = "/r"\n' + MIN, "rootfs", "outside a section"),
    (MIN + 'restart = "always"\n', "container.restart", "unknown key"),
    ("[restart]\npolicy = 'always'\n", "container", "required"),
    (MIN + "[restart]\nbackof_max = '1m'\n", "restart.backof_max", "unknown key"),
    (C + GOOD_C + "image = 'busybox'\n", "container.image", "unknown key"),
    (MIN + "[logs]\nmax_files = 3\n", "logs.max_files", "unknown key"),
    ("container = 5\n", "container", "must be a table"),
    (MIN + "[resources]\npids = '100'\n", "resources.pids", "must be an integer"),
    (MIN + "[resources]\npids = true\n", "resources.pids", "must be an integer"),
    (MIN + "[resources]\npids = 0\n", "resources.pids", "out of range"),
    (MIN + "[resources]\nmemory = '-64M'\n", "resources.memory", "negative"),
    (MIN + "[resources]\nmemory = -1\n", "resources.memory", "negative"),
    (MIN + "[resources]\nmemory = '0'\n", "resources.memory", "more than 0"),
    (MIN + "[resources]\nmemory = '64Q'\n", "resources.memory", "not a size"),
    (MIN + "[resources]\ncpus = 0\n", "resources.cpus", "too small"),
    (MIN + "[resources]\ncpus = -1.0\n", "resources.cpus", "too small"),
    (MIN + "[resources]\ncpus = nan\n", "resources.cpus", "finite"),
    (MIN + "[resources]\ncpus = '0.5'\n", "resources.cpus", "must be a number"),
    (MIN + "[restart]\nbackoff_max = '1 minute'\n", "restart.backoff_max", "not a duration"),
    (MIN + "[restart]\nbackoff_max = 60\n", "restart.backoff_max", "duration string"),
    (MIN + "[restart]\nreset_after = '-1s'\n", "restart.reset_after", "negative"),
    (MIN + "[stop]\ntimeout = '10'\n", "stop.timeout", "not a duration"),
    (MIN + "[restart]\npolicy = 'sometimes'\n", "restart.policy", "not a restart policy"),
    (MIN + "[restart]\npolicy = 'on-failure:3'\n", "restart.policy", "not a restart policy"),
    (MIN + "[restart]\npolicy = 1\n", "restart.policy", "must be a string"),
    (MIN + "[restart]\nmax_retries = -1\n", "restart.max_retries", "out of range"),
    (MIN + "[restart]\npolicy = 'always'\nmax_retries = 3\n", "restart.max_retries",
     "on-failure"),
    (MIN + "[restart]\nsuccess_exit_codes = [0, 256]\n", "restart.success_exit_codes[1]",
     "out of range"),
    (MIN + "[restart]\nsuccess_exit_codes = 0\n", "restart.success_exit_codes", "array"),
    (MIN + "[restart]\nbackoff_factor = 0.5\n", "restart.backoff_factor", "at least 1"),
    (MIN + "[restart]\nbackoff_jitter = 1.0\n", "restart.backoff_jitter", "[0, 1)"),
    (MIN + "[restart]\nbackoff_jitter = -0.1\n", "restart.backoff_jitter", "[0, 1)"),
    (MIN + "[restart]\nbackoff_initial = '2m'\n", "restart.backoff_max", "less than"),
    (MIN + "[restart]\nstart_limit_burst = 0\n", "restart.start_limit_burst", "out of range"),
    (MIN + "[restart]\nin_place = 'yes'\n", "restart.in_place", "true or false"),
    (MIN + "[stop]\nsignal = 'SIGFOO'\n", "stop.signal", "not a signal name"),
    (MIN + "[stop]\nsignal = '15'\n", "stop.signal", "not a signal name"),
    (MIN + "[stop]\nsignal = 15\n", "stop.signal", "must be a string"),
    (MIN + "[logs]\nkeep = -1\n", "logs.keep", "out of range"),
    (MIN + "[logs]\nmax_size = '0K'\n", "logs.max_size", "more than 0"),
    (C + 'rootfs = "/r"\nbundle = "/b"\ncommand = ["x"]\n', "container.bundle", "exactly one"),
    (C + 'command = ["x"]\n', "container.rootfs", "exactly one"),
    (C + 'rootfs = "/r"\n', "container.command", "required with container.rootfs"),
    (C + 'rootfs = "r"\ncommand = ["x"]\n', "container.rootfs", "absolute"),
    (C + 'bundle = "./b"\n', "container.bundle", "absolute"),
    (C + 'rootfs = "/r"\ncommand = []\n', "container.command", "empty"),
    (C + 'rootfs = "/r"\ncommand = "/bin/sh -c x"\n', "container.command", "array"),
    (C + 'rootfs = "/r"\ncommand = ["/bin/sh", 1]\n', "container.command[1]", "string"),
    (C + 'rootfs = "/r"\ncommand = [""]\n', "container.command[0]", "empty"),
    (C + 'rootfs = "/r\\u0000x"\ncommand = ["x"]\n', "container.rootfs", "NUL"),
    (C + GOOD_C + "env = { PORT = 8080 }\n", "container.env.PORT", "must be a string"),
    (C + GOOD_C + 'env = ["A=1"]\n', "container.env", "table"),
    (C + GOOD_C + 'env = { "A=B" = "1" }\n', "container.env.A=B", "variable name"),
    (C + GOOD_C + 'cwd = "www"\n', "container.cwd", "absolute"),
    (C + GOOD_C + 'user = "nobody"\n', "container.user", "numeric"),
    (C + GOOD_C + 'user = "1000:staff"\n', "container.user", "numeric"),
    (C + GOOD_C + 'user = "-1"\n', "container.user", "numeric"),
    (C + GOOD_C + 'user = "4294967295"\n', "container.user", "0..4294967294"),
    (C + GOOD_C + "user = 1000\n", "container.user", "must be a string"),
    (C + GOOD_C + 'hostname = "bad_host"\n', "container.hostname", "not a hostname"),
    (C + GOOD_C + f'hostname = "{"a" * 65}"\n', "container.hostname", "not a hostname"),
    (C + GOOD_C + 'mounts = [{ source = "/s", destination = "data" }]\n',
     "container.mounts[0].destination", "absolute"),
    (C + GOOD_C + 'mounts = [{ source = "/s", destination = "/a/../etc" }]\n',
     "container.mounts[0].destination", "'..'"),
    (C + GOOD_C + 'mounts = [{ source = "/s", destination = "/" }]\n',
     "container.mounts[0].destination", "cannot be /"),
    (C + GOOD_C + 'mounts = [{ source = "s", destination = "/d" }]\n',
     "container.mounts[0].source", "absolute"),
    (C + GOOD_C + 'mounts = [{ destination = "/d" }]\n', "container.mounts[0].source",
     "required"),
    (C + GOOD_C + 'mounts = [{ source = "/s", destination = "/d", ro = true }]\n',
     "container.mounts[0].ro", "unknown key"),
    (C + GOOD_C + 'mounts = [{ source = "/s", destination = "/d", readonly = "yes" }]\n',
     "container.mounts[0].readonly", "true or false"),
    (C + GOOD_C + 'mounts = [{ source = "/s", destination = "/d" }, '
     '{ source = "/t", destination = "/d/" }]\n', "container.mounts[1].destination",
     "already"),
    (C + GOOD_C + 'mounts = ["/s:/d"]\n', "container.mounts[0]", "must be a table"),
]


@pytest.mark.parametrize(("text", "key", "problem"), BAD)
def test_bad_file_names_file_and_key(tmp_path, text, key, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_container(path)
    err = exc.value
    assert err.file == str(path)
    assert err.key == key
    assert problem in err.problem
    assert str(err) == f"{path}: {key}: {err.problem}"


def test_invalid_toml_names_the_line(tmp_path):
    path = write(tmp_path, MIN + "[restart]\npolicy = always\n")
    with pytest.raises(ConfigError) as exc:
        load_container(path)
    assert exc.value.line == 5
    assert str(exc.value).startswith(f"{path}: invalid TOML at line 5, column ")


def test_duplicate_key_is_invalid_toml(tmp_path):
    path = write(tmp_path, MIN + '[stop]\nsignal = "SIGINT"\nsignal = "SIGTERM"\n')
    with pytest.raises(ConfigError, match="invalid TOML at line 6") as exc:
        load_container(path)
    assert exc.value.line == 6


def test_not_utf8(tmp_path):
    path = tmp_path / "web.toml"
    path.write_bytes(MIN.encode() + b"# \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_container(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read") as exc:
        load_container(tmp_path / "gone.toml")
    assert exc.value.file == str(tmp_path / "gone.toml")


@pytest.mark.parametrize("name", [
    "my app", "-x", ".hidden", "_x", "a+b", "a:b", "a@b", "é", "x" * 129,
])
def test_bad_file_name(tmp_path, name):
    path = write(tmp_path, MIN, f"{name}.toml")
    with pytest.raises(ConfigError) as exc:
        load_container(path)
    assert exc.value.file == str(path)
    assert repr(name) in str(exc.value)


@pytest.mark.parametrize("name", ["web", "Web-2", "db.primary", "a_b", "0", "x" * 128])
def test_good_file_name(tmp_path, name):
    assert load_container(write(tmp_path, MIN, f"{name}.toml")).name == name


# -- the directory -------------------------------------------------------------------------


def test_load_dir_skips_bad_files_and_keeps_good_ones(tmp_path):
    write(tmp_path, MIN, "api.toml")
    write(tmp_path, MIN + "[restart]\npolicy = 'always'\n", "web.toml")
    write(tmp_path, MIN + "[restart]\npolicy = 'nope'\n", "bad.toml")
    write(tmp_path, MIN, "bad name.toml")
    write(tmp_path, "[container\n", "broken.toml")
    write(tmp_path, "not toml at all", "README")
    write(tmp_path, "x", "web.toml.swp")
    write(tmp_path, MIN, "web.toml~")
    (tmp_path / "dir.toml").mkdir()
    specs, errors = load_dir(tmp_path)
    assert sorted(specs) == ["api", "web"]
    assert specs["web"].restart.policy == "always"
    assert [(e.file, e.key) for e in errors] == [
        (str(tmp_path / "bad name.toml"), ""),
        (str(tmp_path / "bad.toml"), "restart.policy"),
        (str(tmp_path / "broken.toml"), ""),
        (str(tmp_path / "dir.toml"), ""),
    ]
    assert "not a regular file" in str(errors[3])


def test_load_dir_empty(tmp_path):
    assert load_dir(tmp_path) == ({}, [])


def test_load_dir_missing_directory_raises(tmp_path):
    # Not "no containers": a reload that read nothing must not stop everything.
    with pytest.raises(ConfigError, match="cannot list") as exc:
        load_dir(tmp_path / "gone")
    assert exc.value.file == str(tmp_path / "gone")


# -- corrald.toml --------------------------------------------------------------------------


def test_daemon_defaults_without_a_file(tmp_path):
    spec = load_daemon(tmp_path / "corrald.toml", required=False)
    assert spec == DaemonSpec()
    assert spec == DaemonSpec("/etc/corral/containers.d", "/run/corral", "/var/log/corral",
                              "/run/corral/corrald.sock", None, False)
    assert load_daemon(None) == DaemonSpec()


def test_daemon_required_file_missing(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_daemon(tmp_path / "corrald.toml")


def test_daemon_file_and_flags(tmp_path, monkeypatch):
    path = write(tmp_path, 'config_dir = "/c"\nroot = "/r"\nlog_dir = "/l"\n'
                 'socket_group = "root"\nlive_restore = true\n', "corrald.toml")
    spec = load_daemon(path)
    assert spec == DaemonSpec("/c", "/r", "/l", "/r/corrald.sock", "root", True)
    monkeypatch.chdir(tmp_path)
    spec = load_daemon(path, {"root": "state", "log_dir": "/l2", "socket": None,
                              "config_dir": None})
    assert spec.root == str(tmp_path / "state")
    assert spec.socket == str(tmp_path / "state" / "corrald.sock")
    assert (spec.config_dir, spec.log_dir) == ("/c", "/l2")
    assert load_daemon(path, {"socket": "/s.sock"}).socket == "/s.sock"


def test_daemon_socket_group_gid(tmp_path):
    assert load_daemon(write(tmp_path, "socket_group = 0\n")).socket_group == 0


@pytest.mark.parametrize(("text", "key", "problem"), [
    ('root = "run/corral"\n', "root", "absolute"),
    ("live_restore = 1\n", "live_restore", "true or false"),
    ('[network]\nmode = "x"\n', "network.mode", "unknown key"),
    ('sockets = "/s"\n', "sockets", "unknown key"),
    (f'socket = "/{"s" * 120}"\n', "socket", "unix socket"),
    (f'root = "/{"r" * 100}"\n', "socket", "unix socket"),
    ('socket_group = "a:b"\n', "socket_group", "group"),
    ('socket_group = "no-such-group-here"\n', "socket_group", "no group is named"),
    ("socket_group = -1\n", "socket_group", "out of range"),
])
def test_daemon_bad_values(tmp_path, text, key, problem):
    path = write(tmp_path, text, "corrald.toml")
    with pytest.raises(ConfigError) as exc:
        load_daemon(path)
    assert (exc.value.file, exc.value.key) == (str(path), key)
    assert problem in exc.value.problem


def test_daemon_bad_flag_names_the_command_line():
    with pytest.raises(ConfigError) as exc:
        load_daemon(None, {"live_restore": "yes"})
    assert (exc.value.file, exc.value.key) == ("command line", "live_restore")


# -- to_oci --------------------------------------------------------------------------------


def test_to_oci_full(tmp_path):
    spec = load_container(write(tmp_path, FULL))
    cfg = to_oci(spec)
    validate(cfg)  # raises on any field the runtime would refuse
    proc = cfg["process"]
    assert proc["terminal"] is False
    assert proc["args"] == ["/bin/httpd", "-f", "-p", "8080"]
    assert proc["env"] == [f"PATH={DEFAULT_PATH}", "A_B=x=y", "PORT=8080"]
    assert proc["cwd"] == "/www"
    assert proc["user"] == {"uid": 1000, "gid": 100}
    assert cfg["root"]["path"] == "/srv/web/rootfs"
    assert cfg["hostname"] == "web-1.example"
    assert cfg["mounts"][-2:] == [
        {"destination": "/data", "type": "bind", "source": "/srv/data",
         "options": ["rbind", "ro"]},
        {"destination": "/cache", "type": "bind", "source": "/srv/cache", "options": ["rbind"]},
    ]
    res = cfg["linux"]["resources"]
    assert res["memory"] == {"limit": 64 << 20}
    assert res["pids"] == {"limit": 100}
    assert res["cpu"] == {"quota": 50_000, "period": 100_000}
    assert res["devices"] == default_spec()["linux"]["resources"]["devices"]
    for version in (1, 2):  # the runtime's resource planner takes it as is
        _resources.plan(res, version)


def test_to_oci_minimal_defaults(tmp_path):
    cfg = to_oci(load_container(write(tmp_path, MIN)))
    validate(cfg)
    base = default_spec()
    assert cfg["process"]["env"] == [f"PATH={DEFAULT_PATH}"]
    assert cfg["process"]["user"] == {"uid": 0, "gid": 0}
    assert cfg["process"]["cwd"] == "/"
    assert cfg["hostname"] == "web"
    assert cfg["mounts"] == base["mounts"]
    assert cfg["linux"] == base["linux"]


def test_to_oci_env_path_override_and_base_untouched(tmp_path):
    spec = load_container(write(tmp_path, MIN.replace(
        "rootfs", 'env = { PATH = "/opt/bin", X = "1" }\nrootfs', 1)))
    base = default_spec()
    before = copy.deepcopy(base)
    cfg = to_oci(spec, base)
    assert cfg["process"]["env"] == ["PATH=/opt/bin", "X=1"]
    assert base == before


def test_to_oci_bundle_lays_the_file_over_the_bundle_config(tmp_path):
    bundle_cfg = default_spec()
    bundle_cfg["process"]["args"] = ["/app"]
    bundle_cfg["process"]["env"] = ["PATH=/bin", "TERM=xterm", "MODE=a"]
    bundle_cfg["hostname"] = "from-bundle"
    plain = load_container(write(tmp_path, '[container]\nbundle = "/srv/b"\n', "a.toml"))
    cfg = to_oci(plain, bundle_cfg)
    validate(cfg)
    assert cfg["process"]["args"] == ["/app"]
    assert cfg["process"]["env"] == ["PATH=/bin", "TERM=xterm", "MODE=a"]
    assert cfg["hostname"] == "from-bundle"
    assert cfg["root"] == bundle_cfg["root"]
    assert cfg["process"]["terminal"] is False
    over = load_container(write(tmp_path, '[container]\nbundle = "/srv/b"\ncommand = ["/x"]\n'
                                'env = { MODE = "b", NEW = "1" }\nhostname = "h"\n'
                                '[resources]\npids = 5\n', "b.toml"))
    cfg = to_oci(over, bundle_cfg)
    validate(cfg)
    assert cfg["process"]["args"] == ["/x"]
    assert cfg["process"]["env"] == ["PATH=/bin", "TERM=xterm", "MODE=b", "NEW=1"]
    assert cfg["hostname"] == "h"
    assert cfg["linux"]["resources"]["pids"] == {"limit": 5}


def test_to_oci_bundle_needs_a_base():
    with pytest.raises(ValueError, match="bundle"):
        to_oci(ContainerSpec("b", bundle="/srv/b"))


# -- plan_reload ---------------------------------------------------------------------------


def test_plan_reload_cases():
    a = ContainerSpec("a", rootfs="/r", command=("x",))
    b = ContainerSpec("b", rootfs="/r", command=("x",))
    c = ContainerSpec("c", rootfs="/r", command=("x",))
    b2 = ContainerSpec("b", rootfs="/r", command=("y",))
    plan = plan_reload({"a": a, "b": b, "d": a}, {"a": a, "b": b2, "c": c})
    assert plan == ReloadPlan(added=("c",), removed=("d",), changed=("b",), unchanged=("a",))
    assert plan.describe() == "start c; stop d; restart b; keep a"
    assert plan_reload({}, {}) == ReloadPlan()
    assert plan_reload({}, {}).describe() == "nothing configured"
    assert plan_reload({"a": a}, {"a": a}) == ReloadPlan(unchanged=("a",))
    assert plan_reload({"b": b, "a": a}, {}).removed == ("a", "b")
    assert plan_reload({}, {"b": b, "a": a}).added == ("a", "b")


def test_plan_reload_from_files(tmp_path):
    write(tmp_path, MIN, "keep.toml")
    write(tmp_path, MIN, "change.toml")
    write(tmp_path, MIN, "drop.toml")
    write(tmp_path, MIN, "touched.toml")
    old, _ = load_dir(tmp_path)
    (tmp_path / "drop.toml").unlink()
    write(tmp_path, MIN + "[restart]\npolicy = 'always'\n", "change.toml")
    write(tmp_path, "# same values, new text\n" + MIN + "[stop]\nsignal = 'TERM'\n",
          "touched.toml")
    write(tmp_path, MIN, "new.toml")
    write(tmp_path, MIN + "[oops]\n", "broken.toml")
    new, errors = load_dir(tmp_path)
    assert len(errors) == 1
    plan = plan_reload(old, new)
    assert plan == ReloadPlan(added=("new",), removed=("drop",), changed=("change",),
                              unchanged=("keep", "touched"))


def test_spec_equality_ignores_the_source_path(tmp_path):
    one = load_container(write(tmp_path, MIN))
    (tmp_path / "other").mkdir()
    two = load_container(write(tmp_path / "other", MIN))
    assert one.source != two.source
    assert one == two
    assert hash(one) == hash(two)
