#!/usr/bin/env bash
# ctsync against conntrackd, side by side: builds ctsyncd and ctsync-compare in release mode and
# runs the comparison (see `integration/compare.sh --help`), e.g.
#   sudo integration/compare.sh                          # 10k, 100k, 250k flows, 3 runs, a table
#   sudo integration/compare.sh --json > compare.json
#   sudo integration/compare.sh --flows 100000 --runs 1 --only ctsync
#
# conntrackd comes from Debian's package (apt-get install conntrackd); without it only ctsync
# runs and no ratio is given. Must run as root: it creates (and removes) its own network
# namespaces, ctsb-<pid>-<n>, and runs both daemons inside them; nothing else is touched.
set -euo pipefail

if [[ "$(id -u)" -ne 0 ]]; then
    echo "compare.sh: must be run as root (it creates network namespaces and runs daemons" \
         "in them); try: sudo $0 $*" >&2
    exit 1
fi
for tool in ip nft cargo; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "compare.sh: '$tool' not found in PATH (apt-get install iproute2 nftables)" >&2
        exit 1
    fi
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --bin ctsyncd --bin ctsync-compare >&2
target_dir="${CARGO_TARGET_DIR:-target}"
exec "$target_dir/release/ctsync-compare" "$@"
