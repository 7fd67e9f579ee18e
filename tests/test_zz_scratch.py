import os, time, pytest

@pytest.mark.root
def test_leak_unrecorded(rt, make_bundle):
    b = make_bundle(args=("sleep", "30"))
    rt.raw(rt.argv("run", "-d", "--bundle", str(b.path), "t-" + "0123456789"))
    assert True

@pytest.mark.root
def test_leak_mount(rt, tmp_path):
    d = tmp_path / "m"; d.mkdir()
    rt.raw(["mount", "-t", "tmpfs", "x", str(d)])
    assert True

@pytest.mark.root
def test_zombies_reaped(rt, make_bundle):
    for _ in range(3):
        cid = rt.create(make_bundle(args=("sleep", "30")))
        rt("start", cid)
        rt("kill", cid, "KILL")
        assert rt.wait_status(cid, "stopped") == "stopped"
        rt("delete", cid)
    time.sleep(0.3)
    me = os.getpid()
    zombies = []
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                st = open(f"/proc/{e}/stat").read()
            except OSError:
                continue
            f = st[st.rfind(")")+2:].split()
            if f[0] == "Z" and int(f[1]) == me:
                zombies.append(e)
    assert zombies == []
