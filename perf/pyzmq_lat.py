#!/usr/bin/python3
"""Round-trip latency with a PyZMQ ZMQStream echo server, next to raw and zev
echo servers, all measured by the same C client.

The client is always `lat --client-only` (perf/lat.c: a blocking REQ socket,
64-byte messages, per-round-trip clock_gettime(CLOCK_MONOTONIC) samples in an
in-process histogram: p50, p99, p99.9, max). Servers (impl=), each in its own
process:
  c_raw         `lat --server-only --impl raw`: blocking recv/send (C)
  c_zev         `lat --server-only --impl zev`: zev stream echo (C)
  pyzmq_stream  this script with --serve: a REP socket in a ZMQStream whose
                on_recv sends the message back, on tornado's IOLoop (asyncio)
Transports ipc and tcp (a client in another process cannot use inproc).

Run with Debian's /usr/bin/python3 (python3-zmq, python3-tornado).
Output: the RUN / RESULT / RATIO / DELTA / FAIL grammar of perf/common.h.
"""
import os
import subprocess
import sys

sys.dont_write_bytecode = True  # keep perf/ free of __pycache__
import pyzmq_common as pc  # noqa: E402  (perf/ is sys.path[0])

METRICS = {"p50_us": "us", "p99_us": "us", "p999_us": "us", "max_us": "us", "mean_us": "us"}


def serve(ep, total):
    """The PyZMQ server: echo `total` requests, then exit."""
    mods = pc.pyzmq("pyzmq_lat", "p50_us")  # a FAIL line instead of READY: server_not_ready
    if not mods:
        return 1
    zmq, IOLoop, ZMQStream = mods
    ctx = zmq.Context()
    rep = ctx.socket(zmq.REP)
    rep.linger = 0
    rep.bind(ep)
    loop = IOLoop.current()
    stream = ZMQStream(rep, loop)
    state = {"n": 0}

    def on_recv(msg):
        stream.send_multipart(msg)
        state["n"] += 1
        if state["n"] == total:
            # let the last reply leave before stopping
            loop.add_callback(loop.stop)

    stream.on_recv(on_recv)
    loop.call_later(pc.TIMEOUT, loop.stop)
    print("READY", flush=True)
    loop.start()
    stream.flush()
    stream.close(linger=1000)
    ctx.term()
    return 0 if state["n"] == total else 1


def one_run(lat, impl, transport, n, warmup, tag):
    ep = pc.endpoint(transport, f"lat-{tag}")
    total = n + warmup
    if impl == "pyzmq_stream":
        cmd = [sys.executable, os.path.abspath(__file__), "--serve", ep, "--total", str(total)]
    else:
        cmd = [lat, "--server-only", ep, "--impl", impl[2:], "--count", str(total)]
    srv, why = pc.start_ready(cmd, "server")
    if srv is None:
        pc.unlink_ep(ep)
        return None, why
    try:
        cli = subprocess.run([lat, "--client-only", ep, "--count", str(n), "--warmup",
                              str(warmup), "--impl", impl], capture_output=True, text=True,
                             timeout=pc.TIMEOUT)
        kv, why = pc.parse_sample(cli.stdout)
        return ({m: kv[m] for m in METRICS}, None) if kv else (None, "client_failed")
    except subprocess.TimeoutExpired:
        return None, "timeout"
    finally:
        pc.finish(srv, 10)
        pc.unlink_ep(ep)


def main():
    ap = pc.arg_parser(__doc__, "lat", required=False)
    ap.add_argument("--serve", metavar="EP", help="(internal) run the PyZMQ echo server")
    ap.add_argument("--total", type=int, default=0)
    ap.add_argument("--transports", default="ipc,tcp")
    ap.add_argument("--count", type=int)
    a = ap.parse_args()
    if a.serve:
        return serve(a.serve, a.total)
    mods = pc.pyzmq("pyzmq_lat", "p50_us")
    if not mods:
        return 1
    runs = a.runs or (10 if a.full else 5)
    n = a.count or (20000 if a.full else 1500)
    warmup = max(300, n // 10)
    impls = ["c_raw", "c_zev", "pyzmq_stream"]
    pc.info("pyzmq_lat", a, runs, mods[0], f"round_trips={n}")
    fails = 0
    for transport in a.transports.split(","):
        keys = f"bench=pyzmq_lat transport={transport} size=64"
        vals = {i: {m: [] for m in METRICS} for i in impls}
        for r in range(runs):
            for impl in impls:
                res, why = one_run(a.lat, impl, transport, n, warmup, f"{r}-{impl}")
                fails += res is None
                pc.print_run(keys, impl, r, res and " ".join(f"{m}={res[m]:.4g}" for m in METRICS),
                             why)
                for m in METRICS:
                    vals[impl][m].append(res[m] if res else None)
        med = pc.report_all(keys, vals, METRICS)
        for m in list(METRICS)[:3]:
            for num, den in (("pyzmq_stream", "c_zev"), ("c_zev", "c_raw")):
                pc.ratio(keys, m, num, med[num, m], den, med[den, m])
            for num in ("c_zev", "pyzmq_stream"):
                pc.delta(keys, m, num, med[num, m], "c_raw", med["c_raw", m])
        sys.stdout.flush()
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
