"""The cgroup v2 device filter (corral.runtime._bpf).

Pure tests run the compiled program through a tiny eBPF interpreter and compare it with a
straightforward model of the rules ("the last matching rule decides, no match denies").
Root tests attach real filters to a throwaway cgroup under the cgroup2 mount and have a
child process that joined it open and mknod device nodes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import sys
import time
import uuid
from pathlib import Path

import pytest
from corral.runtime import _bpf
from corral.runtime._errors import ConfigError
from hypothesis import given, settings
from hypothesis import strategies as st

PROLOGUE = 6  # instructions that load the request into registers
M32 = 0xFFFF_FFFF
M64 = (1 << 64) - 1
DENY_ALL = {"allow": False, "access": "rwm"}

# --------------------------------------------------------------------------------------------
# A reference model and an interpreter for the instructions the compiler emits
# --------------------------------------------------------------------------------------------


def model(rules, dev_type, access, major, minor):
    """True when `rules` allow the request (dev_type 'b'/'c', access a set of 'rwm')."""
    verdict = False
    for r in rules:
        t = r.get("type") or "a"
        if t not in ("a", dev_type):
            continue
        if r.get("major") not in (None, -1) and r["major"] != major:
            continue
        if r.get("minor") not in (None, -1) and r["minor"] != minor:
            continue
        acc = r.get("access")
        if not set(access) <= set("rwm" if acc is None else acc):
            continue
        verdict = r["allow"]
    return verdict


def decode(prog):
    return [struct.unpack_from("<BBhi", prog, i) for i in range(0, len(prog), 8)]


def run(prog, dev_type, access, major, minor):
    """Interpret the program on one request; returns r0."""
    acc = sum({"m": 1, "r": 2, "w": 4}[c] for c in access)
    ctx = struct.pack("<III", (acc << 16) | {"b": 1, "c": 2}[dev_type], major, minor)
    insns = decode(prog)
    regs = [0] * 11
    regs[1] = "ctx"
    pc = 0
    for _ in range(10_000):
        code, r, off, imm = insns[pc]
        dst, src = r & 0xF, r >> 4
        pc += 1
        if code == 0x61:  # ldx w
            assert regs[src] == "ctx"
            regs[dst] = struct.unpack_from("<I", ctx, off)[0]
        elif code == 0xBC:  # mov32 reg
            regs[dst] = regs[src] & M32
        elif code == 0xB4:  # mov32 imm
            regs[dst] = imm & M32
        elif code == 0x54:  # and32 imm
            regs[dst] = regs[dst] & imm & M32
        elif code == 0x74:  # rsh32 imm
            regs[dst] = (regs[dst] & M32) >> imm
        elif code == 0x55:  # jne imm (64-bit compare, imm sign-extended)
            if regs[dst] != imm & M64:
                pc += off
        elif code == 0x5D:  # jne reg
            if regs[dst] != regs[src]:
                pc += off
        elif code == 0x95:
            return regs[0]
        else:
            raise AssertionError(f"unexpected opcode {code:#x} at {pc - 1}")
    raise AssertionError("program did not terminate")


def reachable(prog):
    """Indexes of reachable instructions (the verifier rejects unreachable ones)."""
    insns = decode(prog)
    seen, todo = set(), [0]
    while todo:
        pc = todo.pop()
        if pc in seen:
            continue
        assert 0 <= pc < len(insns), f"jump out of the program to {pc}"
        seen.add(pc)
        code, _, off, _ = insns[pc]
        if code == 0x95:
            continue
        todo.append(pc + 1)
        if code in (0x55, 0x5D):
            todo.append(pc + 1 + off)
    return seen


REQUESTS = [
    (t, a, maj, mnr)
    for t in "bc"
    for a in ("r", "w", "m", "rw", "rwm")
    for maj in (0, 1, 7, 2**31 + 1, M32)
    for mnr in (0, 3, 5, 2**31 + 1)
]


def check_against_model(rules):
    prog = _bpf.compile_device_filter(rules)
    assert len(prog) % 8 == 0
    assert reachable(prog) == set(range(len(prog) // 8))
    for req in REQUESTS:
        assert run(prog, *req) == int(model(rules, *req)), (rules, req)
    return prog


# --------------------------------------------------------------------------------------------
# Pure tests
# --------------------------------------------------------------------------------------------


def test_no_rules_denies_everything():
    prog = check_against_model([])
    assert len(prog) == 8 * (PROLOGUE + 2)


def test_unconditional_rule_shadows_earlier_rules():
    # The last rule matches everything: the earlier one must not even be emitted, or the
    # verifier would reject its unreachable instructions.
    rules = [{"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
             {"allow": False, "access": "rwm"}]
    prog = check_against_model(rules)
    assert len(prog) == 8 * (PROLOGUE + 2)
    assert run(prog, "c", "r", 1, 3) == 0


def test_instruction_count_grows_linearly():
    one = {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "r"}
    # per rule: type, access (3 insns), major, minor, verdict (2); then the default deny (2)
    assert len(_bpf.compile_device_filter([one])) == 8 * (PROLOGUE + 8 + 2)
    many = _bpf.compile_device_filter([one] * 100)
    assert len(many) == 8 * (PROLOGUE + 100 * 8 + 2)


def test_defaults_and_wildcards():
    check_against_model([{"allow": False},
                         {"allow": True, "type": "c", "major": -1, "minor": None},
                         {"allow": False, "type": "c", "major": 1, "minor": 5, "access": "w"}])


def test_default_spec_devices_compile():
    rules = [DENY_ALL] + [
        {"allow": True, "type": "c", "major": 1, "minor": m, "access": "rwm"}
        for m in (3, 5, 7, 8, 9)
    ] + [{"allow": True, "type": "c", "major": 5, "minor": 0, "access": "rwm"},
         {"allow": True, "type": "c", "major": 136, "access": "rwm"}]
    check_against_model(rules)


def test_empty_access_matches_nothing():
    prog = check_against_model([{"allow": True}, {"allow": False, "access": ""}])
    assert run(prog, "c", "r", 1, 3) == 1


def test_big_device_numbers():
    check_against_model([{"allow": True, "major": 2**31 + 1, "minor": M32},
                         {"allow": True, "type": "b", "major": M32, "access": "m"}])


def test_requested_access_must_be_within_rule():
    prog = _bpf.compile_device_filter([{"allow": True, "type": "c", "access": "r"}])
    assert run(prog, "c", "r", 1, 3) == 1
    assert run(prog, "c", "rw", 1, 3) == 0
    assert run(prog, "c", "m", 1, 3) == 0
    assert run(prog, "b", "r", 1, 3) == 0


RULE = st.fixed_dictionaries(
    {"allow": st.booleans()},
    optional={
        "type": st.sampled_from(["a", "b", "c"]),
        "major": st.sampled_from([None, -1, 0, 1, 7, 2**31 + 1, M32]),
        "minor": st.sampled_from([None, -1, 0, 3, 5, 2**31 + 1]),
        "access": st.sampled_from(["", "r", "w", "m", "rw", "rm", "wm", "rwm", "mwr", "rr"]),
    },
)


@settings(max_examples=150, deadline=None)
@given(st.lists(RULE, max_size=8))
def test_matches_model(rules):
    check_against_model(rules)


@pytest.mark.parametrize(
    ("rules", "field"),
    [
        ({"allow": True}, "linux.resources.devices"),
        (["rwm"], "linux.resources.devices[0]"),
        ([{"type": "c"}], "linux.resources.devices[0].allow"),
        ([{"allow": "yes"}], "linux.resources.devices[0].allow"),
        ([{"allow": True}, {"allow": True, "type": "x"}], "linux.resources.devices[1].type"),
        ([{"allow": True, "type": 99}], "linux.resources.devices[0].type"),
        ([{"allow": True, "access": "rwx"}], "linux.resources.devices[0].access"),
        ([{"allow": True, "access": ["r"]}], "linux.resources.devices[0].access"),
        ([{"allow": True, "major": -2}], "linux.resources.devices[0].major"),
        ([{"allow": True, "minor": "3"}], "linux.resources.devices[0].minor"),
        ([{"allow": True, "minor": True}], "linux.resources.devices[0].minor"),
        ([{"allow": True, "major": 1.5}], "linux.resources.devices[0].major"),
        ([{"allow": True, "major": 2**32}], "linux.resources.devices[0].major"),
    ],
)
def test_bad_rules_name_the_field(rules, field):
    with pytest.raises(ConfigError) as info:
        _bpf.compile_device_filter(rules)
    assert info.value.field == field


def test_load_rejects_malformed_bytes():
    with pytest.raises(ValueError, match="multiple of 8"):
        _bpf.load_device_program(b"\0" * 12)


# --------------------------------------------------------------------------------------------
# Root tests: real filters on a real cgroup
# --------------------------------------------------------------------------------------------

UNIFIED = Path("/sys/fs/cgroup/unified")

CHILD = r"""
import errno, json, os, stat, sys
cgroup, tmp, ops = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
modes = {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR}
out = {}
for name, op in ops.items():
    try:
        if op[0] == "open":
            os.close(os.open(op[1], modes[op[2]] | os.O_CLOEXEC))
        else:
            path = os.path.join(tmp, name)
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(op[1], op[2]))
            os.unlink(path)
        out[name] = "ok"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps(out))
"""

OPS = {
    "null_r": ("open", "/dev/null", "r"),  # c 1:3
    "null_w": ("open", "/dev/null", "w"),
    "zero_r": ("open", "/dev/zero", "r"),  # c 1:5
    "zero_w": ("open", "/dev/zero", "w"),
    "full_rw": ("open", "/dev/full", "rw"),  # c 1:7
    "mknod_null": ("mknod", 1, 3),
}
ALL_OK = dict.fromkeys(OPS, "ok")


def expect(**allowed):
    """The expected child result: the named ops allowed, every other one EPERM."""
    return {name: "ok" if allowed.get(name) else "EPERM" for name in OPS}


@pytest.fixture
def cgroup():
    """A fresh cgroup under the cgroup2 mount; removed afterwards, whatever happened."""
    if not (UNIFIED / "cgroup.procs").exists():
        pytest.skip("no cgroup2 hierarchy at /sys/fs/cgroup/unified")
    path = UNIFIED / f"corral-bpftest-{uuid.uuid4().hex}"
    path.mkdir()
    try:
        yield path
    finally:
        # Only our own children can be in it; kill them by pid, then wait for it to empty.
        deadline = time.monotonic() + 10
        while True:
            pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                path.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def probe(cf, cgroup, tmp_path):
    """Run the child in `cgroup` and return what each of OPS did ("ok" or an errno name)."""
    proc = cf.spawn([sys.executable, "-c", CHILD, str(cgroup), str(tmp_path), json.dumps(OPS)],
                         stdout=-1, stderr=-1)
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        cf.wait_tracked(proc, timeout=10)
    assert proc.returncode == 0, err.decode()
    assert list(tmp_path.iterdir()) == []
    return json.loads(out)


@pytest.mark.root
def test_baseline_without_filter(cf, cgroup, tmp_path):
    assert probe(cf, cgroup, tmp_path) == ALL_OK


CASES = {
    "no rules": ([], expect()),
    "deny all": ([DENY_ALL], expect()),
    "deny all, allow c 1:3 rwm": (
        [DENY_ALL, {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"}],
        expect(null_r=True, null_w=True, mknod_null=True),
    ),
    "deny all, allow c 1:* r": (
        [DENY_ALL, {"allow": True, "type": "c", "major": 1, "access": "r"}],
        expect(null_r=True, zero_r=True),
    ),
    "allow all, deny c 1:5 w": (
        [{"allow": True, "type": "a", "access": "rwm"},
         {"allow": False, "type": "c", "major": 1, "minor": 5, "access": "w"}],
        {**ALL_OK, "zero_w": "EPERM"},
    ),
    "later deny w overrides earlier allow rwm": (
        [DENY_ALL, {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
         {"allow": False, "type": "c", "major": 1, "minor": 3, "access": "w"}],
        expect(null_r=True, mknod_null=True),
    ),
    "later deny all overrides everything": (
        [{"allow": True, "type": "c", "major": 1, "access": "rwm"}, DENY_ALL],
        expect(),
    ),
    "later allow overrides earlier deny": (
        [{"allow": True}, {"allow": False, "type": "c", "major": 1, "minor": 7},
         {"allow": True, "type": "c", "major": 1, "minor": 7, "access": "rw"}],
        ALL_OK,
    ),
}


@pytest.mark.root
@pytest.mark.parametrize("case", list(CASES))
def test_filter_in_force(cf, cgroup, tmp_path, case):
    rules, expected = CASES[case]
    _bpf.set_device_rules(str(cgroup), rules)
    assert len(_bpf.query_device_programs(str(cgroup))) == 1
    assert probe(cf, cgroup, tmp_path) == expected


@pytest.mark.root
def test_replacing_leaves_one_program(cf, cgroup, tmp_path):
    _bpf.set_device_rules(str(cgroup), [DENY_ALL])
    (first,) = _bpf.query_device_programs(str(cgroup))
    assert probe(cf, cgroup, tmp_path) == expect()
    _bpf.set_device_rules(str(cgroup), [{"allow": True, "type": "c", "major": 1, "access": "r"}])
    (second,) = _bpf.query_device_programs(str(cgroup))
    assert second != first
    assert probe(cf, cgroup, tmp_path) == expect(null_r=True, zero_r=True)


def attach_raw(cgroup, rules, flags):
    """Attach a filter the way another manager might, bypassing attach_device_program."""
    prog = _bpf.load_device_program(_bpf.compile_device_filter(rules))
    try:
        dirfd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _bpf._attach(dirfd, prog, flags, str(cgroup))
        finally:
            os.close(dirfd)
    finally:
        os.close(prog)


@pytest.mark.root
def test_replacing_several_old_programs(cf, cgroup, tmp_path):
    # Two programs attached side by side (MULTI) by someone else: both go away.
    null_only = [{"allow": True, "type": "c", "major": 1, "minor": 3}]
    attach_raw(cgroup, null_only, _bpf.BPF_F_ALLOW_MULTI)
    attach_raw(cgroup, [DENY_ALL], _bpf.BPF_F_ALLOW_MULTI)
    assert len(_bpf.query_device_programs(str(cgroup))) == 2
    _bpf.set_device_rules(str(cgroup), [{"allow": True}])
    assert len(_bpf.query_device_programs(str(cgroup))) == 1
    assert probe(cf, cgroup, tmp_path) == ALL_OK


@pytest.mark.root
def test_replacing_an_exclusive_program(cf, cgroup, tmp_path):
    # A program attached without BPF_F_ALLOW_MULTI refuses MULTI neighbours: it is swapped.
    attach_raw(cgroup, [DENY_ALL], 0)
    (old,) = _bpf.query_device_programs(str(cgroup))
    _bpf.set_device_rules(str(cgroup), [{"allow": True}])
    (new,) = _bpf.query_device_programs(str(cgroup))
    assert new != old
    assert probe(cf, cgroup, tmp_path) == ALL_OK


@pytest.mark.root
@settings(max_examples=60, deadline=None)
@given(st.lists(RULE, max_size=12))
def test_verifier_accepts_compiled_programs(rules):
    os.close(_bpf.load_device_program(_bpf.compile_device_filter(rules)))


@pytest.mark.root
def test_load_error_carries_verifier_log():
    with pytest.raises(OSError, match="verifier log") as info:
        _bpf.load_device_program(struct.pack("<BBhi", 0x95, 0, 0, 0))  # exit, r0 unset
    assert "R0" in str(info.value)


@pytest.mark.root
def test_attach_to_missing_cgroup(tmp_path):
    with pytest.raises(FileNotFoundError):
        _bpf.set_device_rules(str(tmp_path / "nope"), [DENY_ALL])

