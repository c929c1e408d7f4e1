#!/usr/bin/python3
"""PUSH -> PULL throughput with a PyZMQ ZMQStream receiver, next to zev and raw
libzmq receivers fed by the same sender.

The sender is always the C program `thr --send-only` (perf/thr.c's
sender_main in its own process), so every row gets exactly the same feed.
Receivers (impl=):
  c_raw         `thr --recv-only --impl raw`: blocking zmq_msg_recv loop (C)
  c_zev         `thr --recv-only --impl zev_borrowed`: zev stream (C)
  pyzmq_stream  ZMQStream.on_recv on tornado's IOLoop (asyncio), this process
  pyzmq_recv    a blocking socket.recv() loop in Python (PyZMQ's own floor)
inproc cannot cross processes, so the transports are ipc and tcp. The clock
runs from the first message received to the last, as in thr.c. The C and
blocking rows move 10x the messages ZMQStream moves (2x for 64 KiB; a rate
is per message: this keeps the fast rows long enough to time and the slow
one short).

Run with Debian's /usr/bin/python3 (python3-zmq, python3-tornado).
Output: the RUN / RESULT / RATIO / FAIL grammar of perf/common.h.
"""
import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

try:
    import zmq
    from tornado.ioloop import IOLoop
    from zmq.eventloop.zmqstream import ZMQStream
except ImportError as e:  # reported, not fatal: the cells stay empty
    print(f"FAIL bench=pyzmq_thr impl=pyzmq_stream metric=msgs_per_s reason=import_{type(e).__name__}")
    sys.exit(1)

TIMEOUT = 60.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def endpoint(transport, tag):
    if transport == "tcp":
        return f"tcp://127.0.0.1:{free_port()}"
    return f"ipc:///tmp/zev-perf-py-{os.getpid()}-{tag}"


def start_sender(thr, ep, size, count):
    return subprocess.Popen(
        [thr, "--send-only", ep, "--size", str(size), "--count", str(count), "--hold-stdin"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)


def stop_sender(snd):
    try:
        snd.stdin.close()
        snd.wait(timeout=15)
    except Exception:
        snd.kill()
        snd.wait()


def run_c(thr, impl, transport, size, count, tag):
    """One run of a C receiver; returns msgs/s or None."""
    ep = endpoint(transport, tag)
    rx = subprocess.Popen([thr, "--recv-only", ep, "--impl", impl, "--size", str(size),
                           "--count", str(count)], stdout=subprocess.PIPE, text=True)
    line = rx.stdout.readline()
    if line.strip() != "READY":
        rx.kill()
        rx.wait()
        return None, "receiver_not_ready"
    snd = start_sender(thr, ep, size, count)
    try:
        out, _ = rx.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        rx.kill()
        rx.communicate()
        stop_sender(snd)
        return None, "timeout"
    stop_sender(snd)
    for ln in out.splitlines():
        if ln.startswith("SAMPLE"):
            kv = dict(f.split("=", 1) for f in ln.split()[1:])
            return float(kv["msgs_per_s"]), None
    return None, "no_sample"


def run_pyzmq(thr, impl, transport, size, count, tag):
    """One run of an in-process PyZMQ receiver; returns msgs/s or None."""
    ep = endpoint(transport, tag)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.linger = 0
    pull.bind(ep)
    state = {"got": 0, "t0": 0, "t1": 0}
    snd = start_sender(thr, ep, size, count)
    why = None
    try:
        if impl == "pyzmq_recv":
            pull.rcvtimeo = int(TIMEOUT * 1000)
            try:
                for i in range(count):
                    pull.recv()
                    if i == 0:
                        state["t0"] = time.perf_counter_ns()
                state["t1"] = time.perf_counter_ns()
                state["got"] = count
            except zmq.Again:
                why = "timeout"
        else:
            loop = IOLoop.current()
            stream = ZMQStream(pull, loop)

            def on_recv(msg):
                state["got"] += 1
                if state["got"] == 1:
                    state["t0"] = time.perf_counter_ns()
                if state["got"] == count:
                    state["t1"] = time.perf_counter_ns()
                    loop.stop()

            stream.on_recv(on_recv)
            loop.call_later(TIMEOUT, loop.stop)
            loop.start()
            stream.on_recv(None)
            stream.close(linger=0)
            if state["got"] != count:
                why = "timeout"
    finally:
        stop_sender(snd)
        pull.close(linger=0)
        ctx.term()
        if ep.startswith("ipc://"):
            try:
                os.unlink(ep[6:])
            except OSError:
                pass
    if why or state["t1"] <= state["t0"]:
        return None, why or "no_progress"
    return (count - 1) * 1e9 / (state["t1"] - state["t0"]), None


def report(keys, impl, metric, unit, vals):
    ok = [v for v in vals if v is not None]
    if not ok:
        print(f"FAIL {keys} impl={impl} metric={metric} reason=no_successful_run")
        return None
    med = statistics.median(ok)
    print(f"RESULT {keys} impl={impl} metric={metric} unit={unit} median={med:.6g} "
          f"min={min(ok):.6g} max={max(ok):.6g} runs={len(ok)}")
    return med


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--thr", required=True, help="path of the built thr program")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--transports", default="ipc,tcp")
    ap.add_argument("--sizes")
    ap.add_argument("--count", type=int)
    a = ap.parse_args()
    runs = a.runs or (10 if a.full else 5)
    sizes = [int(s) for s in (a.sizes or ("64,1024,65536" if a.full else "64")).split(",")]
    impls = ["c_raw", "c_zev", "pyzmq_stream", "pyzmq_recv"]
    print(f"INFO pyzmq_thr mode={'full' if a.full else 'quick'} runs={runs} "
          f"pyzmq={zmq.__version__} libzmq={zmq.zmq_version()} python={sys.version.split()[0]}")
    fails = 0
    for transport in a.transports.split(","):
        for size in sizes:
            count = a.count or {64: 10000, 1024: 8000}.get(size, 1000) * (4 if a.full else 1)
            keys = f"bench=pyzmq_thr transport={transport} size={size}"
            vals = {i: [] for i in impls}
            for r in range(runs):
                for impl in impls:
                    tag = f"{size}-{r}-{impl}"
                    n = count if impl == "pyzmq_stream" else count * (10 if size <= 1024 else 2)
                    if impl.startswith("c_"):
                        cimpl = "raw" if impl == "c_raw" else "zev_borrowed"
                        v, why = run_c(a.thr, cimpl, transport, size, n, tag)
                    else:
                        v, why = run_pyzmq(a.thr, impl, transport, size, n, tag)
                    vals[impl].append(v)
                    if v is None:
                        fails += 1
                        print(f"RUNFAIL {keys} impl={impl} run={r} reason={why}")
                    else:
                        print(f"RUN {keys} impl={impl} run={r} count={n} msgs_per_s={v:.6g}")
                    sys.stdout.flush()
            med = {i: report(keys, i, "msgs_per_s", "msg/s", vals[i]) for i in impls}
            for num, den in (("c_zev", "pyzmq_stream"), ("c_zev", "c_raw"),
                             ("pyzmq_stream", "c_raw"), ("c_zev", "pyzmq_recv")):
                if med[num] and med[den]:
                    print(f"RATIO {keys} metric=msgs_per_s num={num} den={den} "
                          f"ratio={med[num] / med[den]:.4g}")
            sys.stdout.flush()
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
