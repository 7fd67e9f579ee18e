"""Each Linux field of config.json, checked from inside the container with busybox tools."""

import json
import os
import select
import socket
import stat
import threading
import time

import pytest

pytestmark = pytest.mark.root



def run_ok(rt, changes, script):
    """Run `sh -c script` in a fresh container; assert exit 0 and return stdout."""
    rc, out, err = rt.run_container(changes, ["sh", "-c", script])
    assert rc == 0, f"container failed ({rc}):\nstdout: {out}\nstderr: {err}"
    return out


def add_mount(mount):
    return lambda c: c["mounts"].append(mount)


def set_namespaces(*types, **paths):
    def change(c):
        nss = [{"type": t} for t in types]
        nss += [{"type": t, "path": p} for t, p in paths.items()]
        c["linux"]["namespaces"] = nss

    return change


def compose(*changes):
    def change(c):
        for ch in changes:
            ch(c)

    return change


# -- process ---------------------------------------------------------------------------------


def test_hostname(rt):
    assert run_ok(rt, {"hostname": "corral-test"}, "hostname") == "corral-test\n"


def test_domainname(rt, is_runc):
    if is_runc:
        pytest.xfail("runc 1.1 ignores the domainname field")
    out = run_ok(rt, {"domainname": "example.test"}, "cat /proc/sys/kernel/domainname")
    assert out == "example.test\n"


def test_env(rt):
    env = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "FOO=bar baz", "EMPTY="]
    out = run_ok(rt, {"process": {"env": env}}, "env")
    lines = out.splitlines()
    assert "FOO=bar baz" in lines
    assert "EMPTY=" in lines
    assert "PATH=/usr/sbin:/usr/bin:/sbin:/bin" in lines


def test_cwd(rt):
    assert run_ok(rt, {"process": {"cwd": "/tmp"}}, "pwd") == "/tmp\n"


def test_user_and_additional_gids(rt):
    user = {"uid": 1000, "gid": 1001, "additionalGids": [5, 2000]}
    out = run_ok(rt, {"process": {"user": user}}, "id -u; id -g; id -G")
    uid, gid, groups = out.splitlines()
    assert uid == "1000"
    assert gid == "1001"
    assert {"5", "2000"} <= set(groups.split())
    assert "0" not in groups.split()


def test_umask(rt):
    out = run_ok(rt, {"process": {"user": {"uid": 0, "gid": 0, "umask": 0o027}}}, "umask")
    assert out == "0027\n"


def test_rlimit_nofile(rt):
    rlimits = [{"type": "RLIMIT_NOFILE", "soft": 1000, "hard": 1000}]
    out = run_ok(rt, {"process": {"rlimits": rlimits}}, "ulimit -n; ulimit -Hn")
    assert out.split() == ["1000", "1000"]


def test_oom_score_adj(rt):
    out = run_ok(rt, {"process": {"oomScoreAdj": 123}}, "cat /proc/self/oom_score_adj")
    assert out == "123\n"


@pytest.mark.parametrize(("nnp", "want"), [(True, "1"), (False, "0")])
def test_no_new_privileges(rt, nnp, want):
    out = run_ok(rt, {"process": {"noNewPrivileges": nnp}}, "grep NoNewPrivs /proc/self/status")
    assert out.split() == ["NoNewPrivs:", want]


def test_capabilities(rt):
    # CAP_CHOWN (0), CAP_KILL (5), CAP_NET_BIND_SERVICE (10): not runc's default set.
    caps = ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    want = (1 << 0) | (1 << 5) | (1 << 10)

    def change(c):
        c["process"]["capabilities"] = {"bounding": caps, "effective": caps, "permitted": caps}

    out = run_ok(rt, change, "grep Cap /proc/self/status")
    fields = {line.split(":")[0]: int(line.split()[1], 16) for line in out.splitlines()}
    assert fields["CapBnd"] == want
    assert fields["CapEff"] == want
    assert fields["CapPrm"] == want


# -- namespaces ------------------------------------------------------------------------------


def test_pid_namespace(rt):
    assert run_ok(rt, None, "echo $$") == "1\n"


def test_network_namespace_is_new(rt, host_ns):
    out = run_ok(rt, None, "readlink /proc/1/ns/net")
    assert out.strip().startswith("net:[")
    assert out.strip() != host_ns("net")


def test_loopback_is_up(rt):
    out = run_ok(rt, None, "ip addr show lo")
    assert "LOOPBACK" in out
    assert "UP" in out.split(">")[0]
    assert "127.0.0.1" in out


def test_join_namespace_by_path(rt, make_bundle):
    a = make_bundle(args=("sleep", "30"), changes={"hostname": "ctr-a"})
    cid_a = rt.new_id()
    rt("run", "--detach", "--bundle", a.path, cid_a)
    pid_a = rt.state(cid_a)["pid"]

    def join_uts(c):
        c.pop("hostname", None)
        for ns in c["linux"]["namespaces"]:
            if ns["type"] == "uts":
                ns["path"] = f"/proc/{pid_a}/ns/uts"

    out = run_ok(rt, join_uts, "hostname; readlink /proc/self/ns/uts")
    hostname, uts = out.splitlines()
    assert hostname == "ctr-a"
    assert uts == os.readlink(f"/proc/{pid_a}/ns/uts")
    rt("delete", "--force", cid_a)


def test_user_namespace_mappings(rt):
    def change(c):
        c["linux"]["namespaces"].append({"type": "user"})
        c["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
        c["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]

    out = run_ok(rt, change, "cat /proc/self/uid_map; cat /proc/self/gid_map; id -u")
    uid_map, gid_map, uid = out.splitlines()
    assert uid_map.split() == ["0", "100000", "65536"]
    assert gid_map.split() == ["0", "100000", "65536"]
    assert uid == "0"


# -- mounts and filesystem -------------------------------------------------------------------


def test_tmpfs_mount_options(rt, writable_tmp):
    out = run_ok(rt, writable_tmp, "grep ' /tmp ' /proc/mounts; touch /tmp/x && echo ok")
    line, ok = out.splitlines()
    _source, dest, fstype, options = line.split()[:4]
    assert (dest, fstype) == ("/tmp", "tmpfs")
    opts = options.split(",")
    assert {"rw", "nosuid", "nodev", "size=1024k"} <= set(opts)
    assert ok == "ok"


def test_bind_mount_readonly(rt, tmp_path):
    host = tmp_path / "ro"
    host.mkdir()
    (host / "f").write_text("host-content\n")
    mount = {"destination": "/ro", "type": "bind", "source": str(host), "options": ["rbind", "ro"]}
    out = run_ok(
        rt,
        add_mount(mount),
        "cat /ro/f; if touch /ro/new 2>/dev/null; then echo writable; else echo readonly; fi",
    )
    assert out.splitlines() == ["host-content", "readonly"]
    assert not (host / "new").exists()


def test_bind_mount_readwrite(rt, tmp_path):
    host = tmp_path / "rw"
    host.mkdir()
    mount = {"destination": "/rw", "type": "bind", "source": str(host), "options": ["rbind", "rw"]}
    run_ok(rt, add_mount(mount), "echo from-container > /rw/new")
    assert (host / "new").read_text() == "from-container\n"


def test_readonly_root(rt):
    out = run_ok(rt, None, "if touch /x 2>/dev/null; then echo writable; else echo readonly; fi")
    assert out == "readonly\n"


def test_masked_paths(rt):
    # /proc/cmdline and /proc/keys are non-empty files; /proc/acpi may be missing on the host,
    # and a missing masked path (like /proc/no-such-file) is not an error.
    masked = ["/proc/cmdline", "/proc/keys", "/proc/acpi", "/proc/no-such-file"]
    out = run_ok(
        rt,
        {"linux": {"maskedPaths": masked}},
        "wc -c < /proc/cmdline; wc -c < /proc/keys; ls -A /proc/acpi 2>/dev/null | wc -l",
    )
    assert out.split() == ["0", "0", "0"]


def test_readonly_paths(rt):
    out = run_ok(
        rt,
        None,
        "if echo x 2>/dev/null > /proc/sys/kernel/domainname; then echo writable; "
        "else echo readonly; fi; grep ' /proc/sys ' /proc/mounts",
    )
    verdict, mount_line = out.splitlines()
    assert verdict == "readonly"
    assert "ro" in mount_line.split()[3].split(",")


def test_sysctl(rt):
    out = run_ok(
        rt, {"linux": {"sysctl": {"net.ipv4.ip_forward": "1"}}}, "cat /proc/sys/net/ipv4/ip_forward"
    )
    assert out == "1\n"


def test_default_devices(rt):
    script = (
        "for d in /dev/null /dev/zero /dev/full /dev/random /dev/urandom /dev/tty; do "
        "  [ -c $d ] && echo char $d; done; "
        "for l in /dev/fd /dev/stdin /dev/stdout /dev/stderr; do "
        "  echo link $l $(readlink $l); done; "
        "[ -e /dev/ptmx ] && echo ptmx; "
        "grep ' /dev/pts ' /proc/mounts; "
        "head -c 4 /dev/zero | wc -c; echo x > /dev/null && echo null-ok"
    )
    out = run_ok(rt, None, script).splitlines()
    for dev in ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty"):
        assert f"char {dev}" in out
    assert "link /dev/fd /proc/self/fd" in out
    assert "link /dev/stdin /proc/self/fd/0" in out
    assert "link /dev/stdout /proc/self/fd/1" in out
    assert "link /dev/stderr /proc/self/fd/2" in out
    assert "ptmx" in out
    assert any(line.split()[1:3] == ["/dev/pts", "devpts"] for line in out if "devpts" in line)
    assert "4" in out
    assert "null-ok" in out


def test_default_devices_are_the_real_ones(rt):
    script = "for d in null zero full random urandom tty; do stat -c '%n %t:%T' /dev/$d; done"
    out = run_ok(rt, None, script)
    got = dict(line.split() for line in out.splitlines())
    for name in ("null", "zero", "full", "random", "urandom", "tty"):
        st = os.stat(f"/dev/{name}")
        want = f"{os.major(st.st_rdev):x}:{os.minor(st.st_rdev):x}"
        assert got[f"/dev/{name}"] == want
        assert stat.S_ISCHR(st.st_mode)


# -- process startup -------------------------------------------------------------------------


def test_args0_looked_up_on_path(rt):
    rc, out, err = rt.run_container(None, ["echo", "hi"])
    assert (rc, out) == (0, "hi\n"), err


def test_no_pivot(rt):
    rc, out, err = rt.run_container(None, ["sh", "-c", "echo pivot-ok; ls /"], extra=["--no-pivot"])
    assert rc == 0, err
    assert out.splitlines()[0] == "pivot-ok"
    assert "bin" in out.split()


def test_close_on_exec(rt):
    # `ls /proc/$$/fd` lists the shell's fds (ls runs as a child, `; true` prevents exec).
    out = run_ok(rt, None, "ls /proc/$$/fd; true")
    assert sorted(out.split(), key=int) == ["0", "1", "2"]


def test_close_on_exec_ls_self(rt):
    # ls opens one directory fd of its own (3); anything higher leaked from the runtime.
    rc, out, err = rt.run_container(None, ["ls", "/proc/self/fd"])
    assert rc == 0, err
    assert max(int(fd) for fd in out.split()) <= 3


def test_preserve_fds(rt, make_bundle, tmp_path):
    data = tmp_path / "fd3"
    data.write_text("preserved-fd-content\n")
    b = make_bundle(args=("sh", "-c", "cat <&3; ls /proc/$$/fd; true"))
    cid = rt.new_id()
    # The shell opens the file as fd 3 and then execs the runtime.
    argv = [
        "/bin/sh",
        "-c",
        'exec "$@" 3<"$0"',
        str(data),
        *rt.argv("run", "--preserve-fds", "1", "--bundle", b.path, cid),
    ]
    res = rt.raw(argv)
    lines = res.stdout.splitlines()
    assert lines[0] == "preserved-fd-content"
    assert sorted(lines[1:], key=int) == ["0", "1", "2", "3"]


def test_fd3_not_passed_without_preserve_fds(rt, make_bundle, tmp_path):
    data = tmp_path / "fd3"
    data.write_text("must-not-leak\n")
    b = make_bundle(args=("sh", "-c", "ls /proc/$$/fd; true"))
    cid = rt.new_id()
    argv = [
        "/bin/sh",
        "-c",
        'exec "$@" 3<"$0"',
        str(data),
        *rt.argv("run", "--bundle", b.path, cid),
    ]
    res = rt.raw(argv)
    assert sorted(res.stdout.split(), key=int) == ["0", "1", "2"]


# -- hooks -----------------------------------------------------------------------------------


def make_hook(tmp_path, log, name, exit_status=0):
    script = tmp_path / f"hook-{name}.sh"
    script.write_text(
        f'#!/bin/sh\n{{ echo "HOOK $1"; cat; echo; }} >> "{log}"\nexit {exit_status}\n'
    )
    script.chmod(0o755)
    return {"path": str(script), "args": [script.name, name]}


def read_hook_log(log):
    """[(hook name, state dict)] in the order the hooks ran."""
    entries = []
    name = None
    for line in log.read_text().splitlines():
        if line.startswith("HOOK "):
            name = line[5:]
        elif line.strip() and name is not None:
            entries.append((name, json.loads(line)))
            name = None
    return entries


def test_hooks_order_and_state(rt, make_bundle, tmp_path, is_runc):
    log = tmp_path / "hooks.log"
    hooks = {
        kind: [make_hook(tmp_path, log, kind)]
        for kind in ("prestart", "createRuntime", "poststart", "poststop")
    }
    b = make_bundle(args=("sleep", "30"), changes={"hooks": hooks})
    cid = rt.create(b)
    at_create = [n for n, _ in read_hook_log(log)]
    assert at_create[:2] == ["prestart", "createRuntime"]
    if not is_runc:  # runc 1.1 runs poststart hooks at create time already
        assert at_create == ["prestart", "createRuntime"]
    rt("start", cid)
    assert rt.wait_status(cid, "running") == "running"
    rt("kill", cid, "KILL")
    assert rt.wait_status(cid, "stopped") == "stopped"
    rt("delete", cid)

    entries = read_hook_log(log)
    assert [n for n, _ in entries] == ["prestart", "createRuntime", "poststart", "poststop"]
    for name, state in entries:
        assert state["id"] == cid, name
        assert state["bundle"] == str(b.path), name
    by_name = dict(entries)
    assert by_name["createRuntime"]["status"] == "creating"
    assert by_name["createRuntime"]["pid"] > 0
    assert by_name["poststop"]["status"] == "stopped"


def test_failing_create_runtime_hook(rt, make_bundle, tmp_path):
    log = tmp_path / "hooks.log"
    hooks = {"createRuntime": [make_hook(tmp_path, log, "createRuntime", exit_status=1)]}
    b = make_bundle(args=("sleep", "30"), changes={"hooks": hooks})
    cid = rt.new_id()
    res = rt("create", "--bundle", b.path, cid, check=False)
    assert res.returncode == 1
    assert res.stderr.strip()
    assert [n for n, _ in read_hook_log(log)] == ["createRuntime"]
    assert rt("state", cid, check=False).returncode == 1
    assert cid not in rt("list", "-q").stdout.split()


def test_failing_poststart_hook_is_a_warning(rt, make_bundle, tmp_path, is_runc):
    if is_runc:
        pytest.xfail(
            "runc 1.1 runs poststart hooks during create and fails create when one "
            "fails; the OCI spec asks start for a warning only"
        )
    log = tmp_path / "hooks.log"
    hooks = {"poststart": [make_hook(tmp_path, log, "poststart", exit_status=1)]}
    b = make_bundle(args=("sleep", "30"), changes={"hooks": hooks})
    cid = rt.create(b)
    res = rt("start", cid, check=False)
    assert res.returncode == 0, res.stderr
    assert [n for n, _ in read_hook_log(log)] == ["poststart"]
    assert rt.status(cid) == "running"
    rt("delete", "--force", cid)


# -- terminal --------------------------------------------------------------------------------


def test_terminal_console_socket(rt, make_bundle, tmp_path):
    sock_path = tmp_path / "console.sock"
    assert len(str(sock_path)) < 100
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(1)
    listener.settimeout(20)
    received = {}

    def accept():
        try:
            conn, _ = listener.accept()
            with conn:
                msg, fds, _flags, _addr = socket.recv_fds(conn, 4096, 4)
                received["fds"] = fds
                received["msg"] = msg
        except Exception as exc:
            received["error"] = exc

    t = threading.Thread(target=accept)
    t.start()
    b = make_bundle(
        args=("sh", "-c", "echo hello-from-tty; tty; sleep 30"),
        changes={"process": {"terminal": True}},
    )
    try:
        cid = rt.create(b, "--console-socket", str(sock_path))
    finally:
        t.join(25)
        listener.close()
    assert "error" not in received, received
    assert len(received["fds"]) == 1
    master = received["fds"][0]
    try:
        rt("start", cid)
        buf = b""
        deadline = time.monotonic() + 5
        while b"/dev/pts/" not in buf and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                buf += chunk
    finally:
        os.close(master)
    text = buf.decode(errors="replace")
    assert "hello-from-tty\r\n" in text
    assert "/dev/pts/" in text
    rt("delete", "--force", cid)
