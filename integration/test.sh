#!/usr/bin/env bash
# The project's test command: builds every target and runs the whole test suite, the
# real-kernel integration tests (integration/) included.
#
#   sudo integration/test.sh            # as root: everything
#   CTSYNC_SKIP_NETNS=1 integration/test.sh   # without root: skips the namespace tests explicitly
#
# Without root and without CTSYNC_SKIP_NETNS=1 the integration tests fail on purpose: a suite
# that silently skips its kernel tests would look green without testing anything.
#
# Extra arguments go to the test binaries (e.g. a test name filter, or --nocapture to see the
# measured times). CTSYNC_TEST_PROFILE=release runs everything optimised: the default (debug)
# profile keeps overflow checks and, with a slower daemon, drives the event-overrun paths harder;
# release gives the timings operators would see.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

if [[ $(id -u) -ne 0 && "${CTSYNC_SKIP_NETNS:-}" != 1 ]]; then
    echo "note: not root; the integration tests will fail (set CTSYNC_SKIP_NETNS=1 to skip them)" >&2
fi

profile=()
case "${CTSYNC_TEST_PROFILE:-debug}" in
    debug) ;;
    release) profile=(--release) ;;
    *) echo "CTSYNC_TEST_PROFILE must be debug or release" >&2; exit 2 ;;
esac

# Compile first, so that compiling never counts against a test's deadline.
cargo test "${profile[@]}" --all-targets --no-run

# Two threads for a 2-core machine. The heavy integration tests (50k-250k flows, or measuring
# latencies) take a process-wide lock (integration/support/mod.rs: exclusive()), so they still run
# one at a time and never starve each other or the daemon they watch; the small tests run
# alongside. Test binaries themselves run one after another.
cargo test "${profile[@]}" --all-targets -- --test-threads=2 "$@"

# Every namespace a test creates is removed by a guard; a leftover means a guard failed.
# (Stale ones of killed earlier runs are swept when a test creates its first namespace.)
if [[ "${CTSYNC_SKIP_NETNS:-}" == 1 ]]; then
    echo "all tests passed (namespace tests skipped)"
    exit 0
fi
leaked=$(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^ctsi-[0-9]+-[0-9]+$' || true)
for ns in $leaked; do
    pid=${ns#ctsi-}
    pid=${pid%%-*}
    if [[ ! -d /proc/$pid ]]; then
        echo "error: test namespace $ns was left behind" >&2
        exit 1
    fi
done
echo "all tests passed"
