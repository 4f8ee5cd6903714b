#!/usr/bin/env bash
# ctsync demo: a firewall in a network namespace between a client and a server; ctsyncd mirrors
# the firewall's conntrack table live while real connections open, change state and close.
#
# Usage (as root): integration/demo.sh
# Everything it creates is named ctsd-<pid>-* and removed on exit, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "demo.sh needs root (it creates network namespaces)" >&2
  exit 1
fi
for tool in ip nft python3; do
  command -v "$tool" >/dev/null || { echo "demo.sh needs '$tool' (apt-get install iproute2 nftables python3)" >&2; exit 1; }
done

p="ctsd-$$"
client="$p-cl" fw="$p-fw" server="$p-sv"
work=$(mktemp -d)
pids=()

cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for ns in "$client" "$fw" "$server"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "building ctsyncd and syncctl (release)"
cargo build --release --quiet --bin ctsyncd --bin syncctl
bin=target/release

step "namespaces: client <-> firewall <-> server"
for ns in "$client" "$fw" "$server"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip link add "$p-a" netns "$client" type veth peer name "$p-b" netns "$fw"
ip link add "$p-c" netns "$fw" type veth peer name "$p-d" netns "$server"
ip -n "$client" addr add 10.91.1.2/24 dev "$p-a"; ip -n "$client" link set "$p-a" up
ip -n "$fw" addr add 10.91.1.1/24 dev "$p-b"; ip -n "$fw" link set "$p-b" up
ip -n "$fw" addr add 10.91.2.1/24 dev "$p-c"; ip -n "$fw" link set "$p-c" up
ip -n "$server" addr add 10.91.2.2/24 dev "$p-d"; ip -n "$server" link set "$p-d" up
ip -n "$client" route add default via 10.91.1.1
ip -n "$server" route add default via 10.91.2.1
ip netns exec "$fw" sysctl -qw net.ipv4.ip_forward=1
# A strict stateful firewall: only established/related, and new TCP from the client side.
ip netns exec "$fw" nft -f - <<EOF
table inet demo {
  chain forward {
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "$p-b" tcp flags syn ct state new accept
    iifname "$p-b" icmp type echo-request accept
  }
}
EOF

step "starting ctsyncd on the firewall"
cat >"$work/ctsyncd.toml" <<EOF
node_id = "fw-demo"
[control]
socket = "$work/ctsyncd.sock"
EOF
ip netns exec "$fw" "$bin/ctsyncd" --config "$work/ctsyncd.toml" 2>"$work/ctsyncd.log" &
pids+=($!)
ctl() { "$bin/syncctl" --socket "$work/ctsyncd.sock" "$@"; }
for _ in $(seq 50); do ctl status >/dev/null 2>&1 && break; sleep 0.1; done
ctl status

step "server listens; the client opens 5 long-lived TCP connections through the firewall"
ip netns exec "$server" python3 - >"$work/server.log" 2>&1 <<'EOF' &
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.91.2.2", 8080)); s.listen(16)
def echo(c):
    while (d := c.recv(4096)):
        c.sendall(d)
while True:
    c, _ = s.accept(); threading.Thread(target=echo, args=(c,), daemon=True).start()
EOF
pids+=($!)
sleep 0.5
ip netns exec "$client" python3 - "$work/client.fifo" >"$work/client.log" 2>&1 <<'EOF' &
import socket, sys, time
conns = [socket.create_connection(("10.91.2.2", 8080), timeout=5) for _ in range(5)]
for c in conns:
    c.sendall(b"hello"); c.recv(16)
print("connected", flush=True)
time.sleep(3)
for c in conns:
    c.close()
print("closed", flush=True)
time.sleep(30)
EOF
pids+=($!)
for _ in $(seq 50); do grep -q connected "$work/client.log" 2>/dev/null && break; sleep 0.1; done
ip netns exec "$client" ping -c 2 -i 0.2 10.91.2.2 >/dev/null 2>&1 || true

step "the mirror (syncctl dump internal): ESTABLISHED flows, seen within milliseconds"
ctl dump internal | grep -E 'PROTO|8080|icmp' || true

step "the client closes its connections: the mirror follows the kernel's state changes"
for _ in $(seq 60); do grep -q closed "$work/client.log" 2>/dev/null && break; sleep 0.1; done
sleep 0.3
ctl dump internal | grep -E 'PROTO|8080' || true

step "status"
ctl status
echo
echo "kernel's own view (conntrack -L) for comparison:"
if command -v conntrack >/dev/null; then ip netns exec "$fw" conntrack -L 2>/dev/null | grep -E '8080|icmp' || true; fi
step "done: namespaces and processes are removed on exit"
