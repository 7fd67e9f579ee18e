# bench/lib.sh: what bench-runtime.sh and bench-cgroups.sh share. Sourced (not run) after
# their option parsing, with BENCH_TMP set to the name of their temp directory's template:
#   BENCH_TMP=corral-bench; . "$(dirname "$0")/lib.sh"
# Gives: say, die; root and hyperfine checked; CORRAL, RUNC, CRUN (empty when missing),
# PYTHON, build_rootfs; tmp (a new temp dir), ids (the "runtime id" pairs the script's
# cleanup deletes), prefix (of every container id); crun_wrap (the unshare wrapper crun needs
# on a hybrid host); rt_argv and rt_cmd; remove_containers and remove_leftovers for the
# cleanup trap that each script keeps of its own.

say() { printf '==> %s\n' "$*" >&2; }
die() { printf '%s: %s\n' "$0" "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
command -v hyperfine >/dev/null || die "hyperfine not found (apt-get install hyperfine)"

here=$(cd "$(dirname "$0")" && pwd)
build_rootfs="$here/../scripts/build-rootfs"
[ -f "$build_rootfs" ] || die "$build_rootfs not found"

CORRAL=${CORRAL:-$here/../.venv/bin/corral}
RUNC=$(command -v "${RUNC:-runc}" || true)
CRUN=$(command -v "${CRUN:-crun}" || true)
PYTHON=${PYTHON:-$(dirname "$CORRAL")/python}

# ---------------------------------------------------------------- temp dir and cleanup
tmp=$(mktemp -d "/tmp/${BENCH_TMP:-corral-bench}.XXXXXX")
ids=()              # "runtime id" pairs to delete --force on exit
prefix="bench-$$"   # every container id starts with this, so leftovers are easy to spot

# crun refuses a hybrid cgroup layout (v1 controllers + cgroup2 at /sys/fs/cgroup/unified).
# Run it in a private mount namespace where the cgroup2 mount is gone; the host's mounts are
# never touched. Where there is no such mount, crun runs directly.
nsrun="$tmp/nsrun"
crun_wrap=()
if mountpoint -q /sys/fs/cgroup/unified 2>/dev/null; then
    printf '#!/bin/sh\numount /sys/fs/cgroup/unified || exit 125\nexec "$@"\n' > "$nsrun"
    chmod 755 "$nsrun"
    crun_wrap=(unshare --mount --propagation private "$nsrun")
fi

rt_argv() {  # rt_argv RUNTIME: set RT_ARGV to the runtime's command prefix, own --root state dir
    case $1 in
        corral) RT_ARGV=("$CORRAL" --root "$tmp/state/corral") ;;
        runc)   RT_ARGV=("$RUNC" --root "$tmp/state/runc") ;;
        crun)   RT_ARGV=("${crun_wrap[@]}" "$CRUN" --root "$tmp/state/crun") ;;
    esac
}
rt_cmd() {  # rt_cmd RUNTIME ARGS...: run a runtime command, killed after 60 s
    local RT_ARGV; rt_argv "$1"; shift
    timeout 60 "${RT_ARGV[@]}" "$@"
}

remove_leftovers() {  # for the scripts' cleanup: cgroups named $prefix-*, then the temp dir
    local d
    for d in /sys/fs/cgroup/*/"$prefix"-* /sys/fs/cgroup/*/*/"$prefix"-* \
             /sys/fs/cgroup/*/*/*/"$prefix"-*; do
        [ -e "$d" ] || continue
        echo "warning: removing leftover cgroup $d" >&2
        rmdir "$d" 2>/dev/null || echo "warning: could not remove $d" >&2
    done
    if grep -q " $tmp" /proc/self/mountinfo; then
        echo "warning: mounts left under $tmp; not removing it" >&2
    else
        rm -rf "$tmp"
    fi
}

remove_containers() {  # for the scripts' cleanup: every container in $ids and the state dirs
    local pair rt id
    for pair in "${ids[@]}"; do
        rt=${pair%% *}; id=${pair#* }
        # A Ctrl-C between `pause` and `resume` leaves the container frozen: thaw it first.
        rt_cmd "$rt" resume "$id" >/dev/null 2>&1
        rt_cmd "$rt" delete --force "$id" >/dev/null 2>&1
    done
    # Anything else left in the state dirs (e.g. a `run` interrupted mid-benchmark).
    for rt in corral runc crun; do
        [ -d "$tmp/state/$rt" ] || continue
        for id in $(rt_cmd "$rt" list -q 2>/dev/null); do
            rt_cmd "$rt" resume "$id" >/dev/null 2>&1
            rt_cmd "$rt" delete --force "$id" >/dev/null 2>&1
        done
    done
}
