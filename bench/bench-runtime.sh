#!/usr/bin/env bash
# bench-runtime.sh: container lifecycle latency of corral vs runc vs crun (issue 2).
#
#   bash bench/bench-runtime.sh [--runs N] [--warmup N] [--out DIR]
#
# Must run as root. Needs hyperfine, busybox-static (for scripts/build-rootfs), runc and/or crun,
# and a Python (or jq) to edit the bundle's config.json. Environment:
#   CORRAL  corral binary (default: .venv/bin/corral of this repository, made by scripts/setup);
#           skipped if missing or broken
#   RUNC    runc binary   (default: runc on PATH)
#   CRUN    crun binary   (default: crun on PATH)
#   PYTHON  python used to edit config.json (default: the python next to $CORRAL)
#
# Two hyperfine runs, each comparing the runtimes side by side:
#   1. `<rt> run` of /bin/true: create + start + wait + delete of one container, end to end.
#   2. `<rt> state ID` on a container left in the 'created' state.
# Everything (containers, cgroups, temp dirs) is removed on exit, also on failure or Ctrl-C.
set -euo pipefail

runs=50
warmup=5
out=
while [ $# -gt 0 ]; do
    case $1 in
        --runs) runs=$2; shift 2 ;;
        --runs=*) runs=${1#*=}; shift ;;
        --warmup) warmup=$2; shift 2 ;;
        --warmup=*) warmup=${1#*=}; shift ;;
        --out) out=$2; shift 2 ;;
        --out=*) out=${1#*=}; shift ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "$0: unknown argument: $1 (try --help)" >&2; exit 2 ;;
    esac
done
case $runs in ''|*[!0-9]*) echo "$0: --runs wants a number" >&2; exit 2 ;; esac
case $warmup in ''|*[!0-9]*) echo "$0: --warmup wants a number" >&2; exit 2 ;; esac

BENCH_TMP=corral-bench
# shellcheck source=bench/lib.sh
. "$(dirname "$0")/lib.sh"

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    remove_containers
    remove_leftovers
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- rootfs and bundles
say "building busybox rootfs in $tmp/rootfs"
sh "$build_rootfs" "$tmp/rootfs" >/dev/null
mkdir -p "$tmp/state/corral" "$tmp/state/runc" "$tmp/state/crun" "$tmp/bundle-true" "$tmp/bundle-sleep"

spec_rt=${RUNC:-$CRUN}
[ -n "$spec_rt" ] || die "neither runc nor crun found; need one of them for 'spec'"
(cd "$tmp/bundle-true" && "$spec_rt" spec)

edit_config() {  # edit_config CONFIG ROOTFS ARG...: terminal false, args, absolute root.path
    local cfg=$1 rootfs=$2; shift 2
    if [ -x "$PYTHON" ]; then
        "$PYTHON" - "$cfg" "$rootfs" "$@" <<'EOF'
import json, sys
cfg, rootfs, args = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(cfg) as f:
    c = json.load(f)
c["process"]["terminal"] = False
c["process"]["args"] = args
c["root"]["path"] = rootfs
with open(cfg, "w") as f:
    json.dump(c, f, indent=2)
EOF
    elif command -v jq >/dev/null; then
        # with --args, jq takes the words after the filter as values, so the file comes on stdin
        jq --arg r "$rootfs" '.process.terminal=false | .process.args=$ARGS.positional | .root.path=$r' \
            --args "$@" < "$cfg" > "$cfg.new" && mv "$cfg.new" "$cfg"
    else
        die "no python at $PYTHON (set PYTHON=) and no jq: cannot edit config.json"
    fi
}
cp "$tmp/bundle-true/config.json" "$tmp/bundle-sleep/config.json"
edit_config "$tmp/bundle-true/config.json" "$tmp/rootfs" /bin/true
edit_config "$tmp/bundle-sleep/config.json" "$tmp/rootfs" /bin/sleep 3600

# ---------------------------------------------------------------- which runtimes work
runtimes=()
smoke() {  # smoke RUNTIME: one `run` of /bin/true must succeed and leave nothing behind
    local rt=$1 id="$prefix-smoke-$1"
    ids+=("$rt $id")
    rt_cmd "$rt" run --bundle "$tmp/bundle-true" "$id" </dev/null >"$tmp/smoke-$rt.log" 2>&1 || return 1
    [ -z "$(rt_cmd "$rt" list -q 2>/dev/null)" ] || { echo "'$rt run' left a container behind" >>"$tmp/smoke-$rt.log"; return 1; }
}
if [ ! -x "$CORRAL" ]; then
    say "corral SKIPPED: $CORRAL not found (set CORRAL=)"
elif ! smoke corral; then
    say "corral SKIPPED: smoke run failed:"; sed 's/^/    /' "$tmp/smoke-corral.log" | tail -n 5 >&2
else
    runtimes+=(corral)
fi
if [ -z "$RUNC" ]; then say "runc SKIPPED: not found"
elif ! smoke runc; then say "runc SKIPPED: smoke run failed:"; tail -n 5 "$tmp/smoke-runc.log" >&2
else runtimes+=(runc); fi
if [ -z "$CRUN" ]; then say "crun SKIPPED: not found"
elif ! smoke crun; then say "crun SKIPPED: smoke run failed:"; tail -n 5 "$tmp/smoke-crun.log" >&2
else runtimes+=(crun); fi
[ ${#runtimes[@]} -gt 0 ] || die "no runtime works"
say "benchmarking: ${runtimes[*]}"

q() { printf '%q ' "$@"; }  # quote a command for hyperfine -N (which splits like a shell)

# ---------------------------------------------------------------- 1. run /bin/true
hf_args=()
for rt in "${runtimes[@]}"; do
    id="$prefix-run-$rt"
    ids+=("$rt $id")
    name="$rt run"
    [ "$rt" = crun ] && [ ${#crun_wrap[@]} -gt 0 ] && name="crun run (in unshare wrapper)"
    rt_argv "$rt"
    hf_args+=(-n "$name" "$(q "${RT_ARGV[@]}" run --bundle "$tmp/bundle-true" "$id")")
done
if [[ " ${runtimes[*]} " = *" crun "* ]] && [ ${#crun_wrap[@]} -gt 0 ]; then
    hf_args+=(-n "unshare wrapper alone (true)" "$(q "${crun_wrap[@]}" true)")
fi

say "hyperfine 1/2: '<runtime> run' of /bin/true ($runs runs, $warmup warmups each)"
hyperfine -N --warmup "$warmup" --runs "$runs" --time-unit millisecond \
    --export-markdown "$tmp/run.md" --export-json "$tmp/run.json" "${hf_args[@]}"

# `run` must delete the container when it exits; check, since the id is reused run after run.
for rt in "${runtimes[@]}"; do
    left=$(rt_cmd "$rt" list -q 2>/dev/null || true)
    [ -z "$left" ] || die "'$rt run' left containers behind: $left"
done

# ---------------------------------------------------------------- 2. state of a created container
hf_args=()
state_rts=()
for rt in "${runtimes[@]}"; do
    id="$prefix-state-$rt"
    ids+=("$rt $id")
    # stdio to /dev/null: the waiting init keeps its fds open until deleted.
    if ! rt_cmd "$rt" create --bundle "$tmp/bundle-sleep" "$id" </dev/null >/dev/null 2>"$tmp/create-$rt.log"; then
        say "$rt SKIPPED for state: create failed:"; tail -n 5 "$tmp/create-$rt.log" >&2; continue
    fi
    if ! rt_cmd "$rt" state "$id" 2>&1 | grep -q '"status": *"created"'; then
        say "$rt SKIPPED for state: container not in 'created' state"; continue
    fi
    # `crun state` only reads its state dir, so it runs without the wrapper when that works.
    rt_argv "$rt"
    name="$rt state"
    if [ "$rt" = crun ] && [ ${#crun_wrap[@]} -gt 0 ]; then
        if "$CRUN" --root "$tmp/state/crun" state "$id" >/dev/null 2>&1; then
            RT_ARGV=("$CRUN" --root "$tmp/state/crun")
        else
            name="crun state (in unshare wrapper)"
        fi
    fi
    state_rts+=("$rt")
    hf_args+=(-n "$name" "$(q "${RT_ARGV[@]}" state "$id")")
done
if [ ${#state_rts[@]} -gt 0 ]; then
    say "hyperfine 2/2: '<runtime> state ID' of a created container ($runs runs, $warmup warmups each)"
    hyperfine -N --warmup "$warmup" --runs "$runs" --time-unit millisecond \
        --export-markdown "$tmp/state.md" --export-json "$tmp/state.json" "${hf_args[@]}"
fi

# ---------------------------------------------------------------- summary
echo
echo "## run /bin/true"
cat "$tmp/run.md"
if [ -f "$tmp/state.md" ]; then
    echo
    echo "## state of a created container"
    cat "$tmp/state.md"
fi
echo
echo "machine: $(nproc) cpus, kernel $(uname -r), $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "versions: runc $("${RUNC:-false}" --version 2>/dev/null | head -n1 | awk '{print $3}')," \
    "crun $("${CRUN:-false}" --version 2>/dev/null | head -n1 | awk '{print $3}'), $(hyperfine --version)"
if [ ${#crun_wrap[@]} -gt 0 ] && [[ " ${runtimes[*]} " = *" crun "* ]]; then
    echo "note: 'crun run' includes the unshare wrapper; subtract the 'unshare wrapper alone' row."
fi
[[ " ${runtimes[*]} " = *" corral "* ]] || echo "note: corral was SKIPPED (not found or smoke run failed)."
if [ -n "$out" ]; then
    mkdir -p "$out"
    cp "$tmp"/run.md "$tmp"/run.json "$out"/
    [ -f "$tmp/state.md" ] && cp "$tmp"/state.md "$tmp"/state.json "$out"/
    say "results copied to $out"
fi
