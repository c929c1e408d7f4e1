#!/usr/bin/python3
"""PyZMQ's zmq.green on gevent (green threads doing blocking-style ZeroMQ
calls on one event loop, the system zev's fibers are the C counterpart of)
next to zev fibers doing the same work.

Ping-pong (bench=green_pingpong): PAIR <-> PAIR over inproc, 64 B, both
ends in one process on one loop, one thread: round trip in ns (wall, first
round trips untimed) and round trips per second.
  c_fiber       `fiber --once --case pingpong --impl fiber`: two zev fibers
                (zev_fiber_send + zev_fiber_recv), perf/fiber.c
  c_callback    the same with two streams' on_recv (perf/fiber.c)
  pyzmq_green   two greenlets on gevent's hub, zmq.green sockets
Throughput (bench=green_thr): PUSH -> PULL 64 B, fed by `thr --send-only`
(the C sender of every thr row) in its own process, over ipc and tcp
(inproc cannot cross processes); msg/s from the first message to the last.
  c_fiber       `thr --recv-only --impl zev_fiber`: a zev fiber's recv loop
  c_stream      `thr --recv-only --impl zev_borrowed`: a zev stream
  c_raw         `thr --recv-only --impl raw`: a blocking zmq_msg_recv loop, the
                ceiling of any receiver fed by this sender
  pyzmq_green   a greenlet calling zmq.green's recv() in a loop
The C rows move 10x the messages (20x the round trips) the green rows move:
a rate is per message, and this keeps the fast rows long enough to time.
Target (docs/design.md): zev fibers >= 50x zmq.green on the same work.

Run with Debian's /usr/bin/python3 (python3-zmq, python3-gevent).
Usage: perf/pyzmq_green.py --thr BUILD/perf/thr --fiber BUILD/perf/fiber [--full] [--runs N]
       [--transports ipc,tcp] [--count N]
Output: the RUN / RESULT / RATIO / FAIL grammar of perf/common.h.
"""
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # keep perf/ free of __pycache__
import pyzmq_common as pc  # noqa: E402  (perf/ is sys.path[0])

SIZE = 64


def green():
    """(zmq.green, gevent), or None after the FAIL lines that leave the
    pyzmq_green cells empty."""
    try:
        import gevent
        import zmq.green as zmq
    except ImportError as e:
        for bench, metric in (("green_pingpong", "rtt_ns"), ("green_thr", "msgs_per_s")):
            print(f"FAIL bench={bench} impl=pyzmq_green metric={metric} "
                  f"reason=import_{type(e).__name__}", flush=True)
        return None
    return zmq, gevent


MODS = green()
if not MODS:
    sys.exit(1)
zmq, gevent = MODS


# ------------------------------------------------------------------ ping-pong

def pingpong_green(n, warmup, tag):
    """ns per round trip of two greenlets over inproc, or (None, reason)."""
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.linger = b.linger = 0
    ep = f"inproc://green-pp-{tag}"
    a.bind(ep)
    b.connect(ep)
    msg = b"z" * SIZE
    t = {}

    def echo():
        for _ in range(n + warmup):
            b.send(b.recv())

    def ping():
        for i in range(n + warmup):
            if i == warmup:
                t["t0"] = time.perf_counter_ns()
            a.send(msg)
            a.recv()
        t["t1"] = time.perf_counter_ns()

    gs = [gevent.spawn(echo), gevent.spawn(ping)]
    done = gevent.joinall(gs, timeout=pc.TIMEOUT)
    ok = len(done) == 2 and all(g.successful() for g in gs)
    gevent.killall(gs)
    a.close()
    b.close()
    ctx.term()
    if not ok or "t1" not in t:
        return None, "timeout"
    return (t["t1"] - t["t0"]) / n, None


def pingpong_c(fiber, impl, n):
    try:
        p = subprocess.run([fiber, "--once", "--case", "pingpong", "--impl", impl, "--count",
                            str(n)], capture_output=True, text=True, timeout=pc.TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, type(e).__name__
    kv, why = pc.parse_sample(p.stdout)
    return (kv["rtt_ns"], None) if kv else (None, why)


# ----------------------------------------------------------------- throughput

def thr_c(thr, impl, transport, n, tag):
    ep = pc.endpoint(transport, tag)
    rx, why = pc.start_ready([thr, "--recv-only", ep, "--impl", impl, "--size", str(SIZE),
                              "--count", str(n)], "receiver")
    if rx is None:
        return None, why
    snd = pc.start_held([thr, "--send-only", ep, "--size", str(SIZE), "--count", str(n),
                         "--hold-stdin"])
    out, why = pc.finish(rx)
    pc.stop_held(snd)
    pc.unlink_ep(ep)
    kv, why = pc.parse_sample(out) if out is not None else (None, why)
    return (kv["msgs_per_s"], None) if kv else (None, why)


def thr_green(thr, transport, n, tag):
    ep = pc.endpoint(transport, tag)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.linger = 0
    pull.bind(ep)
    snd = pc.start_held([thr, "--send-only", ep, "--size", str(SIZE), "--count", str(n),
                         "--hold-stdin"])
    t = {}

    def recv_loop():
        for i in range(n):
            pull.recv()
            if i == 0:
                t["t0"] = time.perf_counter_ns()
        t["t1"] = time.perf_counter_ns()

    try:
        g = gevent.spawn(recv_loop)
        g.join(timeout=pc.TIMEOUT)
        ok = g.successful()
        g.kill()
    finally:
        pc.stop_held(snd)
        pull.close(linger=0)
        ctx.term()
        pc.unlink_ep(ep)
    if not ok or "t1" not in t or t["t1"] <= t["t0"]:
        return None, "timeout"
    return (n - 1) * 1e9 / (t["t1"] - t["t0"]), None


# ----------------------------------------------------------------------- main

def main():
    ap = pc.arg_parser(__doc__, "thr")
    ap.add_argument("--fiber", required=True, help="path of the built fiber program")
    ap.add_argument("--transports", default="ipc,tcp")
    ap.add_argument("--count", type=int, help="green round trips / messages per run")
    a = ap.parse_args()
    runs = a.runs or (10 if a.full else 5)
    pc.info("pyzmq_green", a, runs, zmq, f"gevent={gevent.__version__}")
    fails = 0

    # ping-pong
    n = a.count or (20000 if a.full else 5000)
    keys = f"bench=green_pingpong transport=inproc size={SIZE}"
    impls = ["c_fiber", "c_callback", "pyzmq_green"]
    vals = {i: {"rtt_ns": [], "rt_per_s": []} for i in impls}
    for r in range(runs):
        for impl in impls:
            m = n if impl == "pyzmq_green" else n * 20
            if impl == "pyzmq_green":
                v, why = pingpong_green(m, max(100, m // 10), f"{r}")
            else:
                v, why = pingpong_c(a.fiber, impl[2:], m)
            vals[impl]["rtt_ns"].append(v)
            vals[impl]["rt_per_s"].append(1e9 / v if v else None)
            fails += v is None
            pc.print_run(keys, impl, r, v and f"count={m} rtt_ns={v:.6g} rt_per_s={1e9 / v:.6g}",
                         why)
    med = pc.report_all(keys, vals, {"rtt_ns": "ns", "rt_per_s": "1/s"})
    for num, den in (("c_fiber", "pyzmq_green"), ("c_callback", "pyzmq_green"),
                     ("c_fiber", "c_callback")):
        pc.ratio(keys, "rt_per_s", num, med[num, "rt_per_s"], den, med[den, "rt_per_s"])

    # throughput
    n = a.count or (40000 if a.full else 10000)
    impls = ["c_fiber", "c_stream", "c_raw", "pyzmq_green"]
    for transport in a.transports.split(","):
        keys = f"bench=green_thr transport={transport} size={SIZE}"
        vals = {i: {"msgs_per_s": []} for i in impls}
        for r in range(runs):
            for impl in impls:
                tag = f"green-{r}-{impl}"
                m = n if impl == "pyzmq_green" else n * 10
                if impl == "pyzmq_green":
                    v, why = thr_green(a.thr, transport, m, tag)
                else:
                    cimpl = {"c_fiber": "zev_fiber", "c_stream": "zev_borrowed"}.get(impl, "raw")
                    v, why = thr_c(a.thr, cimpl, transport, m, tag)
                vals[impl]["msgs_per_s"].append(v)
                fails += v is None
                pc.print_run(keys, impl, r, v and f"count={m} msgs_per_s={v:.6g}", why)
        med = pc.report_all(keys, vals, {"msgs_per_s": "msg/s"})
        for num, den in (("c_fiber", "pyzmq_green"), ("c_stream", "pyzmq_green"),
                         ("c_raw", "pyzmq_green"), ("c_fiber", "c_stream")):
            pc.ratio(keys, "msgs_per_s", num, med[num, "msgs_per_s"], den, med[den, "msgs_per_s"])
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
