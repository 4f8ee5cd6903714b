#!/usr/bin/env bash
# ctsync demo: a keepalived firewall pair; the master dies and every connection survives.
#
#   client ──┐ LAN (10.91.1.0/24, fd91:1::/64)   ┌── fw1 (master) ──┐   WAN (10.91.2.0/24, fd91:2::/64)
#            └────────── switch ─────────────────┤                  ├──── switch ──── server
#                                                └── fw2 (backup) ──┘
#                                       fw1 ══ sync link (mutual TLS) ══ fw2
#
# Both firewalls run a strict nftables forward policy (established/related, plus new TCP only on a
# SYN and new UDP from the LAN; nf_conntrack_tcp_loose=0, so a mid-stream packet without a
# conntrack entry is dropped), source-NAT one flow to a shared address, and run keepalived (VRRP
# with a sync group moving the gateway addresses, v4 and v6) and ctsyncd. keepalived hands its
# transitions, in order, to config/keepalived/ctsync-notify.sh, which runs `syncctl promote` on
# MASTER and `syncctl demote` on BACKUP/FAULT; its vrrp_script holds a node back until
# `syncctl ready`. The keepalived setup is that of config/keepalived/keepalived.conf.
#
# The client keeps four streams open through the pair (TCP over IPv4, TCP source-NATed, TCP over
# IPv6, UDP), each sending a counter every 20 ms and checking the echo. Then fw1 is killed
# (SIGKILL of keepalived and ctsyncd, links down) and the streams go on through fw2.
#
# Usage (as root):  integration/demo.sh
#   CTSYNC_COMMIT_MODE=continuous integration/demo.sh   # replicated flows enter fw2's kernel
#                                                        # as they arrive, not at takeover
# Everything it creates is named ctsd-<pid>-* and removed on exit, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

mode=${CTSYNC_COMMIT_MODE:-manual}
case $mode in manual|continuous) ;; *) echo "CTSYNC_COMMIT_MODE must be manual or continuous" >&2; exit 2 ;; esac
if [ "$(id -u)" -ne 0 ]; then
  echo "demo.sh needs root (it creates network namespaces)" >&2
  exit 1
fi
for tool in ip nft keepalived python3 cargo; do
  command -v "$tool" >/dev/null || {
    echo "demo.sh needs '$tool' (apt-get install iproute2 nftables keepalived python3)" >&2
    exit 1
  }
done

p="ctsd-$$"
cl=$p-cl fw1=$p-f1 fw2=$p-f2 sv=$p-sv lsw=$p-ls wsw=$p-ws
work=$(mktemp -d "/tmp/$p.XXXXXX")
chmod 755 "$work"
pids=()
t0=${EPOCHREALTIME/[.,]/}

cleanup() {
  set +e
  trap - EXIT INT TERM
  for f in "$work"/*.vrrp.pid; do   # keepalived's VRRP children (their parents are in $pids)
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = keepalived ] && kill -TERM "$pid" 2>/dev/null
  done
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for _ in $(seq 20); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
  wait 2>/dev/null
  for ns in "$cl" "$fw1" "$fw2" "$sv" "$lsw" "$wsw"; do ip netns del "$ns" 2>/dev/null; done
  if [ "${keep_logs:-0}" = 1 ]; then
    echo "logs kept in $work"
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT
trap 'echo; echo "interrupted"; exit 130' INT TERM

step() {
  local us=$((${EPOCHREALTIME/[.,]/} - t0))
  printf '\n\033[1m== %s\033[0m  (t=%d.%d s)\n' "$1" $((us / 1000000)) $((us / 100000 % 10))
}
inns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
fail() { echo "demo FAILED: $*" >&2; keep_logs=1; exit 1; }

step "building ctsyncd and syncctl (release)"
cargo build --release --quiet --bin ctsyncd --bin syncctl
bin=$root/target/release

step "topology: client and server behind a pair of firewalls (namespaces $p-*)"
for ns in "$cl" "$fw1" "$fw2" "$sv" "$lsw" "$wsw"; do
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  inns "$ns" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
done
for sw in "$lsw" "$wsw"; do
  ip -n "$sw" link add "$p-br" type bridge mcast_snooping 0
  ip -n "$sw" link set "$p-br" up
done
# link NS IFNAME SWITCH PORT: a veth from a host namespace to a switch port.
link() {
  ip -n "$1" link add "$2" type veth peer name "$4" netns "$3"
  ip -n "$3" link set "$4" master "$p-br" up
  ip -n "$1" link set "$2" up
}
link "$cl" "$p-l" "$lsw" "$p-lc"
link "$fw1" "$p-l" "$lsw" "$p-l1"
link "$fw2" "$p-l" "$lsw" "$p-l2"
link "$fw1" "$p-w" "$wsw" "$p-w1"
link "$fw2" "$p-w" "$wsw" "$p-w2"
link "$sv" "$p-w" "$wsw" "$p-ws"
ip -n "$fw1" link add "$p-s" type veth peer name "$p-s" netns "$fw2"
ip -n "$fw1" link set "$p-s" up
ip -n "$fw2" link set "$p-s" up

ip -n "$cl" addr add 10.91.1.10/24 dev "$p-l"
ip -n "$cl" addr add fd91:1::10/64 dev "$p-l" nodad
ip -n "$cl" route add default via 10.91.1.1
ip -n "$cl" -6 route add default via fd91:1::1
ip -n "$sv" addr add 10.91.2.10/24 dev "$p-w"
ip -n "$sv" addr add fd91:2::10/64 dev "$p-w" nodad
ip -n "$sv" route add default via 10.91.2.1
ip -n "$sv" -6 route add default via fd91:2::1
n=0
for fw in "$fw1" "$fw2"; do
  n=$((n + 1))
  ip -n "$fw" addr add "10.91.1.$((n + 1))/24" dev "$p-l"
  ip -n "$fw" addr add "fd91:1::$((n + 1))/64" dev "$p-l" nodad
  ip -n "$fw" addr add "10.91.2.$((n + 1))/24" dev "$p-w"
  ip -n "$fw" addr add "fd91:2::$((n + 1))/64" dev "$p-w" nodad
  ip -n "$fw" addr add "10.91.255.$n/24" dev "$p-s"
  inns "$fw" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
  inns "$fw" nft -f - <<EOF
table inet ctsync_demo {
  # The sync link and VRRP need no connection tracking (and their flows no replication).
  chain raw_pre {
    type filter hook prerouting priority raw; policy accept;
    iifname "$p-s" notrack
    ip protocol 112 notrack
  }
  chain raw_out {
    type filter hook output priority raw; policy accept;
    oifname "$p-s" notrack
    ip protocol 112 notrack
  }
  # The firewall itself: established traffic, the sync link, VRRP, ICMP. Without this, a packet
  # for a NATed connection arriving before the new master committed it would reach the local
  # TCP stack (it is addressed to the shared NAT address) and be answered with a reset.
  chain input {
    type filter hook input priority filter; policy drop;
    iif "lo" accept
    ct state established,related accept
    iifname "$p-s" accept
    ip protocol 112 accept
    meta l4proto { icmp, ipv6-icmp } accept
  }
  chain forward {
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "$p-l" oifname "$p-w" tcp flags & (fin|syn|rst|ack) == syn ct state new accept
    iifname "$p-l" oifname "$p-w" meta l4proto udp ct state new accept
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "$p-w" ip saddr 10.91.1.10 tcp dport 9002 snat ip to 10.91.2.100
  }
}
EOF
  # No conntrack entry is made up from a mid-stream packet: without replicated state, a
  # connection the other firewall carried is dropped here.
  inns "$fw" sysctl -qw net.netfilter.nf_conntrack_tcp_loose=0
done
echo "client 10.91.1.10 fd91:1::10 -> gateway VIPs 10.91.1.1 fd91:1::1"
echo "server 10.91.2.10 fd91:2::10 -> gateway VIPs 10.91.2.1 fd91:2::1; SNAT address 10.91.2.100 (a VIP too)"
echo "fw1 10.91.255.1 <== sync link ==> fw2 10.91.255.2"

step "cluster PKI (syncctl pki) and ctsyncd on both firewalls, commit_mode = $mode"
"$bin/syncctl" pki init --dir "$work/pki" --cluster demo-pair >/dev/null
for node in fw1 fw2; do "$bin/syncctl" pki issue --dir "$work/pki" "$node" >/dev/null; done
ls "$work/pki"
start_ctsyncd() { # NODE NS ADDR PEER PEER_ADDR
  cat >"$work/$1.toml" <<EOF
node_id = "$1"
[control]
socket = "$work/$1.sock"
[sync]
cluster = "demo-pair"
listen = "$3:7400"
peers = [{ node_id = "$4", address = "$5:7400" }]
ready_timeout = "3s"
[sync.tls]
ca = "$work/pki/ca.pem"
cert = "$work/pki/$1.pem"
key = "$work/pki/$1.key"
[failover]
commit_mode = "$mode"
purge_delay = "30s"
EOF
  ip netns exec "$2" "$bin/ctsyncd" --config "$work/$1.toml" 2>"$work/$1.ctsyncd.log" &
  pids+=($!)
  disown
  echo $! >"$work/$1.ctsyncd.pid"
}
start_ctsyncd fw1 "$fw1" 10.91.255.1 fw2 10.91.255.2
start_ctsyncd fw2 "$fw2" 10.91.255.2 fw1 10.91.255.1
ctl() { local node=$1; shift; "$bin/syncctl" --socket "$work/$node.sock" "$@"; }
for node in fw1 fw2; do
  for _ in $(seq 100); do ctl "$node" ready >/dev/null 2>&1 && break; sleep 0.1; done
  ctl "$node" ready >/dev/null || fail "ctsyncd on $node is not ready; log: $(tail -5 "$work/$node.ctsyncd.log")"
done
echo "both ready (mirror synced, peer's snapshot received)"

step "keepalived on both firewalls: VRRP every 100 ms, sync group LAN+WAN, transitions -> ctsync-notify.sh"
# What keepalived runs, installed root-owned and not writable by others (enable_script_security).
mkdir -p "$work/bin"
cp "$bin/syncctl" "$root/config/keepalived/ctsync-notify.sh" "$work/bin/"
chmod 755 "$work/bin" "$work/bin/syncctl" "$work/bin/ctsync-notify.sh"
start_keepalived() { # NODE NS PRIORITY
  cat >"$work/$1.keepalived.conf" <<EOF
global_defs {
    router_id $1
    vrrp_version 3
    script_user root
    enable_script_security
    vrrp_garp_master_delay 1
    vrrp_garp_master_repeat 3
    # Every transition, in order, to ctsync-notify.sh (MASTER: promote; BACKUP/FAULT: demote).
    vrrp_notify_fifo $work/$1.fifo
    vrrp_notify_fifo_script "$work/bin/ctsync-notify.sh --syncctl $work/bin/syncctl --socket $work/$1.sock --log $work/$1.notify.log"
}
vrrp_script ctsync_ready {
    script "$work/bin/syncctl --socket $work/$1.sock --timeout 2 ready"
    interval 1
    timeout 3
    fall 2
    rise 1
}
vrrp_sync_group FW {
    group {
        LAN
        WAN
    }
}
vrrp_instance LAN {
    state BACKUP
    interface $p-l
    virtual_router_id 51
    priority $3
    advert_int 0.1
    virtual_ipaddress {
        10.91.1.1/24
    }
    virtual_ipaddress_excluded {
        fd91:1::1/64
    }
    track_script {
        ctsync_ready
    }
}
vrrp_instance WAN {
    state BACKUP
    interface $p-w
    virtual_router_id 52
    priority $3
    advert_int 0.1
    virtual_ipaddress {
        10.91.2.1/24
        10.91.2.100/24
    }
    virtual_ipaddress_excluded {
        fd91:2::1/64
    }
    track_script {
        ctsync_ready
    }
}
EOF
  ip netns exec "$2" keepalived --dont-fork --log-console --log-detail --no-syslog --vrrp \
    --use-file "$work/$1.keepalived.conf" --pid "$work/$1.ka.pid" --vrrp_pid "$work/$1.vrrp.pid" \
    >"$work/$1.keepalived.log" 2>&1 &
  pids+=($!)
  disown
}
start_keepalived fw1 "$fw1" 150
start_keepalived fw2 "$fw2" 100
for _ in $(seq 100); do
  ip -n "$fw1" -br addr show dev "$p-w" | grep -q 10.91.2.100 && break
  sleep 0.1
done
ip -n "$fw1" -br addr show dev "$p-w" | grep -q 10.91.2.100 || fail "fw1 did not become MASTER; $(tail -5 "$work/fw1.keepalived.log")"
sleep 0.5
echo "fw1 holds the VIPs:"
ip -n "$fw1" -br addr show | grep -E "$p-[lw]" | sed 's/^/  /'
for node in fw1 fw2; do
  echo "notify log of $node (keepalived -> ctsync-notify.sh -> syncctl):"
  sed 's/^/  /' "$work/$node.notify.log" 2>/dev/null || true
done

step "server echoes; the client opens 4 long-lived streams through the VIP (counter every 20 ms)"
streams=$root/integration/support/streams.py
ip netns exec "$sv" python3 "$streams" server 9001 9002 9003 9004 >"$work/server.log" 2>&1 &
pids+=($!)
disown
for _ in $(seq 50); do grep -q listening "$work/server.log" 2>/dev/null && break; sleep 0.1; done
mkfifo "$work/client.in"
ip netns exec "$cl" python3 "$streams" client --text --report 0.5 \
  tcp4=tcp:10.91.2.10:9001 snat4=tcp:10.91.2.10:9002 tcp6=tcp:[fd91:2::10]:9003 udp4=udp:10.91.2.10:9004 \
  <"$work/client.in" >"$work/client.log" 2>&1 &
pids+=($!)
disown
exec 8>"$work/client.in"   # the client runs until this is closed
sleep 2
tail -n 2 "$work/client.log"
echo "server saw (the snat4 stream arrives from the shared address 10.91.2.100):"
sed 's/^/  /' "$work/server.log"

step "syncctl status on fw1 (primary) and fw2 (backup)"
ctl fw1 status
echo
ctl fw2 status
echo
echo "fw2's external cache (flows learnt from fw1) and fw2's kernel table:"
ctl fw2 dump external | grep -E 'ORIGIN|900[1-4]' || true
if command -v conntrack >/dev/null; then
  inns "$fw2" conntrack -L 2>/dev/null | grep -E '900[1-4]' | sed 's/^/  kernel: /' \
    || echo "  kernel: no stream flows yet (commit_mode = $mode: they enter at takeover)"
fi

step "killing the master: SIGKILL keepalived and ctsyncd on fw1, fw1's links down"
kill -KILL "$(cat "$work/fw1.vrrp.pid")" "$(cat "$work/fw1.ka.pid")" "$(cat "$work/fw1.ctsyncd.pid")"
for dev in "$p-l" "$p-w" "$p-s"; do ip -n "$fw1" link set "$dev" down; done
echo "fw1 killed at $(date +%T.%N | cut -c1-12); the client's streams from just before the kill:"
seen=$(wc -l <"$work/client.log")
sleep 4
tail -n "+$seen" "$work/client.log"

step "fw2 took over"
echo "VIPs now on fw2:"
ip -n "$fw2" -br addr show | grep -E "$p-[lw]" | sed 's/^/  /'
echo "notify log of fw2:"
sed 's/^/  /' "$work/fw2.notify.log"
echo
ctl fw2 status
echo
if command -v conntrack >/dev/null; then
  echo "fw2's kernel table now carries the streams:"
  inns "$fw2" conntrack -L 2>/dev/null | grep -E '900[1-4]' | sed 's/^/  /' || true
fi

step "result: every stream kept going, largest gap per stream"
exec 8>&-
for _ in $(seq 50); do grep -q '"final"' "$work/client.log" && break; sleep 0.1; done
if ! python3 - "$work/client.log" <<'EOF'
import json, sys, time
final = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{") and '"final"' in l]
if not final:
    print("no final report from the client"); sys.exit(1)
ok = True
for name, s in final[-1]["streams"].items():
    good = s["state"] == "running" and s["max_gap"] < 1.0
    ok &= good
    extra = f", {s['lost']} datagrams lost" if s["proto"] == "udp" else ""
    print(f"  {name:6} {s['state']:8} {s['echoed']:5} echoes, largest gap {s['max_gap'] * 1000:6.0f} ms{extra}"
          f"  {'OK' if good else 'FAILED'}")
print("every connection survived the failover" if ok else "some connection did not survive")
sys.exit(0 if ok else 1)
EOF
then
  fail "a stream broke or stalled"
fi
step "done: namespaces and processes are removed on exit"
