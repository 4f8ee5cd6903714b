#!/bin/sh
# keepalived notify script for ctsync: tells the local ctsyncd its role.
#
#   MASTER          -> syncctl promote   (commit the peers' flows into the kernel, become primary)
#   BACKUP, FAULT   -> syncctl demote    (become backup; own flows are purged after purge_delay)
#   STOP            -> syncctl demote    (keepalived stops: the peer takes the addresses over)
#
# Two ways to run it from keepalived.conf:
#
# 1. FIFO (recommended): keepalived starts the script once and writes every transition, in
#    order, into a FIFO the script reads; transitions are applied one after the other.
#
#      global_defs {
#          vrrp_notify_fifo /run/keepalived-ctsync.fifo
#          vrrp_notify_fifo_script "/etc/keepalived/ctsync-notify.sh --socket /run/ctsync/ctsyncd.sock"
#      }
#
#    keepalived appends the FIFO's path. The script acts on the transitions of the sync group
#    (GROUP lines), or with --instance NAME on those of that one vrrp_instance.
#
# 2. notify: keepalived runs the script for every transition, appending TYPE NAME STATE
#    [PRIORITY]:
#
#      vrrp_sync_group FW { ... notify "/etc/keepalived/ctsync-notify.sh" }
#
#    keepalived does not wait for one notify before starting the next, so two transitions a few
#    milliseconds apart (BACKUP -> MASTER -> BACKUP when both nodes start at once) run
#    concurrently. A lock serialises them, but cannot restore their order: the daemon may end up
#    primary on a node keepalived made backup. Prefer the FIFO.
#
# Options, before the arguments keepalived appends:
#   --syncctl PATH   the syncctl binary (default: $CTSYNC_SYNCCTL, else syncctl from PATH,
#                    else /usr/local/bin/syncctl, else /usr/bin/syncctl)
#   --socket PATH    ctsyncd's control socket (default: $CTSYNC_SOCKET, else syncctl's default)
#   --config PATH    read the socket path from ctsyncd's configuration instead
#   --timeout SECS   how long syncctl waits for the daemon (default 30)
#   --instance NAME  FIFO mode: follow this vrrp_instance instead of the sync group
#   --log FILE       also append every message to FILE
#   --lock FILE      notify mode: the lock serialising transitions (default:
#                    $CTSYNC_NOTIFY_LOCK, else /run/ctsync/notify.lock)
#
# Messages go to syslog (tag ctsync-notify, facility daemon) and to stderr.
# Exit status (notify mode; keepalived ignores it, it is for logs and manual runs): 0 done;
# 1 the daemon refused or failed (promote: some flows were not committed; or ctsyncd
# unreachable); 2 usage error or unknown state. FIFO mode exits 0 when keepalived closes the FIFO.

set -u

syncctl=${CTSYNC_SYNCCTL:-}
socket=${CTSYNC_SOCKET:-}
config=
timeout=30
instance=
logfile=
lock=${CTSYNC_NOTIFY_LOCK:-/run/ctsync/notify.lock}

log() {
    msg="$*"
    logger -t ctsync-notify -p daemon.notice -- "$msg" 2>/dev/null || true
    printf 'ctsync-notify: %s\n' "$msg" >&2
    if [ -n "$logfile" ]; then
        printf '%s ctsync-notify[%s]: %s\n' "$(date '+%H:%M:%S.%N' | cut -c1-12)" "$$" "$msg" \
            >>"$logfile" 2>/dev/null || true
    fi
}

usage() {
    log "usage: $0 [--syncctl PATH] [--socket PATH | --config PATH] [--timeout SECS]" \
        "[--instance NAME] [--log FILE] [--lock FILE] {FIFO | TYPE NAME STATE [PRIORITY]}"
    exit 2
}

while [ $# -gt 0 ]; do
    case $1 in
        --syncctl) [ $# -ge 2 ] || usage; syncctl=$2; shift 2 ;;
        --socket) [ $# -ge 2 ] || usage; socket=$2; shift 2 ;;
        --config) [ $# -ge 2 ] || usage; config=$2; shift 2 ;;
        --timeout) [ $# -ge 2 ] || usage; timeout=$2; shift 2 ;;
        --instance) [ $# -ge 2 ] || usage; instance=$2; shift 2 ;;
        --log) [ $# -ge 2 ] || usage; logfile=$2; shift 2 ;;
        --lock) [ $# -ge 2 ] || usage; lock=$2; shift 2 ;;
        --) shift; break ;;
        -*) usage ;;
        *) break ;;
    esac
done

if [ -z "$syncctl" ]; then
    syncctl=$(command -v syncctl 2>/dev/null || true)
    for candidate in /usr/local/bin/syncctl /usr/bin/syncctl; do
        [ -n "$syncctl" ] && break
        [ -x "$candidate" ] && syncctl=$candidate
    done
fi

ctl() {
    if [ -n "$socket" ]; then
        "$syncctl" --json --timeout "$timeout" --socket "$socket" "$@"
    elif [ -n "$config" ]; then
        "$syncctl" --json --timeout "$timeout" --config "$config" "$@"
    else
        "$syncctl" --json --timeout "$timeout" "$@"
    fi
}

# apply TYPE NAME STATE: runs the syncctl command for STATE; 0 done, 1 failed, 2 unknown state.
apply() {
    case $3 in
        MASTER) action=promote ;;
        BACKUP|FAULT|STOP) action=demote ;;
        *) log "$1 $2 -> $3: unknown state, nothing to do"; return 2 ;;
    esac
    if [ -z "$syncctl" ] || [ ! -x "$syncctl" ]; then
        log "$1 $2 -> $3: syncctl not found (set --syncctl or CTSYNC_SYNCCTL)"
        return 1
    fi
    start=$(date +%s%N)
    out=$(ctl "$action" 2>&1 </dev/null)
    rc=$?
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    out=$(printf '%s' "$out" | tr '\n' ' ' | tr -s ' ')
    if [ "$rc" -eq 0 ]; then
        log "$1 $2 -> $3: syncctl $action done in ${ms} ms: $out"
        return 0
    fi
    log "$1 $2 -> $3: syncctl $action FAILED (exit $rc) after ${ms} ms: $out"
    return 1
}

if [ $# -eq 1 ] && [ -p "$1" ]; then
    # FIFO mode. keepalived sends SIGTERM when it stops and then writes its last (STOP)
    # transitions: ignore the signal and read on until keepalived closes the FIFO.
    trap '' TERM
    fifo=$1
    log "following keepalived's transitions of ${instance:-the sync group} in $fifo"
    while read -r type name state _rest; do
        name=${name#\"}
        name=${name%\"}
        case $type in
            GROUP) [ -z "$instance" ] || continue ;;
            INSTANCE) [ -n "$instance" ] && [ "$name" = "$instance" ] || continue ;;
            *) continue ;;
        esac
        apply "$type" "$name" "$state"
    done <"$fifo"
    log "$fifo closed: keepalived stopped"
    exit 0
fi

[ $# -ge 3 ] || usage

# Notify mode. Serialise transitions; go on unlocked if the lock cannot be set up.
if command -v flock >/dev/null 2>&1 && mkdir -p "$(dirname "$lock")" 2>/dev/null \
    && { : >>"$lock"; } 2>/dev/null; then
    exec 9>>"$lock"
    flock -w "$timeout" 9 || log "lock $lock busy for ${timeout}s; going on unlocked"
fi
apply "$1" "$2" "$3"
