"""`linux.resources` to cgroup writes (corral.runtime._resources): pure, no root, no cgroups.

plan() is checked as exact (file, value) lists for cgroup v1 and v2; the unit conversions
are computed here with runc's own formulas rather than with corral's helpers, so that a
wrong helper cannot agree with itself.
"""

import pytest
from corral.runtime._errors import ConfigError, CorralError
from corral.runtime._resources import (
    DEFAULT_ALLOWED,
    blkio_to_io_weight,
    device_rules,
    parse_size,
    plan,
    shares_to_weight,
    v1_device_line,
)

K, M, G = 1 << 10, 1 << 20, 1 << 30


def pairs(res, version):
    return [(w.file, w.value) for w in plan(res, version)]


def runc_weight(shares):
    """runc's cgroups.ConvertCPUSharesToCgroupV2Value."""
    return 0 if shares == 0 else 1 + ((shares - 2) * 9999) // 262142


def runc_io_weight(weight):
    """runc's cgroups.ConvertBlkIOToIOWeightValue."""
    return 0 if weight == 0 else 1 + ((weight - 10) * 9999) // 990


# -- plan(): the (file, value) pairs for each version ----------------------------------------

# id, resources, v1 writes, v2 writes (None: refused on that version, see the error tables)
PLANS = [
    ("empty", {}, [], []),
    ("empty-objects", {"memory": {}, "cpu": {}, "pids": {}, "blockIO": {}, "network": {},
                       "unified": {}, "rdma": {}, "hugepageLimits": []}, [], []),
    ("memory-limit", {"memory": {"limit": 64 * M}},
     [("memory.limit_in_bytes", str(64 * M))], [("memory.max", str(64 * M))]),
    ("memory-unlimited", {"memory": {"limit": -1}},
     [("memory.limit_in_bytes", "-1")], [("memory.max", "max")]),
    ("memory-reservation", {"memory": {"reservation": 32 * M}},
     [("memory.soft_limit_in_bytes", str(32 * M))], [("memory.low", str(32 * M))]),
    ("memory-reservation-unlimited", {"memory": {"reservation": -1}},
     [("memory.soft_limit_in_bytes", "-1")], [("memory.low", "max")]),
    ("memory-swap", {"memory": {"limit": 64 * M, "swap": 96 * M}},
     [("memory.limit_in_bytes", str(64 * M)), ("memory.memsw.limit_in_bytes", str(96 * M))],
     [("memory.max", str(64 * M)), ("memory.swap.max", str(32 * M))]),
    ("memory-swap-equal", {"memory": {"limit": 64 * M, "swap": 64 * M}},
     [("memory.limit_in_bytes", str(64 * M)), ("memory.memsw.limit_in_bytes", str(64 * M))],
     [("memory.max", str(64 * M)), ("memory.swap.max", "0")]),
    ("memory-swap-unlimited", {"memory": {"limit": 64 * M, "swap": -1}},
     [("memory.limit_in_bytes", str(64 * M)), ("memory.memsw.limit_in_bytes", "-1")],
     [("memory.max", str(64 * M)), ("memory.swap.max", "max")]),
    ("memory-v1-only", {"memory": {"swappiness": 10, "kernel": 8 * M, "kernelTCP": 4 * M,
                                   "disableOOMKiller": True}},
     [("memory.kmem.limit_in_bytes", str(8 * M)), ("memory.kmem.tcp.limit_in_bytes", str(4 * M)),
      ("memory.swappiness", "10"), ("memory.oom_control", "1")], None),
    ("memory-oom-killer-kept", {"memory": {"disableOOMKiller": False}}, [], []),
    ("cpu-shares-1024", {"cpu": {"shares": 1024}},
     [("cpu.shares", "1024")], [("cpu.weight", str(runc_weight(1024)))]),
    ("cpu-shares-min", {"cpu": {"shares": 2}}, [("cpu.shares", "2")], [("cpu.weight", "1")]),
    ("cpu-shares-max", {"cpu": {"shares": 262144}},
     [("cpu.shares", "262144")], [("cpu.weight", "10000")]),
    ("cpu-shares-0-unset", {"cpu": {"shares": 0}}, [], []),
    ("cpu-quota-period", {"cpu": {"quota": 50000, "period": 100000}},
     [("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", "50000")],
     [("cpu.max", "50000 100000")]),
    ("cpu-quota-only", {"cpu": {"quota": 20000}},
     [("cpu.cfs_quota_us", "20000")], [("cpu.max", "20000 $keep")]),
    ("cpu-period-only", {"cpu": {"period": 250000}},
     [("cpu.cfs_period_us", "250000")], [("cpu.max", "$keep 250000")]),
    ("cpu-quota-unlimited", {"cpu": {"quota": -1, "period": 100000}},
     [("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", "-1")], [("cpu.max", "max 100000")]),
    ("cpu-burst", {"cpu": {"burst": 1000}},
     [("cpu.cfs_burst_us", "1000")], [("cpu.max.burst", "1000")]),
    ("cpu-idle", {"cpu": {"idle": 1}}, [("cpu.idle", "1")], [("cpu.idle", "1")]),
    ("cpu-realtime", {"cpu": {"realtimePeriod": 1000000, "realtimeRuntime": 950000}},
     [("cpu.rt_period_us", "1000000"), ("cpu.rt_runtime_us", "950000")], None),
    ("cpuset", {"cpu": {"cpus": "0-2,4", "mems": "0"}},
     [("cpuset.cpus", "0-2,4"), ("cpuset.mems", "0")],
     [("cpuset.cpus", "0-2,4"), ("cpuset.mems", "0")]),
    ("cpuset-one", {"cpu": {"cpus": "0"}}, [("cpuset.cpus", "0")], [("cpuset.cpus", "0")]),
    ("pids", {"pids": {"limit": 100}}, [("pids.max", "100")], [("pids.max", "100")]),
    ("pids-0", {"pids": {"limit": 0}}, [("pids.max", "max")], [("pids.max", "max")]),
    ("pids-unlimited", {"pids": {"limit": -1}}, [("pids.max", "max")], [("pids.max", "max")]),
    ("blkio-weight", {"blockIO": {"weight": 500}},
     [("blkio.weight", "500")], [("io.weight", f"default {runc_io_weight(500)}")]),
    ("blkio-weight-bounds", {"blockIO": {"weight": 10}},
     [("blkio.weight", "10")], [("io.weight", "default 1")]),
    ("blkio-weight-top", {"blockIO": {"weight": 1000}},
     [("blkio.weight", "1000")], [("io.weight", "default 10000")]),
    ("blkio-leaf-weight", {"blockIO": {"leafWeight": 300}},
     [("blkio.leaf_weight", "300")], None),
    ("blkio-weight-device", {"blockIO": {"weightDevice": [
        {"major": 8, "minor": 0, "weight": 300}]}},
     [("blkio.weight_device", "8:0 300")], [("io.weight", f"8:0 {runc_io_weight(300)}")]),
    ("blkio-throttle", {"blockIO": {
        "throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 1048576}],
        "throttleWriteBpsDevice": [{"major": 8, "minor": 16, "rate": 2097152}],
        "throttleReadIOPSDevice": [{"major": 254, "minor": 0, "rate": 100}],
        "throttleWriteIOPSDevice": [{"major": 254, "minor": 0, "rate": 50}]}},
     [("blkio.throttle.read_bps_device", "8:0 1048576"),
      ("blkio.throttle.write_bps_device", "8:16 2097152"),
      ("blkio.throttle.read_iops_device", "254:0 100"),
      ("blkio.throttle.write_iops_device", "254:0 50")],
     [("io.max", "8:0 rbps=1048576"), ("io.max", "8:16 wbps=2097152"),
      ("io.max", "254:0 riops=100"), ("io.max", "254:0 wiops=50")]),
    ("blkio-throttle-zero", {"blockIO": {"throttleReadBpsDevice": [
        {"major": 8, "minor": 0, "rate": 0}]}},
     [("blkio.throttle.read_bps_device", "8:0 0")], [("io.max", "8:0 rbps=max")]),
    ("hugepages", {"hugepageLimits": [{"pageSize": "2MB", "limit": 64 * M},
                                      {"pageSize": "1GB", "limit": -1}]},
     [("hugetlb.2MB.limit_in_bytes", str(64 * M)), ("hugetlb.1GB.limit_in_bytes", "-1")],
     [("hugetlb.2MB.max", str(64 * M)), ("hugetlb.1GB.max", "max")]),
    ("hugepages-64kb", {"hugepageLimits": [{"pageSize": "64KB", "limit": 0}]},
     [("hugetlb.64KB.limit_in_bytes", "0")], [("hugetlb.64KB.max", "0")]),
    ("network", {"network": {"classID": 1048577, "priorities": [
        {"name": "eth0", "priority": 5}, {"name": "lo", "priority": 0}]}},
     [("net_cls.classid", "1048577"), ("net_prio.ifpriomap", "eth0 5"),
      ("net_prio.ifpriomap", "lo 0")], None),
    ("unified", {"unified": {"memory.high": "50M", "io.weight": "default 200",
                             "pids.max": "10"}},
     None, [("memory.high", "50M"), ("io.weight", "default 200"), ("pids.max", "10")]),
    ("rdma", {"rdma": {"mlx5_1": {"hcaHandles": 3, "hcaObjects": 10000}}},
     [("rdma.max", "mlx5_1 hca_handle=3 hca_object=10000")],
     [("rdma.max", "mlx5_1 hca_handle=3 hca_object=10000")]),
    ("devices-are-not-writes", {"devices": [{"allow": False, "access": "rwm"}]}, [], []),
    ("null-values-are-unset", {"memory": {"limit": None, "swap": None},
                               "cpu": {"shares": None, "quota": None, "period": None},
                               "pids": {"limit": None}}, [], []),
]


@pytest.mark.parametrize(("res", "v1", "v2"), [p[1:] for p in PLANS], ids=[p[0] for p in PLANS])
@pytest.mark.parametrize("version", [1, 2])
def test_plan_writes(res, v1, v2, version):
    want = v1 if version == 1 else v2
    if want is None:
        with pytest.raises(ConfigError):
            plan(res, version)
        return
    assert pairs(res, version) == want


def test_plan_controllers_and_fields():
    res = {"memory": {"limit": 64 * M, "swap": 96 * M}, "cpu": {"shares": 512, "quota": 1000,
                                                                "cpus": "0"},
           "pids": {"limit": 5}, "blockIO": {"weight": 100},
           "hugepageLimits": [{"pageSize": "2MB", "limit": 0}]}
    got = [(w.controller, w.file, w.field) for w in plan(res, 2)]
    assert got == [
        ("memory", "memory.max", "linux.resources.memory.limit"),
        ("memory", "memory.swap.max", "linux.resources.memory.swap"),
        ("cpu", "cpu.weight", "linux.resources.cpu.shares"),
        ("cpu", "cpu.max", "linux.resources.cpu.quota"),
        ("cpuset", "cpuset.cpus", "linux.resources.cpu.cpus"),
        ("pids", "pids.max", "linux.resources.pids.limit"),
        ("io", "io.weight", "linux.resources.blockIO.weight"),
        ("hugetlb", "hugetlb.2MB.max", "linux.resources.hugepageLimits[0].limit"),
    ]
    v1 = {(w.controller, w.file) for w in plan(res, 1)}
    assert ("blkio", "blkio.weight") in v1
    assert ("memory", "memory.memsw.limit_in_bytes") in v1
    assert ("cpu", "cpu.cfs_quota_us") in v1
    # unified keys are written to the controller named by the file's prefix
    (w,) = plan({"unified": {"hugetlb.2MB.max": "0"}}, 2)
    assert (w.controller, w.file, w.field) == (
        "hugetlb", "hugetlb.2MB.max", "linux.resources.unified.hugetlb.2MB.max")


def test_plan_field_prefix():
    with pytest.raises(ConfigError) as exc:
        plan({"pids": {"limit": "x"}}, 1, field="update")
    assert exc.value.field == "update.pids.limit"


def test_plan_does_not_modify_its_input():
    res = {"memory": {"limit": 64 * M, "swap": 96 * M}, "cpu": {"quota": 20000}}
    before = repr(res)
    plan(res, 1)
    plan(res, 2)
    assert repr(res) == before


@pytest.mark.parametrize("shares", [2, 3, 100, 512, 1024, 4096, 100000, 262143, 262144])
def test_shares_to_weight_is_runcs(shares):
    assert shares_to_weight(shares) == runc_weight(shares)
    assert 1 <= shares_to_weight(shares) <= 10000


def test_shares_to_weight_known_values():
    assert shares_to_weight(0) == 0
    assert shares_to_weight(2) == 1
    assert shares_to_weight(1024) == 39
    assert shares_to_weight(262144) == 10000


@pytest.mark.parametrize("weight", [10, 11, 100, 500, 999, 1000])
def test_blkio_to_io_weight_is_runcs(weight):
    assert blkio_to_io_weight(weight) == runc_io_weight(weight)
    assert 1 <= blkio_to_io_weight(weight) <= 10000


def test_blkio_to_io_weight_known_values():
    assert blkio_to_io_weight(0) == 0
    assert blkio_to_io_weight(10) == 1
    assert blkio_to_io_weight(500) == 4950
    assert blkio_to_io_weight(1000) == 10000


# -- plan(): errors name the exact field -----------------------------------------------------

R = "linux.resources"
BOTH = (1, 2)

# id, resources, versions it is refused on, the field the error must name
ERRORS = [
    ("not-an-object", [], BOTH, R),
    ("unknown-key", {"bogus": 1}, BOTH, f"{R}.bogus"),
    ("unknown-memory-key", {"memory": {"bogus": 1}}, BOTH, f"{R}.memory.bogus"),
    ("unknown-cpu-key", {"cpu": {"sharez": 2}}, BOTH, f"{R}.cpu.sharez"),
    ("unknown-pids-key", {"pids": {"max": 2}}, BOTH, f"{R}.pids.max"),
    ("unknown-blkio-key", {"blockIO": {"wieght": 100}}, BOTH, f"{R}.blockIO.wieght"),
    ("memory-not-object", {"memory": 5}, BOTH, f"{R}.memory"),
    ("cpu-not-object", {"cpu": []}, BOTH, f"{R}.cpu"),
    ("memory-limit-negative", {"memory": {"limit": -2}}, BOTH, f"{R}.memory.limit"),
    ("memory-reservation-negative", {"memory": {"reservation": -2}}, BOTH,
     f"{R}.memory.reservation"),
    ("memory-swap-negative", {"memory": {"swap": -2}}, BOTH, f"{R}.memory.swap"),
    ("memory-kernel-negative", {"memory": {"kernel": -2}}, (1,), f"{R}.memory.kernel"),
    ("memory-limit-string", {"memory": {"limit": "64M"}}, BOTH, f"{R}.memory.limit"),
    ("memory-limit-float", {"memory": {"limit": 1.5}}, BOTH, f"{R}.memory.limit"),
    ("memory-limit-bool", {"memory": {"limit": True}}, BOTH, f"{R}.memory.limit"),
    ("swap-below-limit", {"memory": {"limit": 128 * M, "swap": 64 * M}}, BOTH,
     f"{R}.memory.swap"),
    ("v2-swap-without-limit", {"memory": {"swap": 128 * M}}, (2,), f"{R}.memory.swap"),
    ("v2-swap-unlimited-limit", {"memory": {"limit": -1, "swap": 128 * M}}, (2,),
     f"{R}.memory.swap"),
    ("v2-swappiness", {"memory": {"swappiness": 10}}, (2,), f"{R}.memory.swappiness"),
    ("swappiness-range", {"memory": {"swappiness": 101}}, BOTH, f"{R}.memory.swappiness"),
    ("v2-kernel", {"memory": {"kernel": 8 * M}}, (2,), f"{R}.memory.kernel"),
    ("v2-kernel-tcp", {"memory": {"kernelTCP": 8 * M}}, (2,), f"{R}.memory.kernelTCP"),
    ("v2-oom-killer", {"memory": {"disableOOMKiller": True}}, (2,),
     f"{R}.memory.disableOOMKiller"),
    ("v2-network", {"network": {"classID": 1}}, (2,), f"{R}.network"),
    ("v2-network-priorities", {"network": {"priorities": [{"name": "lo", "priority": 1}]}},
     (2,), f"{R}.network"),
    ("v2-realtime-runtime", {"cpu": {"realtimeRuntime": 950000}}, (2,),
     f"{R}.cpu.realtimeRuntime"),
    ("v2-realtime-period", {"cpu": {"realtimePeriod": 1000000}}, (2,), f"{R}.cpu.realtimePeriod"),
    ("v2-leaf-weight", {"blockIO": {"leafWeight": 100}}, (2,), f"{R}.blockIO.leafWeight"),
    ("v1-unified", {"unified": {"memory.high": "50M"}}, (1,), f"{R}.unified"),
    ("unified-path", {"unified": {"../memory.max": "1"}}, (2,), f"{R}.unified.../memory.max"),
    ("unified-no-dot", {"unified": {"memory": "1"}}, (2,), f"{R}.unified.memory"),
    ("unified-core-file", {"unified": {"cgroup.procs": "1"}}, (2,), f"{R}.unified.cgroup.procs"),
    ("unified-value-type", {"unified": {"memory.high": 50}}, (2,), f"{R}.unified.memory.high"),
    ("unified-not-object", {"unified": ["memory.high"]}, (2,), f"{R}.unified"),
    ("cpuset-dash", {"cpu": {"cpus": "0-"}}, BOTH, f"{R}.cpu.cpus"),
    ("cpuset-letters", {"cpu": {"cpus": "a"}}, BOTH, f"{R}.cpu.cpus"),
    ("cpuset-double-dash", {"cpu": {"cpus": "0--2"}}, BOTH, f"{R}.cpu.cpus"),
    ("cpuset-range-letter", {"cpu": {"cpus": "1-x"}}, BOTH, f"{R}.cpu.cpus"),
    ("cpuset-int-1", {"cpu": {"cpus": 1}}, BOTH, f"{R}.cpu.cpus"),
    ("cpuset-mems", {"cpu": {"mems": "0;1"}}, BOTH, f"{R}.cpu.mems"),
    ("shares-1", {"cpu": {"shares": 1}}, BOTH, f"{R}.cpu.shares"),
    ("shares-too-big", {"cpu": {"shares": 262145}}, BOTH, f"{R}.cpu.shares"),
    ("shares-negative", {"cpu": {"shares": -1}}, BOTH, f"{R}.cpu.shares"),
    ("shares-string", {"cpu": {"shares": "1024"}}, BOTH, f"{R}.cpu.shares"),
    ("period-999", {"cpu": {"period": 999}}, BOTH, f"{R}.cpu.period"),
    ("period-too-big", {"cpu": {"period": 1_000_001}}, BOTH, f"{R}.cpu.period"),
    ("period-string", {"cpu": {"period": "100000"}}, BOTH, f"{R}.cpu.period"),
    ("quota-999", {"cpu": {"quota": 999}}, BOTH, f"{R}.cpu.quota"),
    ("quota-negative", {"cpu": {"quota": -2}}, BOTH, f"{R}.cpu.quota"),
    ("quota-float", {"cpu": {"quota": 1500.5}}, BOTH, f"{R}.cpu.quota"),
    ("burst-negative", {"cpu": {"burst": -1}}, BOTH, f"{R}.cpu.burst"),
    ("idle-2", {"cpu": {"idle": 2}}, BOTH, f"{R}.cpu.idle"),
    ("pids-string", {"pids": {"limit": "10"}}, BOTH, f"{R}.pids.limit"),
    ("pids-float", {"pids": {"limit": 1.5}}, BOTH, f"{R}.pids.limit"),
    ("pids-not-object", {"pids": 10}, BOTH, f"{R}.pids"),
    ("blkio-weight-low", {"blockIO": {"weight": 9}}, BOTH, f"{R}.blockIO.weight"),
    ("blkio-weight-high", {"blockIO": {"weight": 1001}}, BOTH, f"{R}.blockIO.weight"),
    ("throttle-not-array", {"blockIO": {"throttleReadBpsDevice": {"major": 8}}}, BOTH,
     f"{R}.blockIO.throttleReadBpsDevice"),
    ("throttle-no-major", {"blockIO": {"throttleReadBpsDevice": [{"minor": 0, "rate": 1}]}},
     BOTH, f"{R}.blockIO.throttleReadBpsDevice[0].major"),
    ("throttle-bad-minor", {"blockIO": {"throttleWriteIOPSDevice": [
        {"major": 8, "minor": 0, "rate": 1}, {"major": 8, "minor": -1, "rate": 1}]}},
     BOTH, f"{R}.blockIO.throttleWriteIOPSDevice[1].minor"),
    ("throttle-negative-rate", {"blockIO": {"throttleReadBpsDevice": [
        {"major": 8, "minor": 0, "rate": -5}]}}, BOTH,
     f"{R}.blockIO.throttleReadBpsDevice[0].rate"),
    ("throttle-unknown-key", {"blockIO": {"throttleReadBpsDevice": [
        {"major": 8, "minor": 0, "rate": 1, "weight": 5}]}}, BOTH,
     f"{R}.blockIO.throttleReadBpsDevice[0].weight"),
    ("weight-device-range", {"blockIO": {"weightDevice": [
        {"major": 8, "minor": 0, "weight": 5}]}}, BOTH, f"{R}.blockIO.weightDevice[0].weight"),
    ("hugepages-not-array", {"hugepageLimits": {"pageSize": "2MB"}}, BOTH, f"{R}.hugepageLimits"),
    ("hugepages-page-size", {"hugepageLimits": [{"pageSize": "2M", "limit": 0}]}, BOTH,
     f"{R}.hugepageLimits[0].pageSize"),
    ("hugepages-page-size-type", {"hugepageLimits": [{"pageSize": 2, "limit": 0}]}, BOTH,
     f"{R}.hugepageLimits[0].pageSize"),
    ("hugepages-limit", {"hugepageLimits": [{"pageSize": "2MB", "limit": -2}]}, BOTH,
     f"{R}.hugepageLimits[0].limit"),
    ("hugepages-missing-limit", {"hugepageLimits": [{"pageSize": "2MB"}]}, BOTH,
     f"{R}.hugepageLimits[0].limit"),
    ("hugepages-unknown-key", {"hugepageLimits": [{"pageSize": "2MB", "limit": 0, "x": 1}]},
     BOTH, f"{R}.hugepageLimits[0].x"),
    ("network-class-negative", {"network": {"classID": -1}}, (1,), f"{R}.network.classID"),
    ("network-unknown-key", {"network": {"classid": 1}}, BOTH, f"{R}.network.classid"),
    ("network-priority-name", {"network": {"priorities": [{"name": "e th0", "priority": 1}]}},
     (1,), f"{R}.network.priorities[0].name"),
    ("network-priority-value", {"network": {"priorities": [{"name": "eth0", "priority": -1}]}},
     (1,), f"{R}.network.priorities[0].priority"),
    ("rdma-bad-limit", {"rdma": {"mlx5_1": {"hcaHandles": -1}}}, BOTH,
     f"{R}.rdma.mlx5_1.hcaHandles"),
    ("rdma-unknown-key", {"rdma": {"mlx5_1": {"handles": 1}}}, BOTH, f"{R}.rdma.mlx5_1.handles"),
]


@pytest.mark.parametrize(
    ("res", "version", "field"),
    [pytest.param(res, v, field, id=f"{name}-v{v}") for name, res, vs, field in ERRORS for v in vs])
def test_plan_errors_name_the_field(res, version, field):
    with pytest.raises(ConfigError) as exc:
        plan(res, version)
    assert exc.value.field == field
    assert field in str(exc.value)


@pytest.mark.parametrize(("res", "words"), [
    ({"memory": {"swappiness": 10}}, "v2"),
    ({"network": {"classID": 1}}, "v2"),
    ({"cpu": {"realtimeRuntime": 5}}, "v2"),
    ({"memory": {"kernel": 5}}, "v2"),
])
def test_plan_v1_only_says_v2(res, words):
    with pytest.raises(ConfigError) as exc:
        plan(res, 2)
    assert words in exc.value.problem
    assert "not supported" in exc.value.problem or "do not exist" in exc.value.problem


def test_plan_unified_on_v1_says_v2():
    with pytest.raises(ConfigError) as exc:
        plan({"unified": {"pids.max": "5"}}, 1)
    assert "v2" in exc.value.problem


def test_plan_stops_at_the_first_bad_field():
    res = {"memory": {"limit": -2}, "pids": {"limit": "x"}}
    with pytest.raises(ConfigError) as exc:
        plan(res, 1)
    assert exc.value.field == "linux.resources.memory.limit"


# -- parse_size ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "value"), [
    ("64M", 64 * M),
    ("64m", 64 * M),
    ("512k", 512 * K),
    ("512K", 512 * K),
    ("1g", G),
    ("1.5G", 3 * G // 2),
    ("2GiB", 2 * G),
    ("2gb", 2 * G),
    ("64MB", 64 * M),
    ("1t", 1 << 40),
    ("100", 100),
    ("100b", 100),
    ("0", 0),
    ("-1", -1),
    (" 64M ", 64 * M),
    ("1048576", 1048576),
])
def test_parse_size(text, value):
    assert parse_size(text, "--memory") == value


@pytest.mark.parametrize("text", ["abc", "-5", "", " ", "M", "12x", "1.2.3", "-1M", "64 MM",
                                  "kb", "--1"])
def test_parse_size_errors_name_the_flag(text):
    with pytest.raises(CorralError) as exc:
        parse_size(text, "--memory-swap")
    assert "--memory-swap" in str(exc.value)
    assert repr(text) in str(exc.value)


@pytest.mark.parametrize("text", ["1_000", "+5", "1.5e3", "0x10"])
def test_parse_size_refuses_what_runc_refuses(text):
    # runc's units.RAMInBytes: ^(\d+(\.\d+)*) ?([kKmMgGtTpP])?[iI]?[bB]?$
    with pytest.raises(CorralError) as exc:
        parse_size(text, "--memory")
    assert "--memory" in str(exc.value)


def test_parse_size_negative_message():
    with pytest.raises(CorralError) as exc:
        parse_size("-5", "--memory")
    assert "negative" in str(exc.value)


# -- device_rules and v1_device_line ---------------------------------------------------------


def defaults():
    return [{"allow": True, "type": t, "major": ma, "minor": mi, "access": acc}
            for t, ma, mi, acc in DEFAULT_ALLOWED]


def test_default_allowed_has_runcs_devices():
    lines = {v1_device_line({"type": t, "major": ma, "minor": mi, "access": a})
             for t, ma, mi, a in DEFAULT_ALLOWED}
    for want in ("c *:* m", "b *:* m", "c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm",
                 "c 1:9 rwm", "c 5:0 rwm", "c 5:1 rwm", "c 5:2 rwm", "c 136:* rwm",
                 "c 10:200 rwm"):
        assert want in lines


def test_device_rules_config_rules_first_then_defaults():
    res = {"devices": [
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "b", "major": 8, "minor": 0, "access": "r"},
        {"allow": False, "type": "c", "major": 1, "minor": -1, "access": "w"},
    ]}
    got = device_rules(res)
    assert got[:3] == [
        {"allow": False, "type": "a", "major": None, "minor": None, "access": "rwm"},
        {"allow": True, "type": "b", "major": 8, "minor": 0, "access": "r"},
        {"allow": False, "type": "c", "major": 1, "minor": -1, "access": "w"},
    ]
    assert got[3:] == defaults()


def test_device_rules_empty():
    assert device_rules({}) == defaults()
    assert device_rules({"devices": []}) == defaults()


def test_device_rules_empty_type_and_access_mean_all():
    (first, *_) = device_rules({"devices": [{"allow": False, "type": "", "access": ""}]})
    assert first == {"allow": False, "type": "a", "major": None, "minor": None, "access": "rwm"}


def test_device_rules_allow_linux_devices_after_defaults():
    devices = [
        {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
        {"path": "/dev/loop0", "type": "b", "major": 7, "minor": 0},
        {"path": "/dev/fifo", "type": "p"},
    ]
    got = device_rules({"devices": [{"allow": False, "access": "rwm"}]}, devices)
    n = 1 + len(DEFAULT_ALLOWED)
    assert got[n:] == [
        {"allow": True, "type": "c", "major": 10, "minor": 229, "access": "rwm"},
        {"allow": True, "type": "b", "major": 7, "minor": 0, "access": "rwm"},
    ]


def test_device_rules_allow_unbuffered_char_devices():
    # linux.devices type "u" is an unbuffered character device: corral makes it with
    # S_IFCHR (as runc does), so it must be allowed as a "c" device like runc allows it.
    got = device_rules({"devices": [{"allow": False, "access": "rwm"}]},
                       [{"path": "/dev/ttyX", "type": "u", "major": 4, "minor": 64}])
    assert got[-1] == {"allow": True, "type": "c", "major": 4, "minor": 64, "access": "rwm"}


D = "linux.resources.devices"


@pytest.mark.parametrize(("rules", "field"), [
    ({"allow": False}, D),
    ([5], f"{D}[0]"),
    ([{"access": "rwm"}], f"{D}[0].allow"),
    ([{"allow": "yes", "access": "rwm"}], f"{D}[0].allow"),
    ([{"allow": 1, "access": "rwm"}], f"{D}[0].allow"),
    ([{"allow": True}, {"allow": True, "type": "x"}], f"{D}[1].type"),
    ([{"allow": True, "type": "p"}], f"{D}[0].type"),
    ([{"allow": True, "type": "c", "major": -2}], f"{D}[0].major"),
    ([{"allow": True, "type": "c", "major": "1"}], f"{D}[0].major"),
    ([{"allow": True, "type": "c", "major": 1, "minor": 1.5}], f"{D}[0].minor"),
    ([{"allow": True, "access": "rwx"}], f"{D}[0].access"),
    ([{"allow": True, "access": 7}], f"{D}[0].access"),
    ([{"allow": True, "path": "/dev/null"}], f"{D}[0].path"),
])
def test_device_rules_errors_name_the_field(rules, field):
    with pytest.raises(ConfigError) as exc:
        device_rules({"devices": rules})
    assert exc.value.field == field


@pytest.mark.parametrize(("rule", "line"), [
    ({"type": "a", "major": None, "minor": None, "access": "rwm"}, "a *:* rwm"),
    ({"type": "c", "major": 1, "minor": 3, "access": "rwm"}, "c 1:3 rwm"),
    ({"type": "b", "major": 8, "minor": -1, "access": "r"}, "b 8:* r"),
    ({"type": "c", "major": -1, "minor": 5, "access": "m"}, "c *:5 m"),
    ({"type": "b", "major": 8, "minor": 0, "access": "rw"}, "b 8:0 rw"),
])
def test_v1_device_line(rule, line):
    assert v1_device_line(rule) == line
