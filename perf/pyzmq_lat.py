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
import argparse
import os
import socket
import statistics
import subprocess
import sys

METRICS = ["p50_us", "p99_us", "p999_us", "max_us", "mean_us"]
TIMEOUT = 60.0


def serve(ep, total):
    """The PyZMQ server: echo `total` requests, then exit."""
    import zmq
    from tornado.ioloop import IOLoop
    from zmq.eventloop.zmqstream import ZMQStream
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
    loop.call_later(TIMEOUT, loop.stop)
    print("READY", flush=True)
    loop.start()
    stream.flush()
    stream.close(linger=1000)
    ctx.term()
    return 0 if state["n"] == total else 1


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def endpoint(transport, tag):
    if transport == "tcp":
        return f"tcp://127.0.0.1:{free_port()}"
    return f"ipc:///tmp/zev-perf-pylat-{os.getpid()}-{tag}"


def one_run(lat, impl, transport, n, warmup, tag):
    ep = endpoint(transport, tag)
    total = n + warmup
    if impl == "pyzmq_stream":
        cmd = [sys.executable, os.path.abspath(__file__), "--serve", ep, "--total", str(total)]
    else:
        cmd = [lat, "--server-only", ep, "--impl", impl[2:], "--count", str(total)]
    srv = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        if srv.stdout.readline().strip() != "READY":
            return None, "server_not_ready"
        cli = subprocess.run([lat, "--client-only", ep, "--count", str(n), "--warmup", str(warmup),
                              "--impl", impl], capture_output=True, text=True, timeout=TIMEOUT)
        for ln in cli.stdout.splitlines():
            if ln.startswith("SAMPLE"):
                kv = dict(f.split("=", 1) for f in ln.split()[1:])
                return {m: float(kv[m]) for m in METRICS}, None
        return None, "client_failed"
    except subprocess.TimeoutExpired:
        return None, "timeout"
    finally:
        try:
            srv.wait(timeout=10)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()
        if ep.startswith("ipc://"):
            try:
                os.unlink(ep[6:])
            except OSError:
                pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lat", help="path of the built lat program")
    ap.add_argument("--serve", metavar="EP", help="(internal) run the PyZMQ echo server")
    ap.add_argument("--total", type=int, default=0)
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--transports", default="ipc,tcp")
    ap.add_argument("--count", type=int)
    a = ap.parse_args()
    if a.serve:
        return serve(a.serve, a.total)
    try:
        import zmq
        import tornado  # noqa: F401  (the server needs it)
    except ImportError as e:
        print(f"FAIL bench=pyzmq_lat impl=pyzmq_stream metric=p50_us reason=import_{type(e).__name__}")
        return 1
    runs = a.runs or (10 if a.full else 5)
    n = a.count or (20000 if a.full else 1500)
    warmup = max(300, n // 10)
    impls = ["c_raw", "c_zev", "pyzmq_stream"]
    print(f"INFO pyzmq_lat mode={'full' if a.full else 'quick'} runs={runs} round_trips={n} "
          f"pyzmq={zmq.__version__} libzmq={zmq.zmq_version()} python={sys.version.split()[0]}")
    fails = 0
    for transport in a.transports.split(","):
        keys = f"bench=pyzmq_lat transport={transport} size=64"
        vals = {i: {m: [] for m in METRICS} for i in impls}
        for r in range(runs):
            for impl in impls:
                res, why = one_run(a.lat, impl, transport, n, warmup, f"{r}-{impl}")
                if res is None:
                    fails += 1
                    print(f"RUNFAIL {keys} impl={impl} run={r} reason={why}")
                else:
                    print(f"RUN {keys} impl={impl} run={r} " +
                          " ".join(f"{m}={res[m]:.4g}" for m in METRICS))
                for m in METRICS:
                    vals[impl][m].append(res[m] if res else None)
                sys.stdout.flush()
        med = {}
        for impl in impls:
            for m in METRICS:
                ok = [v for v in vals[impl][m] if v is not None]
                if not ok:
                    print(f"FAIL {keys} impl={impl} metric={m} reason=no_successful_run")
                    med[impl, m] = None
                    continue
                med[impl, m] = statistics.median(ok)
                print(f"RESULT {keys} impl={impl} metric={m} unit=us median={med[impl, m]:.6g} "
                      f"min={min(ok):.6g} max={max(ok):.6g} runs={len(ok)}")
        for m in METRICS[:3]:
            for num, den in (("pyzmq_stream", "c_zev"), ("c_zev", "c_raw")):
                if med[num, m] and med[den, m]:
                    print(f"RATIO {keys} metric={m} num={num} den={den} "
                          f"ratio={med[num, m] / med[den, m]:.4g}")
            for num in ("c_zev", "pyzmq_stream"):
                if med[num, m] and med["c_raw", m]:
                    print(f"DELTA {keys} metric={m} num={num} den=c_raw "
                          f"delta={med[num, m] - med['c_raw', m]:.4g}")
        sys.stdout.flush()
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
