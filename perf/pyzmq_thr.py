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
import sys
import time

sys.dont_write_bytecode = True  # keep perf/ free of __pycache__
import pyzmq_common as pc  # noqa: E402  (perf/ is sys.path[0])

MODS = pc.pyzmq("pyzmq_thr", "msgs_per_s")
if not MODS:  # reported, not fatal: the cells stay empty
    sys.exit(1)
zmq, IOLoop, ZMQStream = MODS


def start_sender(thr, ep, size, count):
    return pc.start_held([thr, "--send-only", ep, "--size", str(size), "--count", str(count),
                          "--hold-stdin"])


def run_c(thr, impl, transport, size, count, tag):
    """One run of a C receiver; returns msgs/s or None."""
    ep = pc.endpoint(transport, tag)
    rx, why = pc.start_ready([thr, "--recv-only", ep, "--impl", impl, "--size", str(size),
                              "--count", str(count)], "receiver")
    if rx is None:
        return None, why
    snd = start_sender(thr, ep, size, count)
    out, why = pc.finish(rx)
    pc.stop_held(snd)
    kv, why = pc.parse_sample(out) if out is not None else (None, why)
    return (kv["msgs_per_s"], None) if kv else (None, why)


def run_pyzmq(thr, impl, transport, size, count, tag):
    """One run of an in-process PyZMQ receiver; returns msgs/s or None."""
    ep = pc.endpoint(transport, tag)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.linger = 0
    pull.bind(ep)
    state = {"got": 0, "t0": 0, "t1": 0}
    snd = start_sender(thr, ep, size, count)
    why = None
    try:
        if impl == "pyzmq_recv":
            pull.rcvtimeo = int(pc.TIMEOUT * 1000)
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
            loop.call_later(pc.TIMEOUT, loop.stop)
            loop.start()
            stream.on_recv(None)
            stream.close(linger=0)
            if state["got"] != count:
                why = "timeout"
    finally:
        pc.stop_held(snd)
        pull.close(linger=0)
        ctx.term()
        pc.unlink_ep(ep)
    if why or state["t1"] <= state["t0"]:
        return None, why or "no_progress"
    return (count - 1) * 1e9 / (state["t1"] - state["t0"]), None


def main():
    ap = pc.arg_parser(__doc__, "thr")
    ap.add_argument("--transports", default="ipc,tcp")
    ap.add_argument("--sizes")
    ap.add_argument("--count", type=int)
    a = ap.parse_args()
    runs = a.runs or (10 if a.full else 5)
    sizes = [int(s) for s in (a.sizes or ("64,1024,65536" if a.full else "64")).split(",")]
    impls = ["c_raw", "c_zev", "pyzmq_stream", "pyzmq_recv"]
    pc.info("pyzmq_thr", a, runs, zmq)
    fails = 0
    for transport in a.transports.split(","):
        for size in sizes:
            count = a.count or {64: 10000, 1024: 8000}.get(size, 1000) * (4 if a.full else 1)
            keys = f"bench=pyzmq_thr transport={transport} size={size}"
            vals = {i: {"msgs_per_s": []} for i in impls}
            for r in range(runs):
                for impl in impls:
                    tag = f"{size}-{r}-{impl}"
                    n = count if impl == "pyzmq_stream" else count * (10 if size <= 1024 else 2)
                    if impl.startswith("c_"):
                        cimpl = "raw" if impl == "c_raw" else "zev_borrowed"
                        v, why = run_c(a.thr, cimpl, transport, size, n, tag)
                    else:
                        v, why = run_pyzmq(a.thr, impl, transport, size, n, tag)
                    vals[impl]["msgs_per_s"].append(v)
                    fails += v is None
                    pc.print_run(keys, impl, r, v and f"count={n} msgs_per_s={v:.6g}", why)
            med = pc.report_all(keys, vals, {"msgs_per_s": "msg/s"})
            for num, den in (("c_zev", "pyzmq_stream"), ("c_zev", "c_raw"),
                             ("pyzmq_stream", "c_raw"), ("c_zev", "pyzmq_recv")):
                pc.ratio(keys, "msgs_per_s", num, med[num, "msgs_per_s"], den,
                         med[den, "msgs_per_s"])
            sys.stdout.flush()
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
