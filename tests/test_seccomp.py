"""linux.seccomp: validation that names the field, the filter libseccomp builds, and containers
whose syscalls are refused (or not) the way the profile says, with and without no_new_privs."""

import copy
import errno
import json

import pytest
from corral.runtime import _seccomp
from corral.runtime._errors import ConfigError
from corral.runtime._spec import default_spec, features, validate

AF_INET, AF_INET6, SOCK_STREAM, SOCK_DGRAM = 2, 10, 1, 2

# What busybox sh needs to run `echo ok` and other applets, plus what corral's init does
# between loading the filter and exec (dropping privileges, resetting signals, close_range,
# execve). Written for this test, not copied from a profile; `uname`, `mkdir` and `mkdirat`
# are left out on purpose (busybox's start-up calls uname(2) and shrugs off its EPERM). Some
# names are not x86_64 syscalls, or none at all: they are skipped, as runc does.
_ALLOWED = """
    accept accept4 access alarm arch_prctl bind brk capget capset chdir chmod chown
    clock_getres clock_gettime clock_nanosleep clone clone3 close close_range connect dup dup2
    dup3 epoll_create epoll_create1 epoll_ctl epoll_pwait epoll_wait eventfd2 execve execveat
    exit exit_group faccessat faccessat2 fadvise64 fchdir fchmod fchmodat fchown fchownat fcntl
    fdatasync flock fork fstat fstatfs fsync ftruncate futex getcwd getdents getdents64
    getegid geteuid getgid getgroups getpgid getpgrp getpid getppid getpriority getrandom
    getresgid getresuid getrlimit getrusage getsid getsockname getsockopt gettid gettimeofday
    getuid ioctl kill lchown link linkat listen lseek lstat madvise memfd_create
    mmap mprotect mremap munmap nanosleep newfstatat open openat openat2 pipe pipe2 poll ppoll
    prctl pread64 prlimit64 pselect6 pwrite64 read readlink readlinkat readv recvfrom recvmsg
    rename renameat renameat2 restart_syscall rmdir rseq rt_sigaction rt_sigpending
    rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend rt_sigtimedwait
    sched_getaffinity sched_yield select sendmsg sendto set_robust_list set_tid_address setgid
    setgroups setitimer setpgid setregid setresgid setresuid setreuid setsid setsockopt setuid
    shutdown sigaltstack socket socketpair stat statfs statx symlink symlinkat sysinfo tgkill
    time times tkill umask unlink unlinkat utimensat vfork wait4 waitid write writev
    socketcall waitpid ugetrlimit not_a_syscall_anywhere
"""
ALLOW_LIST = sorted(_ALLOWED.split())


def with_seccomp(sec, nnp=None, tmp=None):
    """A config change: `sec` as linux.seccomp, `nnp`, and `tmp` (conftest's writable_tmp)."""

    def change(c):
        c["linux"]["seccomp"] = sec
        if nnp is not None:
            c["process"]["noNewPrivileges"] = nnp
        if tmp is not None:
            tmp(c)

    return change


def run_sh(rt, changes, script):
    rc, out, err = rt.run_container(changes, ["sh", "-c", script])
    return rc, out, err


def errno_rule(names, ret=None, args=None):
    rule = {"names": list(names), "action": "SCMP_ACT_ERRNO"}
    if ret is not None:
        rule["errnoRet"] = ret
    if args is not None:
        rule["args"] = args
    return rule


def arg(index, value, op="SCMP_CMP_EQ", value_two=None):
    a = {"index": index, "value": value, "op": op}
    if value_two is not None:
        a["valueTwo"] = value_two
    return a


# -- validation -------------------------------------------------------------------------------

GOOD_RULE = {"names": ["read"], "action": "SCMP_ACT_ALLOW"}


def _sc(*rules, **top):
    return {"defaultAction": "SCMP_ACT_ERRNO", **top, "syscalls": list(rules)}


BAD = [
    ("yes", "linux.seccomp", "object"),
    ({"defaultAction": "SCMP_ACT_BOGUS"}, "linux.seccomp.defaultAction", "SCMP_ACT_BOGUS"),
    ({"defaultAction": 3}, "linux.seccomp.defaultAction", "string"),
    ({"defaultAction": "SCMP_ACT_NOTIFY"}, "linux.seccomp.defaultAction", "not supported"),
    ({"syscalls": [GOOD_RULE]}, "linux.seccomp.defaultAction", "required"),
    (_sc(defaultErrnoRet=-1), "linux.seccomp.defaultErrnoRet", "out of range"),
    (_sc(defaultErrnoRet=True), "linux.seccomp.defaultErrnoRet", "integer"),
    (_sc(defaultErrnoRet=70000), "linux.seccomp.defaultErrnoRet", "out of range"),
    (_sc(architectures="SCMP_ARCH_X86"), "linux.seccomp.architectures", "array"),
    (_sc(architectures=["SCMP_ARCH_X86_64", "SCMP_ARCH_Z80"]),
     "linux.seccomp.architectures[1]", "SCMP_ARCH_Z80"),
    (_sc(architectures=["x86_64"]), "linux.seccomp.architectures[0]", "unknown architecture"),
    (_sc(flags=["SECCOMP_FILTER_FLAG_NEW_LISTENER"]), "linux.seccomp.flags[0]", "flag"),
    (_sc(flags=["SECCOMP_FILTER_FLAG_LOG", 1]), "linux.seccomp.flags[1]", "string"),
    (_sc(listenerPath="/run/agent.sock"), "linux.seccomp.listenerPath", "not supported"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": {}}, "linux.seccomp.syscalls", "array"),
    (_sc(GOOD_RULE, "read"), "linux.seccomp.syscalls[1]", "object"),
    (_sc(GOOD_RULE, GOOD_RULE, {"action": "SCMP_ACT_ALLOW"}),
     "linux.seccomp.syscalls[2].names", "required"),
    (_sc({"names": [], "action": "SCMP_ACT_ALLOW"}), "linux.seccomp.syscalls[0].names",
     "at least one"),
    (_sc({"names": "read", "action": "SCMP_ACT_ALLOW"}), "linux.seccomp.syscalls[0].names",
     "array"),
    (_sc({"names": ["read", 5], "action": "SCMP_ACT_ALLOW"}),
     "linux.seccomp.syscalls[0].names[1]", "string"),
    (_sc({"names": ["read", ""], "action": "SCMP_ACT_ALLOW"}),
     "linux.seccomp.syscalls[0].names[1]", "empty"),
    (_sc({"names": ["read"]}), "linux.seccomp.syscalls[0].action", "required"),
    (_sc({"names": ["read"], "action": "ALLOW"}), "linux.seccomp.syscalls[0].action",
     "unknown action"),
    (_sc(GOOD_RULE, {"names": ["read"], "action": "SCMP_ACT_NOTIFY"}),
     "linux.seccomp.syscalls[1].action", "not supported"),
    (_sc(errno_rule(["mkdir"], "1")), "linux.seccomp.syscalls[0].errnoRet", "integer"),
    (_sc(errno_rule(["mkdir"], 70000)), "linux.seccomp.syscalls[0].errnoRet", "out of range"),
    (_sc(errno_rule(["mkdir"], args={})), "linux.seccomp.syscalls[0].args", "array"),
    (_sc(errno_rule(["mkdir"], args=[5])), "linux.seccomp.syscalls[0].args[0]", "object"),
    (_sc(errno_rule(["mkdir"], args=[arg(0, 1), {"value": 1, "op": "SCMP_CMP_EQ"}])),
     "linux.seccomp.syscalls[0].args[1].index", "required"),
    (_sc(errno_rule(["mkdir"], args=[arg(6, 1)])),
     "linux.seccomp.syscalls[0].args[0].index", "out of range"),
    (_sc(errno_rule(["mkdir"], args=[{"index": 0, "op": "SCMP_CMP_EQ"}])),
     "linux.seccomp.syscalls[0].args[0].value", "required"),
    (_sc(errno_rule(["mkdir"], args=[arg(0, -1)])),
     "linux.seccomp.syscalls[0].args[0].value", "out of range"),
    (_sc(errno_rule(["mkdir"], args=[arg(0, 2**64)])),
     "linux.seccomp.syscalls[0].args[0].value", "out of range"),
    (_sc(errno_rule(["mkdir"], args=[arg(0, 1, "SCMP_CMP_MASKED_EQ", "x")])),
     "linux.seccomp.syscalls[0].args[0].valueTwo", "integer"),
    (_sc(errno_rule(["mkdir"], args=[{"index": 0, "value": 1}])),
     "linux.seccomp.syscalls[0].args[0].op", "required"),
    (_sc(GOOD_RULE, GOOD_RULE, errno_rule(["mkdir"], args=[arg(0, 1), arg(1, 1, "EQ")])),
     "linux.seccomp.syscalls[2].args[1].op", "unknown operator 'EQ'"),
]


@pytest.mark.parametrize(("sec", "field", "problem"), BAD, ids=[b[1] for b in BAD])
def test_validation_names_the_field(sec, field, problem):
    cfg = default_spec()
    cfg["linux"]["seccomp"] = copy.deepcopy(sec)
    with pytest.raises(ConfigError) as exc:
        validate(cfg)
    assert exc.value.field == field, str(exc.value)
    assert problem in exc.value.problem, str(exc.value)


GOOD = [
    None,
    {},
    {"defaultAction": "SCMP_ACT_ALLOW"},
    {"defaultAction": "SCMP_ACT_KILL_PROCESS", "architectures": ["SCMP_ARCH_X86_64"]},
    {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 38,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "flags": ["SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG",
                  "SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
        "syscalls": [
            {"names": ALLOW_LIST, "action": "SCMP_ACT_ALLOW"},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
             "args": [arg(0, 0), arg(0, 8), arg(0, 0xFFFFFFFF)]},
            {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
             "args": [arg(0, 0x7E020000, "SCMP_CMP_MASKED_EQ", 0)]},
            {"names": ["ptrace"], "action": "SCMP_ACT_TRACE", "errnoRet": 5},
            {"names": ["reboot"], "action": "SCMP_ACT_KILL_THREAD", "errnoRet": 5},
            {"names": ["acct"], "action": "SCMP_ACT_LOG"},
            {"names": ["kexec_load"], "action": "SCMP_ACT_TRAP"},
        ],
    },
]


@pytest.mark.parametrize("sec", GOOD)
def test_validation_accepts(sec):
    cfg = default_spec()
    cfg["linux"]["seccomp"] = sec
    validate(cfg)


def test_enabled():
    assert not _seccomp.enabled({})
    assert not _seccomp.enabled({"architectures": ["SCMP_ARCH_X86_64"]})
    assert _seccomp.enabled({"defaultAction": "SCMP_ACT_ALLOW"})


# -- pure logic ------------------------------------------------------------------------------


def test_action_values():
    av = _seccomp.action_value
    assert av("SCMP_ACT_ALLOW", None) == 0x7FFF0000
    assert av("SCMP_ACT_ERRNO", None) == 0x00050000 | errno.EPERM
    assert av("SCMP_ACT_ERRNO", 38) == 0x00050000 | 38
    assert av("SCMP_ACT_ERRNO", 0) == 0x00050000
    assert av("SCMP_ACT_TRACE", None) == 0x7FF00000 | errno.EPERM
    assert av("SCMP_ACT_KILL", 5) == 0  # errnoRet means nothing to the other actions
    assert av("SCMP_ACT_KILL_PROCESS", None) == 0x80000000


def test_conditions_distinct_indexes_make_one_rule():
    conds = _seccomp.conditions([arg(0, 2), arg(1, 1, "SCMP_CMP_NE"),
                                 arg(2, 0xF0, "SCMP_CMP_MASKED_EQ", 0x10)])
    assert conds == [[(0, 4, 2, 0), (1, 1, 1, 0), (2, 7, 0xF0, 0x10)]]


def test_conditions_repeated_index_make_one_rule_each():
    conds = _seccomp.conditions([arg(0, 2), arg(0, 10), arg(1, 1)])
    assert conds == [[(0, 4, 2, 0)], [(0, 4, 10, 0)], [(1, 4, 1, 0)]]


def test_conditions_none():
    assert _seccomp.conditions([]) == [[]]


class FakeFilter:
    def __init__(self, log):
        self.log = log

    def load(self):
        self.log.append("load")


@pytest.mark.parametrize(("nnp", "order"), [(False, ["load", "finalize"]),
                                            (True, ["finalize", "load"])])
def test_load_around_order(nnp, order):
    log = []
    got = _seccomp.load_around(FakeFilter(log), nnp, lambda: log.append("finalize") or 42)
    assert got == 42
    assert log == order


def test_load_around_without_filter():
    assert _seccomp.load_around(None, True, lambda: "x") == "x"


def test_features():
    sec = features()["linux"]["seccomp"]
    assert sec["enabled"] is True
    assert {"SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_LOG",
            "SCMP_ACT_TRACE", "SCMP_ACT_TRAP"} <= set(sec["actions"])
    assert "SCMP_ACT_NOTIFY" not in sec["actions"]
    assert "SCMP_CMP_MASKED_EQ" in sec["operators"]
    assert {"SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"} <= set(sec["archs"])
    assert set(sec["supportedFlags"]) == {"SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG",
                                          "SECCOMP_FILTER_FLAG_SPEC_ALLOW"}


def test_features_cli(rt):
    data = json.loads(rt("features").stdout)
    assert data["linux"]["seccomp"]["enabled"] is True
    assert "SCMP_ACT_ERRNO" in data["linux"]["seccomp"]["actions"]


# -- the filter libseccomp builds (no root: nothing is loaded) -------------------------------


def pfc(sec):
    cfg = default_spec()
    cfg["linux"]["seccomp"] = sec
    validate(cfg)
    filt = _seccomp.prepare(sec)
    assert filt is not None
    try:
        return filt.pfc()
    finally:
        filt.release()


def arch_section(text, arch):
    """The pfc lines of one architecture's filter."""
    out, on = [], False
    for line in text.splitlines():
        if line.startswith("# filter for arch "):
            on = line.startswith(f"# filter for arch {arch} ")
        elif not line.startswith(" "):
            on = on and line.startswith("if ($arch")
        elif on:
            out.append(line.strip())
    return out


def test_prepare_disabled_is_none():
    assert _seccomp.prepare({}) is None


def test_prepare_rules():
    text = pfc({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            errno_rule(["mkdir", "mkdirat", "no_such_syscall"], 38),
            {"names": ["getpid"], "action": "SCMP_ACT_ALLOW"},  # same as the default: skipped
            errno_rule(["socket"], args=[arg(0, AF_INET), arg(1, SOCK_DGRAM)]),
            errno_rule(["personality"], 22, args=[arg(0, 8), arg(0, 0xFFFFFFFF)]),
        ],
    })
    x = arch_section(text, "x86_64")
    assert x, text
    assert 'if ($syscall == 83)' in x  # mkdir
    assert "action ERRNO(38);" in x
    assert "no_such_syscall" not in text
    assert '"getpid"' not in text
    # socket: both conditions in one rule (AND): arg1 is tested inside the arg0 test.
    i = x.index("if ($a0.lo32 == 2)")
    assert x[i + 2] == "if ($a1.lo32 == 2)"
    assert x[i + 3] == "action ERRNO(1);"
    # personality: one rule per condition (OR), each with its own action.
    assert "if ($a0.lo32 == 8)" in x
    assert "if ($a0.lo32 == 4294967295)" in x
    assert x.count("action ERRNO(22);") == 2
    assert x[-1] == "action ALLOW;"


def test_prepare_architectures():
    text = pfc({"defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
                "syscalls": [errno_rule(["mkdir"])]})
    assert "# filter for arch x86_64 " in text
    assert "# filter for arch x86 " in text
    assert "# filter for arch x32 " in text
    assert "if ($syscall == 39)" in arch_section(text, "x86")  # mkdir on i386


def test_prepare_masked_eq_and_flags():
    text = pfc({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
                "flags": ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
                          "SECCOMP_FILTER_FLAG_TSYNC"],
                "syscalls": [{"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                              "args": [arg(0, 0x7E020000, "SCMP_CMP_MASKED_EQ", 0)]}]})
    x = arch_section(text, "x86_64")
    assert "if ($a0.lo32 & 0x7e020000 == 0)" in x
    assert x[-1] == "action ERRNO(38);"


# -- containers ------------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.parametrize(("ret", "message"), [(None, "Operation not permitted"),
                                              (1, "Operation not permitted"),
                                              (38, "Function not implemented")])
def test_errno_rule(rt, ret, message, writable_tmp):
    sec = {"defaultAction": "SCMP_ACT_ALLOW",
           "syscalls": [errno_rule(["mkdir", "mkdirat"], ret)]}
    rc, out, err = run_sh(rt, with_seccomp(sec, tmp=writable_tmp),
                          "mkdir /tmp/x; echo mkdir=$?; touch /tmp/y && ls /tmp")
    assert rc == 0, err
    assert "mkdir=1" in out
    assert f"can't create directory '/tmp/x': {message}" in err
    assert out.split()[-1] == "y"  # everything else works


@pytest.mark.root
def test_without_seccomp_mkdir_works(rt, writable_tmp):
    rc, out, err = run_sh(rt, with_seccomp(None, tmp=writable_tmp), "mkdir /tmp/x && echo made")
    assert (rc, out) == (0, "made\n"), err


NC = "nc {addr} 1 </dev/null; echo rc=$?"


@pytest.mark.root
@pytest.mark.parametrize(
    ("args", "blocked_v4", "blocked_v6"),
    [
        ([arg(0, AF_INET)], True, False),
        # AND: IPv4 *and* datagram; nc's TCP socket does not match.
        ([arg(0, AF_INET), arg(1, SOCK_DGRAM)], False, False),
        ([arg(0, AF_INET), arg(1, SOCK_STREAM)], True, False),
        # OR: the same argument twice, either value matches.
        ([arg(0, AF_INET), arg(0, AF_INET6)], True, True),
        ([arg(0, AF_INET6, "SCMP_CMP_GE")], False, True),
    ],
    ids=["inet", "inet-and-dgram", "inet-and-stream", "inet-or-inet6", "ge-inet6"],
)
def test_args_rule(rt, args, blocked_v4, blocked_v6):
    sec = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [errno_rule(["socket"], args=args)]}
    script = NC.format(addr="127.0.0.1") + "; " + NC.format(addr="::1")
    rc, out, err = run_sh(rt, with_seccomp(sec), script)
    assert rc == 0, err
    assert out == "rc=1\nrc=1\n"
    lines = err.splitlines()
    assert len(lines) == 2, err
    v4, v6 = lines
    assert ("socket: Operation not permitted" in v4) == blocked_v4, err
    assert ("socket: Operation not permitted" in v6) == blocked_v6, err
    if not blocked_v4:
        assert "Connection refused" in v4, err


def allow_list_profile(default="SCMP_ACT_ERRNO"):
    return {
        "defaultAction": default,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [{"names": ALLOW_LIST, "action": "SCMP_ACT_ALLOW"}],
    }


@pytest.mark.root
@pytest.mark.parametrize("nnp", [True, False], ids=["noNewPrivileges", "privileged-load"])
def test_allow_list(rt, nnp):
    # The filter answers before the filesystem: EPERM, not "Read-only file system".
    script = ("echo ok; mkdir /x; echo mkdir=$?; echo \"uname=[$(uname -s)]\"; "
              "grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status")
    rc, out, err = run_sh(rt, with_seccomp(allow_list_profile(), nnp=nnp), script)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[:3] == ["ok", "mkdir=1", "uname=[]"]  # busybox prints what uname(2) gave
    assert "can't create directory '/x': Operation not permitted" in err
    assert f"NoNewPrivs:\t{int(nnp)}" in lines
    assert "Seccomp:\t2" in lines  # filter mode


@pytest.mark.root
@pytest.mark.parametrize("nnp", [True, False], ids=["noNewPrivileges", "privileged-load"])
def test_kill_process_default(rt, nnp):
    # busybox calls uname(2) as it starts (glibc's static start-up), so it is allowed here;
    # mkdir runs in a subshell, so that the process killed is not the shell itself.
    sec = allow_list_profile("SCMP_ACT_KILL_PROCESS")
    sec["syscalls"].append({"names": ["uname"], "action": "SCMP_ACT_ALLOW"})
    rc, out, err = run_sh(rt, with_seccomp(sec, nnp=nnp), "echo ok; (mkdir /x); echo mkdir=$?")
    assert rc == 0, (out, err)
    assert out == "ok\nmkdir=159\n"  # 128 + SIGSYS


@pytest.mark.root
@pytest.mark.parametrize("nnp", [True, False], ids=["noNewPrivileges", "privileged-load"])
def test_user_namespace(rt, nnp):
    """In a user namespace the init's CAP_SYS_ADMIN is the namespace's: loading still works."""

    def change(c):
        c["linux"]["namespaces"].append({"type": "user"})
        c["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
        c["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
        with_seccomp(allow_list_profile(), nnp=nnp)(c)

    rc, out, err = run_sh(rt, change, "echo ok; mkdir /x; echo mkdir=$?")
    assert rc == 0, err
    assert out == "ok\nmkdir=1\n"
    assert "Operation not permitted" in err


@pytest.mark.root
def test_missing_syscall_after_load_fails_cleanly(rt):
    """A profile that refuses execve itself: the start fails with an error, nothing leaks."""
    sec = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [errno_rule(["execve"])]}
    rc, _out, err = rt.run_container(with_seccomp(sec), ["true"])
    assert rc != 0
    assert "Operation not permitted" in err


@pytest.mark.root
def test_bad_profile_refused_by_create(rt, make_bundle):
    sec = _sc(GOOD_RULE, errno_rule(["mkdir"], args=[arg(7, 1)]))
    b = make_bundle(changes=with_seccomp(sec))
    res = rt("create", "--bundle", b.path, rt.new_id(), check=False)
    assert res.returncode == 1
    assert "linux.seccomp.syscalls[1].args[0].index" in res.stderr
    assert rt("list", "-q").stdout.split() == []
