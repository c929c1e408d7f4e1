#!/usr/bin/python3
"""Syscalls per round trip of a REQ/REP echo server, counted with strace.

Why: the round-trip overhead of a reactor over a blocking zmq_recv is mostly
the system calls it makes in addition (see the README's "where the targets
are missed"). This step counts them instead of asserting them: the server is
`lat --server-only EP --impl I` under `strace -f`, the client the usual
`lat --client-only EP` outside strace. Calls are split by thread: `server`
is the thread that runs the echo loop (the process's main thread), `io` is
libzmq's I/O thread(s). Counts are per round trip (warm-up included in the
divisor), median over runs; strace slows every call down, so only the
counts mean anything here, never the times.

Usage: perf/syscalls.py --lat BUILD/perf/lat [--full] [--runs N] [--impls raw,zev,zloop]
Output: RESULT/RATIO/FAIL lines in the grammar of perf/common.h:
  RESULT bench=syscalls transport=ipc impl=I thread=server|io syscall=NAME
         metric=calls_per_rt unit=calls median=.. min=.. max=.. runs=N
  (syscall=all is the thread's total)
"""
import argparse
import collections
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

TIMEOUT = 120
# "1234 poll([...], 1, 0) = 0": the start of a call. An interrupted call shows
# again as "1234 <... poll resumed>": not matched, so each call counts once.
LINE = re.compile(r"^(\d+)\s+([a-z_0-9]+)\(")


def count_trace(path, main_pid):
    """{(thread, syscall): calls} from an `strace -f -o` file."""
    counts = collections.Counter()
    with open(path) as f:
        for ln in f:
            m = LINE.match(ln)
            if m:
                thread = "server" if int(m.group(1)) == main_pid else "io"
                counts[thread, m.group(2)] += 1
    return counts


def one_run(strace, lat, impl, n, warmup, tmp, tag):
    ep = f"ipc://{tmp}/s-{tag}.sock"
    trace = os.path.join(tmp, f"trace-{tag}")
    total = n + warmup
    srv = subprocess.Popen([strace, "-f", "-qq", "-o", trace, lat, "--server-only", ep, "--impl",
                            impl, "--count", str(total)], stdout=subprocess.PIPE, text=True)
    try:
        if srv.stdout.readline().strip() != "READY":
            return None, "server_not_ready"
        cli = subprocess.run([lat, "--client-only", ep, "--count", str(n), "--warmup", str(warmup)],
                             capture_output=True, text=True, timeout=TIMEOUT)
        if cli.returncode != 0:
            return None, "client_failed"
        srv.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return None, "timeout"
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
    if srv.returncode != 0:
        return None, f"server_exit_{srv.returncode}"
    # strace -f names the traced program's pid on its own lines: the first pid in the file
    with open(trace) as f:
        first = LINE.match(f.readline())
    if not first:
        return None, "empty_trace"
    counts = count_trace(trace, int(first.group(1)))
    os.unlink(trace)
    # setup and teardown calls (mmap, clone, bind, ...) are spread over all round trips;
    # they are a few dozen against tens of thousands
    return {k: v / total for k, v in counts.items()}, None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lat", required=True, help="path of the built lat program")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--count", type=int)
    ap.add_argument("--impls", default="raw,zev,zloop")
    a = ap.parse_args()
    keys = "bench=syscalls transport=ipc size=64"
    strace = shutil.which("strace")
    impls = a.impls.split(",")
    if not strace:
        for i in impls:
            print(f"FAIL {keys} impl={i} metric=calls_per_rt reason=strace_not_installed")
        return 1
    runs = a.runs or (5 if a.full else 2)  # counts barely move between runs
    n = a.count or (10000 if a.full else 2000)
    warmup = max(100, n // 10)
    print(f"INFO syscalls runs={runs} round_trips={n} warmup={warmup} tracer=strace")
    per = {i: [] for i in impls}
    fails = 0
    with tempfile.TemporaryDirectory(prefix="zev-perf-sys-") as tmp:
        for r in range(runs):
            for impl in impls:
                res, why = one_run(strace, a.lat, impl, n, warmup, tmp, f"{r}-{impl}")
                if res is None:
                    fails += 1
                    print(f"RUNFAIL {keys} impl={impl} run={r} reason={why}")
                    continue
                per[impl].append(res)
                tot = {t: sum(v for (th, _), v in res.items() if th == t) for t in ("server", "io")}
                print(f"RUN {keys} impl={impl} run={r} server={tot['server']:.3g} io={tot['io']:.3g}")
                sys.stdout.flush()
    totals = {}
    for impl in impls:
        if not per[impl]:
            print(f"FAIL {keys} impl={impl} metric=calls_per_rt reason=no_successful_run")
            continue
        names = sorted({k for res in per[impl] for k in res})
        for thread in ("server", "io"):
            rows = [(s, [res.get((thread, s), 0.0) for res in per[impl]])
                    for t, s in names if t == thread]
            rows.append(("all", [sum(res.get((thread, s), 0.0) for s, _ in rows)
                                 for res in per[impl]]))
            for sc, vals in rows:
                med = statistics.median(vals)
                if med < 0.05 and sc != "all":
                    continue  # setup and teardown calls, not per round trip
                print(f"RESULT {keys} impl={impl} thread={thread} syscall={sc} "
                      f"metric=calls_per_rt unit=calls median={med:.4g} min={min(vals):.4g} "
                      f"max={max(vals):.4g} runs={len(vals)}")
                if sc == "all":
                    totals[impl, thread] = med
    for impl in impls:
        for thread in ("server", "io"):
            if impl != "raw" and (impl, thread) in totals and ("raw", thread) in totals:
                print(f"DELTA {keys} thread={thread} metric=calls_per_rt num={impl} den=raw "
                      f"delta={totals[impl, thread] - totals['raw', thread]:.4g}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
