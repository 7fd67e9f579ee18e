"""`--systemd-cgroup`: runc's `slice:prefix:name` is accepted and refused with a clear reason."""

import os

import pytest

pytestmark = pytest.mark.root


def test_systemd_cgroup_without_systemd(rt, make_bundle):
    if os.path.isdir("/run/systemd/system"):
        pytest.skip("systemd runs here: corral says the driver is not supported yet instead")
    b = make_bundle(changes={"linux": {"cgroupsPath": "system.slice:corral:abc"}})
    cid = rt.new_id()
    res = rt.raw([rt.binary, "--systemd-cgroup", "--root", str(rt.state_root), "run",
                  "--bundle", str(b.path), cid], check=False)
    assert res.returncode == 1
    assert "systemd is not running" in res.stderr
    assert rt.status(cid) is None  # nothing left: no state, and the fixture checks the rest


def test_systemd_cgroup_malformed_path(rt, make_bundle):
    b = make_bundle(changes={"linux": {"cgroupsPath": "/not/a/systemd/path"}})
    cid = rt.new_id()
    res = rt.raw([rt.binary, "--systemd-cgroup", "--root", str(rt.state_root), "create",
                  "--bundle", str(b.path), cid], check=False)
    assert res.returncode == 1
    assert "linux.cgroupsPath" in res.stderr
    assert "slice:prefix:name" in res.stderr
