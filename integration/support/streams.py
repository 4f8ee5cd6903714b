#!/usr/bin/env python3
"""Long-lived test streams for the failover test and the demo (python3, standard library only).

  streams.py server PORT...                   TCP echo on every PORT (IPv4 and IPv6), UDP echo on
                                              every PORT too; one line per accepted connection
  streams.py client [--interval S] [--report S] [--text] NAME=PROTO:HOST:PORT...
                                              one stream per argument (PROTO tcp or udp; an IPv6
                                              HOST in brackets, e.g. tcp6=tcp:[fd00:2::10]:9003)

Each client stream sends a counter every --interval seconds and checks the echo: TCP echoes must
come back complete and in order (a reset, an end of stream or a wrong number ends the stream as
failed); UDP echoes may be lost but never invented. The client measures, per stream, the largest
gap between two consecutive echoes, i.e. how long the stream stood still.

Every --report seconds the client prints one JSON line {"t": ..., "streams": {...}} (with --text,
a line for humans instead). On SIGTERM, SIGINT or end of stdin it prints a final JSON line with
"final": true, in which the gap since the last echo counts as a gap too, and exits.

Times are CLOCK_MONOTONIC seconds (time.monotonic()), the clock of every process on the machine,
so a caller can line them up with its own events.
"""

import json
import os
import select
import signal
import socket
import sys
import threading
import time


PRINT_LOCK = threading.Lock()


def say(obj):
    """One JSON line; threads never interleave their lines."""
    line = json.dumps(obj) + "\n"
    with PRINT_LOCK:
        sys.stdout.write(line)
        sys.stdout.flush()


def serve(ports):
    def echo_tcp(conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()

    def accept(listener, port):
        while True:
            conn, peer = listener.accept()
            host = peer[0]
            if host.startswith("::ffff:"):
                host = host[len("::ffff:"):]
            say({"accepted": port, "peer": host})
            threading.Thread(target=echo_tcp, args=(conn,), daemon=True).start()

    def echo_udp(sock):
        while True:
            data, peer = sock.recvfrom(65536)
            sock.sendto(data, peer)

    for port in ports:
        tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        tcp.bind(("::", port))
        tcp.listen(64)
        threading.Thread(target=accept, args=(tcp, port), daemon=True).start()
        udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        udp.bind(("::", port))
        threading.Thread(target=echo_udp, args=(udp,), daemon=True).start()
    say({"listening": ports})
    while True:
        time.sleep(3600)


class Stream:
    def __init__(self, name, proto, host, port):
        self.name, self.proto, self.host, self.port = name, proto, host, port
        self.lock = threading.Lock()
        self.sent = 0
        self.echoed = 0
        self.lost = 0
        self.first_echo = None
        self.last_echo = None
        self.max_gap = 0.0
        self.max_gap_start = None
        self.state = "connecting"
        self.error = None
        self.local_port = None

    def note_echo(self, now):
        with self.lock:
            if self.last_echo is not None:
                gap = now - self.last_echo
                if gap > self.max_gap:
                    self.max_gap, self.max_gap_start = gap, self.last_echo
            else:
                self.first_echo = now
            self.last_echo = now
            self.echoed += 1

    def fail(self, state, error):
        with self.lock:
            if self.state == "running" or self.state == "connecting":
                self.state, self.error = state, error

    def report(self, now, final):
        with self.lock:
            max_gap, start = self.max_gap, self.max_gap_start
            # At the end, a stream that stands still has been standing still since its last echo.
            since = now - self.last_echo if self.last_echo is not None else None
            if final and since is not None and since > max_gap:
                max_gap, start = since, self.last_echo
            return {
                "proto": self.proto,
                "target": f"{self.host}:{self.port}",
                "local_port": self.local_port,
                "state": self.state,
                "error": self.error,
                "sent": self.sent,
                "echoed": self.echoed,
                "lost": self.lost,
                "max_gap": round(max_gap, 4),
                "max_gap_start": start,
                "since_last_echo": None if since is None else round(since, 4),
            }

    def run(self, interval, stop):
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            if self.proto == "tcp":
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.settimeout(5)
                sock.connect((self.host, self.port))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                sock = socket.socket(family, socket.SOCK_DGRAM)
                sock.connect((self.host, self.port))
            sock.setblocking(False)
            self.local_port = sock.getsockname()[1]
        except OSError as e:
            self.fail("failed", f"connect: {e}")
            return
        with self.lock:
            self.state = "running"
        buf = b""
        expect = 0
        next_send = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_send:
                msg = b"%d\n" % self.sent
                try:
                    if self.proto == "tcp":
                        # Unsent bytes stay queued: the send buffer is far larger than a stall's worth.
                        view = memoryview(msg)
                        while view:
                            n = sock.send(view)
                            view = view[n:]
                    else:
                        sock.send(msg)
                    with self.lock:
                        self.sent += 1
                except BlockingIOError:
                    pass
                except OSError as e:
                    if self.proto == "tcp":
                        self.fail("reset", f"send: {e}")
                        return
                    # UDP: an ICMP error on a connected socket; the stream goes on.
                next_send += interval
                if next_send < now:
                    next_send = now + interval
            timeout = max(0.0, next_send - time.monotonic())
            ready, _, _ = select.select([sock], [], [], min(timeout, 0.05))
            if not ready:
                continue
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as e:
                if self.proto == "tcp":
                    self.fail("reset", f"recv: {e}")
                    return
                continue
            now = time.monotonic()
            if self.proto == "tcp":
                if not data:
                    self.fail("closed", "the server ended the stream")
                    return
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line != b"%d" % expect:
                        self.fail("corrupt", f"expected {expect}, got {line[:20]!r}")
                        return
                    expect += 1
                    self.note_echo(now)
            else:
                try:
                    n = int(data.strip())
                except ValueError:
                    self.fail("corrupt", f"datagram {data[:20]!r}")
                    return
                if n < expect or n >= self.sent:
                    self.fail("corrupt", f"echo {n} while {expect} to {self.sent - 1} expected")
                    return
                with self.lock:
                    self.lost += n - expect
                expect = n + 1
                self.note_echo(now)


def client(args):
    interval, every, text = 0.02, 0.5, False
    specs = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--interval":
            interval = float(args[i + 1])
            i += 2
        elif a == "--report":
            every = float(args[i + 1])
            i += 2
        elif a == "--text":
            text = True
            i += 1
        else:
            name, rest = a.split("=", 1)
            proto, rest = rest.split(":", 1)
            host, port = rest.rsplit(":", 1)
            specs.append(Stream(name, proto, host.strip("[]"), int(port)))
            i += 1
    stop = threading.Event()
    done = threading.Event()

    def finish(*_):
        done.set()

    signal.signal(signal.SIGTERM, finish)
    signal.signal(signal.SIGINT, finish)

    def watch_stdin():
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        done.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    threads = [threading.Thread(target=s.run, args=(interval, stop), daemon=True) for s in specs]
    for t in threads:
        t.start()
    start = time.monotonic()

    def emit(final):
        now = time.monotonic()
        streams = {s.name: s.report(now, final) for s in specs}
        if text and not final:
            parts = []
            for name, r in streams.items():
                if r["state"] == "running":
                    parts.append(f"{name} {r['echoed']:>5} echoed, gap max {r['max_gap']:.2f}s")
                else:
                    parts.append(f"{name} {r['state'].upper()}")
            print(f"t={now - start:5.1f}s  " + " | ".join(parts), flush=True)
        else:
            line = {"t": now, "streams": streams}
            if final:
                line["final"] = True
            say(line)

    while not done.wait(every):
        emit(False)
    stop.set()
    emit(True)


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in ("server", "client"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    if sys.argv[1] == "server":
        serve([int(p) for p in sys.argv[2:]])
    else:
        client(sys.argv[2:])


if __name__ == "__main__":
    main()
