#!/usr/bin/env bash
# Kernel-bridge benchmark: builds ctsync-bench in release mode and runs it.
#
# Every argument is passed to ctsync-bench (see `integration/bench.sh --help`), e.g.
#   sudo integration/bench.sh --flows 250000 --runs 3
#   sudo integration/bench.sh --json --event-buffer 64M,256M > bench.json
#
# It must run as root: it creates (and removes) its own network namespaces, ctsb-<pid>-<n>,
# and writes their conntrack tables. Nothing outside those namespaces is touched.
set -euo pipefail

if [[ "$(id -u)" -ne 0 ]]; then
    echo "bench.sh: must be run as root (it creates network namespaces and writes their" \
         "conntrack tables); try: sudo $0 $*" >&2
    exit 1
fi
for tool in ip cargo; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "bench.sh: '$tool' not found in PATH" >&2
        exit 1
    fi
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --bin ctsync-bench >&2
target_dir="${CARGO_TARGET_DIR:-target}"
exec "$target_dir/release/ctsync-bench" "$@"
