#!/usr/bin/python3
"""Syscalls per round trip of a REQ/REP echo server.

Why: the round-trip overhead of a reactor over a blocking zmq_recv is mostly
the system calls it makes in addition (see the README's "where the targets
are missed"). This step counts them instead of asserting them: the server is
`lat --server-only EP --impl I`, the client the usual `lat --client-only EP`.
Calls are split by thread: `server` is the thread that runs the echo loop,
`io` libzmq's own threads (ZMQbg/...). Counts are per round trip (warm-up
included in the divisor), median over runs.

Counter: `perf stat --per-thread` on the syscall tracepoints, attached to
the server once it is listening (the calls it makes while starting up are
not counted). Without a usable perf, `strace -f` (every call of the whole
process, but strace slows each call so much that libzmq's time-throttled
command checks inside zmq_send run on more round trips than they would).
Either way the tracer slows the server down: only the counts mean anything
here, never the times.

Usage: perf/syscalls.py --lat BUILD/perf/lat [--full] [--runs N] [--impls raw,zev,zloop]
       [--tracer perf|strace]
Output: RESULT/DELTA/FAIL lines in the grammar of perf/common.h:
  RESULT bench=syscalls transport=ipc impl=I thread=server|io syscall=NAME
         metric=calls_per_rt unit=calls median=.. min=.. max=.. runs=N
  (syscall=all is the thread's total, syscall=other what the named ones leave)
"""
import collections
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from pyzmq_common import arg_parser, delta, finish, print_run, report, start_ready

TIMEOUT = 120
# the calls a reactor and libzmq make per message; the rest shows as "other"
NAMED = ["epoll_wait", "epoll_pwait", "epoll_ctl", "poll", "ppoll", "getpid", "read", "write",
         "recvfrom", "sendto", "futex"]

# "1234 poll([...], 1, 0) = 0": the start of a call. An interrupted call shows
# again as "1234 <... poll resumed>": not matched, so each call counts once.
STRACE_LINE = re.compile(r"^(\d+)\s+([a-z_0-9]+)\(")


def perf_works(perf):
    ev = ",".join(f"syscalls:sys_enter_{n}" for n in NAMED)
    try:
        return subprocess.run([perf, "stat", "-x,", "-e", "raw_syscalls:sys_enter," + ev, "true"],
                              capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def perf_counts(path):
    """{(thread, syscall): calls} from `perf stat --per-thread -x,` output."""
    counts = collections.Counter()
    with open(path) as f:
        for ln in f:
            fields = ln.strip().split(",")
            if len(fields) < 4 or not fields[1].isdigit():
                continue
            thread = "io" if fields[0].startswith("ZMQbg") else "server"
            ev = fields[3]
            name = "all" if ev == "raw_syscalls:sys_enter" else ev.rpartition("sys_enter_")[2]
            counts[thread, name] += int(fields[1])
    for thread in ("server", "io"):
        counts[thread, "other"] = counts[thread, "all"] - sum(counts[thread, n] for n in NAMED)
        del counts[thread, "all"]
    return counts


def strace_counts(path):
    """{(thread, syscall): calls} from an `strace -f -o` file; the traced
    program's own pid is the first one in the file."""
    counts = collections.Counter()
    main_pid = None
    with open(path) as f:
        for ln in f:
            m = STRACE_LINE.match(ln)
            if m:
                main_pid = main_pid or int(m.group(1))
                thread = "server" if int(m.group(1)) == main_pid else "io"
                name = m.group(2) if m.group(2) in NAMED else "other"
                counts[thread, name] += 1
    return counts


def one_run(tracer, lat, impl, n, warmup, tmp, tag):
    ep = f"ipc://{tmp}/s-{tag}.sock"
    out = os.path.join(tmp, f"trace-{tag}")
    total = n + warmup
    cmd = [lat, "--server-only", ep, "--impl", impl, "--count", str(total)]
    name, prog = tracer
    if name == "strace":
        cmd = [prog, "-f", "-qq", "-o", out] + cmd
    srv, why = start_ready(cmd, "server")
    if not srv:
        return None, why
    mon = None
    if name == "perf":
        ev = ",".join(["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{s}" for s in NAMED])
        mon = subprocess.Popen([prog, "stat", "--per-thread", "-x,", "-o", out, "-e", ev, "-p",
                                str(srv.pid)], stderr=subprocess.DEVNULL)
        time.sleep(0.3)  # attached before the client starts; all its calls count
    try:
        cli = subprocess.run([lat, "--client-only", ep, "--count", str(n), "--warmup", str(warmup)],
                             capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        cli = None
    _, why = finish(srv, TIMEOUT)
    if mon:
        finish(mon, TIMEOUT)
    if cli is None or cli.returncode != 0:
        return None, "client_failed" if cli else "timeout"
    if why or srv.returncode != 0:
        return None, why or f"server_exit_{srv.returncode}"
    counts = perf_counts(out) if name == "perf" else strace_counts(out)
    os.unlink(out)
    if not counts:
        return None, "empty_trace"
    return {k: v / total for k, v in counts.items()}, None


def main():
    ap = arg_parser(__doc__, "lat")
    ap.add_argument("--count", type=int)
    ap.add_argument("--impls", default="raw,zev,zloop")
    ap.add_argument("--tracer", choices=["perf", "strace"])
    a = ap.parse_args()
    keys = "bench=syscalls transport=ipc size=64"
    impls = a.impls.split(",")
    perf, strace = shutil.which("perf"), shutil.which("strace")
    tracer = None
    if a.tracer != "strace" and perf and perf_works(perf):
        tracer = ("perf", perf)
    elif a.tracer != "perf" and strace:
        tracer = ("strace", strace)
    if not tracer:
        for i in impls:
            print(f"FAIL {keys} impl={i} metric=calls_per_rt reason=no_usable_perf_or_strace")
        return 1
    runs = a.runs or (5 if a.full else 2)  # counts barely move between runs
    n = a.count or (10000 if a.full else 2000)
    warmup = max(100, n // 10)
    print(f"INFO syscalls runs={runs} round_trips={n} warmup={warmup} tracer={tracer[0]}")
    per = {i: [] for i in impls}
    fails = 0
    with tempfile.TemporaryDirectory(prefix="zev-perf-sys-") as tmp:
        for r in range(runs):
            for impl in impls:
                res, why = one_run(tracer, a.lat, impl, n, warmup, tmp, f"{r}-{impl}")
                if res is None:
                    fails += 1
                    print_run(keys, impl, r, None, why)
                    continue
                per[impl].append(res)
                tot = {t: sum(v for (th, _), v in res.items() if th == t) for t in ("server", "io")}
                print_run(keys, impl, r, f"server={tot['server']:.3g} io={tot['io']:.3g}")
    totals = {}
    for impl in impls:
        if not per[impl]:
            report(keys, impl, "calls_per_rt", "calls", [None])
            continue
        names = sorted({k for res in per[impl] for k in res})
        for thread in ("server", "io"):
            rows = [(s, [res.get((thread, s), 0.0) for res in per[impl]])
                    for t, s in names if t == thread]
            rows.append(("all", [sum(res.get((thread, s), 0.0) for s, _ in rows)
                                 for res in per[impl]]))
            for sc, vals in rows:
                if statistics.median(vals) >= 0.05 or sc == "all":  # else set-up/teardown
                    med = report(f"{keys} thread={thread} syscall={sc}", impl, "calls_per_rt",
                                 "calls", vals)
                    if sc == "all":
                        totals[impl, thread] = med
    for impl in impls:
        for thread in ("server", "io"):
            if impl != "raw":
                delta(f"{keys} thread={thread}", "calls_per_rt", impl, totals.get((impl, thread)),
                      "raw", totals.get(("raw", thread)))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
