#!/usr/bin/python3
"""Fairness with each reactor in its own process: a quiet socket's delay under
a firehose for PyZMQ's ZMQStream, next to the C reactors of perf/fair.c.

The feeders are always `fair --feed-only` (perf/fair.c's firehose and quiet
threads in their own process), connected to the reactor's two PULL sockets,
so every row gets the same feed. Reactors (impl=), each in its own process:
  c_raw, c_zev, c_zloop  `fair --react-only --impl raw|zev|zloop` (C)
  pyzmq_stream           two ZMQStreams whose on_recv run on tornado's IOLoop
                         (asyncio), in this process
The reactor's count of firehose messages handled lives in a small file both
processes map (layout in perf/fair.c's top comment): the reactor stores it per
message, the quiet feeder copies it into each quiet message, so msgs_* mean
what they mean in fair.c. Metrics, and how they are computed, are fair.c's.
Transports ipc and tcp (quick mode: ipc only, to stay within ~20 s: a run
takes 0.5-1 s of process start, warm-up, 200 quiet messages and teardown).
Interleaved runs, medians over runs.

pyzmq_fair.py --fair PATH [--full] [--runs N] [--transports ipc,tcp]
              [--impls c_raw,...] [--quiet Q]

Run with Debian's /usr/bin/python3 (python3-zmq, python3-tornado).
Output: the RUN / RESULT / RATIO / FAIL grammar of perf/common.h.
"""
import math
import mmap
import os
import struct
import sys
import tempfile
import time

sys.dont_write_bytecode = True  # keep perf/ free of __pycache__
import pyzmq_common as pc  # noqa: E402  (perf/ is sys.path[0])

METRICS = {"delay_p50_us": "us", "delay_p99_us": "us", "delay_max_us": "us", "msgs_p50": "msgs",
           "msgs_p99": "msgs", "msgs_max": "msgs", "fire_rate": "msg/s"}
IMPLS = ["c_raw", "c_zev", "c_zloop", "pyzmq_stream"]
DEADLINE_S = 30.0  # fair.c's DEADLINE_NS
COUNT = struct.Struct("q")  # the shared count: a native 8-byte long at offset 0
QUIET = struct.Struct("Qq")  # fair.c's quiet_msg_t: sent_ns, fire_seen


class SharedCount:
    """The file holding the reactor's handled count, zeroed before each run."""

    def __init__(self):
        where = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        fd, self.path = tempfile.mkstemp(prefix="zev-perf-fair-", dir=where)
        os.write(fd, bytes(64))
        self.map = mmap.mmap(fd, 64)
        os.close(fd)

    def reset(self):
        COUNT.pack_into(self.map, 0, 0)

    def close(self):
        self.map.close()
        os.unlink(self.path)


def pct(sorted_vals, p):
    """Nearest rank, as perf_pct in perf/common.c."""
    rank = min(max(math.ceil(p / 100.0 * len(sorted_vals)), 1), len(sorted_vals))
    return sorted_vals[rank - 1]


def summarize(delay_ns, delay_msgs, first, last):
    """fair.c's summarize(): the metrics of one run; first and last are the
    (time, firehose count) at the first and the last quiet message."""
    d = sorted(delay_ns)
    m = sorted(max(0, x) for x in delay_msgs)
    rate = (last[1] - first[1]) * 1e9 / (last[0] - first[0]) if last[0] > first[0] else math.nan
    return {"delay_p50_us": pct(d, 50) / 1e3, "delay_p99_us": pct(d, 99) / 1e3,
            "delay_max_us": d[-1] / 1e3, "msgs_p50": pct(m, 50), "msgs_p99": pct(m, 99),
            "msgs_max": m[-1], "fire_rate": rate}


def feeder(fair, eps, shm, quiet):
    return pc.start_held([fair, "--feed-only", *eps, "--shm", shm.path, "--quiet", str(quiet)])


def run_c(fair, impl, eps, shm, quiet):
    """One run of `fair --react-only`: (metrics, None) or (None, reason)."""
    rx, why = pc.start_ready([fair, "--react-only", *eps, "--shm", shm.path, "--impl", impl[2:],
                              "--quiet", str(quiet)], "reactor")
    if rx is None:
        return None, why
    feed = feeder(fair, eps, shm, quiet)
    out, why = pc.finish(rx, DEADLINE_S + 10)
    pc.stop_held(feed)
    return pc.parse_sample(out) if out is not None else (None, why)


def run_pyzmq(zmq, IOLoop, ZMQStream, fair, eps, shm, quiet):
    """One run of the ZMQStream reactor in this process."""
    deadline = time.monotonic_ns() + int(DEADLINE_S * 1e9)  # CLOCK_MONOTONIC, as in C
    ctx = zmq.Context()
    socks = []
    try:
        for ep in eps:
            s = ctx.socket(zmq.PULL)
            s.linger = 0
            socks.append(s)
            s.bind(ep)
    except zmq.ZMQError:
        for s in socks:
            s.close()
        ctx.term()
        return None, "bind"
    loop = IOLoop(make_current=False)  # fresh: no callback of a closed stream survives
    streams = [ZMQStream(s, loop) for s in socks]
    delay_ns, delay_msgs = [], []
    st = {"fire": 0, "failed": False}
    mm, store, unpack, now_ns = shm.map, COUNT.pack_into, QUIET.unpack_from, time.monotonic_ns

    def on_fire(msg):
        n = st["fire"] = st["fire"] + 1
        store(mm, 0, n)
        if not n & 4095 and now_ns() > deadline:
            st["failed"] = True
            loop.stop()

    def on_quiet(msg):
        now = now_ns()
        if len(msg[0]) < QUIET.size:
            return
        sent, seen = unpack(msg[0])
        fire = st["fire"]
        delay_ns.append(now - sent)
        delay_msgs.append(fire - seen)
        if len(delay_ns) == 1:
            st["first"] = (now, fire)
        if len(delay_ns) == quiet:
            st["last"] = (now, fire)
            loop.stop()

    def on_deadline():
        st["failed"] = True
        loop.stop()

    streams[0].on_recv(on_fire)
    streams[1].on_recv(on_quiet)
    loop.call_later(max(deadline - now_ns(), 0) / 1e9, on_deadline)
    feed = feeder(fair, eps, shm, quiet)
    try:
        loop.start()
    finally:
        for s in streams:
            s.close(linger=0)
        loop.close()
        pc.stop_held(feed)
        ctx.term()
    if st["failed"]:
        return None, "timeout"
    if len(delay_ns) != quiet:
        return None, "recv_error"
    return summarize(delay_ns, delay_msgs, st["first"], st["last"]), None


def one_run(mods, fair, impl, transport, shm, quiet, tag):
    eps = [pc.endpoint(transport, f"fair-{tag}-{name}") for name in ("fire", "quiet")]
    shm.reset()
    try:
        if impl.startswith("c_"):
            return run_c(fair, impl, eps, shm, quiet)
        return run_pyzmq(*mods, fair, eps, shm, quiet)
    finally:
        for ep in eps:
            pc.unlink_ep(ep)


def fields(res):
    return " ".join(f"{m}={res[m]:.0f}" if m.startswith("msgs") else f"{m}={res[m]:.4g}"
                    for m in METRICS)


def main():
    ap = pc.arg_parser(__doc__, "fair")
    ap.add_argument("--transports")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--quiet", type=int, help="quiet messages per run")
    a = ap.parse_args()
    mods = pc.pyzmq("pyzmq_fair", "delay_p50_us")
    if not mods:
        return 1
    runs = a.runs or (10 if a.full else 5)
    quiet = a.quiet or (2000 if a.full else 200)
    impls = [i for i in IMPLS if i in a.impls.split(",")]
    transports = (a.transports or ("ipc,tcp" if a.full else "ipc")).split(",")
    pc.info("pyzmq_fair", a, runs, mods[0], f"quiet_messages={quiet} interval_ms=1 size=64")
    shm = SharedCount()
    fails = 0
    try:
        for transport in transports:
            keys = f"bench=pyzmq_fair transport={transport}"
            vals = {i: {m: [] for m in METRICS} for i in impls}
            for r in range(runs):
                for impl in impls:
                    res, why = one_run(mods, a.fair, impl, transport, shm, quiet, f"{r}-{impl}")
                    fails += res is None
                    pc.print_run(keys, impl, r, res and fields(res), why)
                    for m in METRICS:
                        ok = res and not math.isnan(res[m])  # NAN: as failed, as in C
                        vals[impl][m].append(res[m] if ok else None)
            med = pc.report_all(keys, vals, METRICS)
            for m in METRICS:
                for num, den in (("c_zev", "c_raw"), ("c_zev", "c_zloop"),
                                 ("pyzmq_stream", "c_zev")):
                    if num in impls and den in impls:
                        pc.ratio(keys, m, num, med[num, m], den, med[den, m])
            sys.stdout.flush()
    finally:
        shm.close()
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
