#!/usr/bin/env bash
# bench-cgroups.sh: cgroup operations of corral vs runc vs crun (issue 3).
#
#   bash bench/bench-cgroups.sh [--runs N] [--warmup N] [--oom-runs N] [--out DIR]
#
# Must run as root. Needs hyperfine, busybox-static (for scripts/build-rootfs), runc and/or crun,
# and the Python next to $CORRAL (edits config.json, runs bench/oom_latency.py). Environment:
#   CORRAL  corral binary (default: .venv/bin/corral of this repository, made by scripts/setup);
#           skipped if missing or broken
#   RUNC    runc binary   (default: runc on PATH)
#   CRUN    crun binary   (default: crun on PATH)
#   PYTHON  python for config.json and oom_latency.py (default: the python next to $CORRAL)
#
#   1. hyperfine, all rows in one invocation: `sh -c '<rt> pause ID && <rt> resume ID'` on a
#      running container (busybox sleep), per runtime, plus the bare shell
#      `sh -c 'true && true'` (and, for crun on a hybrid host, the unshare wrapper twice).
#   2. bench/oom_latency.py --runs N: how soon `<rt> events` reports an OOM kill (corral, runc);
#      --oom-runs 0 skips it.
# Everything (containers, cgroups, temp dirs) is removed on exit, also on failure or Ctrl-C.
set -euo pipefail

runs=50
warmup=5
oom_runs=10
out=
while [ $# -gt 0 ]; do
    case $1 in
        --runs) runs=$2; shift 2 ;;
        --runs=*) runs=${1#*=}; shift ;;
        --warmup) warmup=$2; shift 2 ;;
        --warmup=*) warmup=${1#*=}; shift ;;
        --oom-runs) oom_runs=$2; shift 2 ;;
        --oom-runs=*) oom_runs=${1#*=}; shift ;;
        --out) out=$2; shift 2 ;;
        --out=*) out=${1#*=}; shift ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "$0: unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
done
for n in "$runs" "$warmup" "$oom_runs"; do
    case $n in ''|*[!0-9]*) echo "$0: --runs, --warmup and --oom-runs want a number" >&2; exit 2 ;; esac
done

BENCH_TMP=corral-bench-cg
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"
[ -x "$PYTHON" ] || die "no python at $PYTHON (set PYTHON=)"

hf_pid=      # hyperfine while it runs: in the background, stopped by cleanup (see there)
cleanup() {
    local rc=$? kids k n
    trap - EXIT INT TERM
    set +e
    if [ -n "$hf_pid" ] && kill -0 "$hf_pid" 2>/dev/null; then
        # As a background job it ignores Ctrl-C: stop it, and let its current
        # `sh -c '... pause && ... resume'` finish (it ignores Ctrl-C too), so that no
        # container is left frozen halfway.
        kids=$(pgrep -P "$hf_pid" || true)
        kill "$hf_pid" 2>/dev/null
        wait "$hf_pid" 2>/dev/null
        for k in $kids; do
            n=0
            while kill -0 "$k" 2>/dev/null && [ $n -lt 600 ]; do sleep 0.1; n=$((n + 1)); done
        done
    fi
    remove_containers
    remove_leftovers
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- rootfs and bundle
say "building busybox rootfs in $tmp/rootfs"
sh "$build_rootfs" "$tmp/rootfs" >/dev/null
mkdir -p "$tmp/state/corral" "$tmp/state/runc" "$tmp/state/crun" "$tmp/bundle-sleep"

spec_rt=${RUNC:-$CRUN}
[ -n "$spec_rt" ] || die "neither runc nor crun found; need one of them for 'spec'"
(cd "$tmp/bundle-sleep" && "$spec_rt" spec)
"$PYTHON" - "$tmp/bundle-sleep/config.json" "$tmp/rootfs" <<'EOF'
import json, sys
cfg, rootfs = sys.argv[1], sys.argv[2]
with open(cfg) as f:
    c = json.load(f)
c["process"]["terminal"] = False
c["process"]["args"] = ["/bin/sleep", "3600"]
c["root"]["path"] = rootfs
with open(cfg, "w") as f:
    json.dump(c, f, indent=2)
EOF

# ---------------------------------------------------------------- a running container each
runtimes=()
prepare() {  # prepare RUNTIME: create + start a sleep container; one pause/resume must work
    local rt=$1 id="$prefix-pause-$1" log="$tmp/prepare-$1.log"
    ids+=("$rt $id")
    # stdio to /dev/null: the container keeps its fds open until deleted.
    rt_cmd "$rt" create --bundle "$tmp/bundle-sleep" "$id" </dev/null >/dev/null 2>"$log" || return 1
    rt_cmd "$rt" start "$id" </dev/null >>"$log" 2>&1 || return 1
    rt_cmd "$rt" pause "$id" </dev/null >>"$log" 2>&1 || return 1
    rt_cmd "$rt" state "$id" 2>>"$log" | grep -q '"status": *"paused"' \
        || { echo "not 'paused' after pause" >>"$log"; return 1; }
    rt_cmd "$rt" resume "$id" </dev/null >>"$log" 2>&1 || return 1
    rt_cmd "$rt" state "$id" 2>>"$log" | grep -q '"status": *"running"' \
        || { echo "not 'running' after resume" >>"$log"; return 1; }
}
try() {  # try RUNTIME BINARY
    if [ -z "$2" ] || [ ! -x "$2" ]; then say "$1 SKIPPED: not found"
    elif ! prepare "$1"; then say "$1 SKIPPED: create/start/pause/resume failed:"; tail -n 5 "$tmp/prepare-$1.log" >&2
    else runtimes+=("$1"); fi
}
try corral "$CORRAL"
try runc "$RUNC"
try crun "$CRUN"
[ ${#runtimes[@]} -gt 0 ] || die "no runtime works"
say "benchmarking: ${runtimes[*]}"

q() { printf '%q ' "$@"; }  # quote a command for hyperfine -N (which splits like a shell)

# ---------------------------------------------------------------- 1. pause + resume
hf_args=()
wrapped=0
for rt in "${runtimes[@]}"; do
    id="$prefix-pause-$rt"
    rt_argv "$rt"
    name="$rt pause+resume"
    if [ "$rt" = crun ] && [ ${#crun_wrap[@]} -gt 0 ]; then
        name="crun pause+resume (each in unshare wrapper)"; wrapped=1
    fi
    a=$(q "${RT_ARGV[@]}")
    hf_args+=(-n "$name" "$(q sh -c "${a}pause $(q "$id")&& ${a}resume $(q "$id")")")
done
hf_args+=(-n "sh -c 'true && true' (shell alone)" "$(q sh -c 'true && true')")
if [ "$wrapped" = 1 ]; then
    w=$(q "${crun_wrap[@]}")
    hf_args+=(-n "unshare wrapper alone, twice" "$(q sh -c "${w}true && ${w}true")")
fi

say "hyperfine: pause + resume of a running container ($runs runs, $warmup warmups each)"
hyperfine -N --warmup "$warmup" --runs "$runs" --time-unit millisecond \
    --export-markdown "$tmp/pause.md" --export-json "$tmp/pause.json" "${hf_args[@]}" &
hf_pid=$!
wait "$hf_pid"  # a trapped signal interrupts `wait` at once, unlike a foreground command
hf_pid=

for rt in "${runtimes[@]}"; do  # every pair must have left the container running
    rt_cmd "$rt" state "$prefix-pause-$rt" 2>/dev/null | grep -q '"status": *"running"' \
        || die "$rt: container not 'running' after the benchmark"
done

# ---------------------------------------------------------------- 2. OOM report latency
oom_rc=0
if [ "$oom_runs" -gt 0 ]; then
    oom_rts=()
    for rt in corral runc; do [[ " ${runtimes[*]} " = *" $rt "* ]] && oom_rts+=("$rt"); done
    if [ ${#oom_rts[@]} -gt 0 ]; then
        say "oom_latency.py: $oom_runs OOM kills per runtime (${oom_rts[*]})"
        # Its own temp dir, containers and cleanup; Ctrl-C reaches it too, and bash waits for it.
        CORRAL=$CORRAL RUNC=$RUNC "$PYTHON" "$here/oom_latency.py" --runs "$oom_runs" \
            --runtimes "$(IFS=,; echo "${oom_rts[*]}")" --rootfs "$tmp/rootfs" \
            --json "$tmp/oom.json" > "$tmp/oom.md" || oom_rc=$?
    fi
fi

# ---------------------------------------------------------------- summary
echo
echo "## pause + resume of a running container"
cat "$tmp/pause.md"
if [ -s "$tmp/oom.md" ]; then
    echo
    echo "## OOM report latency"
    cat "$tmp/oom.md"
fi
echo
echo "machine: $(nproc) cpus, kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "versions: runc $("${RUNC:-false}" --version 2>/dev/null | head -n1 | awk '{print $3}')," \
    "crun $("${CRUN:-false}" --version 2>/dev/null | head -n1 | awk '{print $3}'), $(hyperfine --version)"
if [ "$wrapped" = 1 ]; then
    echo "note: the crun row runs the unshare wrapper twice; subtract the 'unshare wrapper alone, twice' row."
fi
echo "note: every row includes the shell; subtract the 'shell alone' row for the two runtime commands."
[[ " ${runtimes[*]} " = *" corral "* ]] || echo "note: corral was SKIPPED (not found or pause/resume failed)."
if [ -n "$out" ]; then
    mkdir -p "$out"
    cp "$tmp"/pause.md "$tmp"/pause.json "$out"/
    [ -f "$tmp/oom.json" ] && cp "$tmp"/oom.md "$tmp"/oom.json "$out"/
    say "results copied to $out"
fi
[ "$oom_rc" -eq 0 ] || die "oom_latency.py failed (exit $oom_rc)"
