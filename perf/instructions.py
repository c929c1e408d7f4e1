#!/usr/bin/python3
"""Instructions per message of a PULL receiver: zev against raw libzmq.

Why: on a shared 2-core VM the throughput ratio and the receiver's CPU time
per message move by tens of percent between runs; the number of instructions
the receiver executes per message hardly moves. They are counted with
valgrind's callgrind (--separate-threads) on `thr --recv-only EP --impl I`,
fed from another process by the same sender as every thr row (`thr
--send-only EP --hold-stdin`). Under callgrind the receiver is far slower
than the sender, so it mostly finds messages waiting: the figure is mainly
the per-message path (recv, dispatch, the benchmark's own touch of the
payload), plus the user-space part of whatever waiting it still does
(valgrind runs one thread at a time). Kernel time is not counted at all.

Per message = (count at N - count at N/5) / (N - N/5): start-up and teardown
cancel. `receiver` is the thread that runs the receive loop (the program's
main thread), `others` the sum of the rest (libzmq's I/O thread and reaper,
the program's stall watchdog, whose share follows time, not N).

Usage: perf/instructions.py --thr BUILD/perf/thr [--full] [--runs N] [--count N]
       [--transports ipc,tcp] [--impls raw,zev_borrowed,zev_kept,zev_copy,zev_fiber]
       (an impl with "+timing", e.g. zev_borrowed+timing, runs with zev_loop_set_timing on)
Output: RESULT/DELTA/RATIO/FAIL lines in the grammar of perf/common.h:
  RESULT bench=instr transport=T size=64 thread=receiver|others impl=I
         metric=instr_per_msg unit=instr median=.. min=.. max=.. runs=N
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile

from pyzmq_common import (arg_parser, delta, endpoint, finish, print_run, ratio, report, start_held,
                          start_ready, stop_held, unlink_ep)

TIMEOUT = 300
SIZE = 64


def totals(prefix):
    """{thread number: instructions} from callgrind's per-thread files."""
    out = {}
    for path in glob.glob(prefix + "-*"):
        with open(path) as f:
            for ln in f:
                if ln.startswith("totals:"):
                    out[int(path.rsplit("-", 1)[1])] = int(ln.split()[1])
    return out


def count(valgrind, thr, impl, transport, n, tmp, tag):
    """({"receiver": Ir, "others": Ir}, None) for one receiver of n messages,
    or (None, reason)."""
    ep = endpoint(transport, tag)
    prefix = os.path.join(tmp, f"cg-{tag}")
    base, _, extra = impl.partition("+")  # zev_borrowed+timing: with zev_loop_set_timing on
    srv, why = start_ready([valgrind, "--tool=callgrind", "--separate-threads=yes",
                            f"--callgrind-out-file={prefix}", "--log-file=/dev/null", thr,
                            "--recv-only", ep, "--impl", base, "--size", str(SIZE),
                            "--count", str(n)] + (["--" + extra] if extra else []), "receiver")
    if not srv:
        return None, why
    snd = start_held([thr, "--send-only", ep, "--size", str(SIZE), "--count", str(n),
                      "--hold-stdin"])
    out, why = finish(srv, TIMEOUT)
    stop_held(snd)
    unlink_ep(ep)
    if why or srv.returncode != 0 or "SAMPLE" not in (out or ""):
        return None, why or f"receiver_exit_{srv.returncode}"
    t = totals(prefix)
    if 1 not in t:
        return None, "no_callgrind_output"
    return {"receiver": t[1], "others": sum(v for k, v in t.items() if k != 1)}, None


def per_message(keys, impls, runs, n, threads, base, count_fn, tag_fn):
    """Counts every impl at n/5 and n messages, `runs` times interleaved (as
    the timed benchmarks interleave their rows); prints a RUN line per run,
    then per thread a RESULT line per impl (instructions per message, the
    difference of the two counts over the difference of the messages, so
    that start-up and teardown cancel) and DELTA / RATIO lines against
    `base`. count_fn(impl, messages, tag) returns ({thread: Ir}, None) or
    (None, why). Returns the number of failed runs."""
    n0 = n // 5
    fails = 0
    per = {i: {th: [] for th in threads} for i in impls}
    for r in range(runs):
        for impl in impls:
            got = [count_fn(impl, m, tag_fn(r, impl, m)) for m in (n0, n)]
            why = next((w for _, w in got if w), None)
            if why:
                fails += 1
                print_run(keys, impl, r, None, why)
                for th in threads:
                    per[impl][th].append(None)
                continue
            (small, _), (big, _) = got
            for th in threads:
                per[impl][th].append((big[th] - small[th]) / (n - n0))
            print_run(keys, impl, r, " ".join(f"{th}={per[impl][th][-1]:.1f}" for th in threads))
    med = {(i, th): report(f"{keys} thread={th}", i, "instr_per_msg", "instr", per[i][th])
           for i in impls for th in threads}
    for i in impls:
        if i == base or base not in impls:
            continue
        for th in threads:
            k = f"{keys} thread={th}"
            delta(k, "instr_per_msg", i, med[i, th], base, med[base, th])
            ratio(k, "instr_per_msg", i, med[i, th], base, med[base, th])
    return fails


def main():
    ap = arg_parser(__doc__, "thr")
    ap.add_argument("--count", type=int)
    ap.add_argument("--transports")
    ap.add_argument("--impls", default="raw,zev_borrowed,zev_kept,zev_copy,zev_fiber")
    a = ap.parse_args()
    impls = a.impls.split(",")
    transports = (a.transports or ("ipc,tcp" if a.full else "ipc")).split(",")
    runs = a.runs or (5 if a.full else 3)
    n = a.count or (300000 if a.full else 30000)
    n0 = n // 5
    valgrind = shutil.which("valgrind")
    print(f"INFO instr runs={runs} messages={n} baseline_messages={n0} size={SIZE}")
    if not valgrind:
        for t in transports:
            for i in impls:
                print(f"FAIL bench=instr transport={t} size={SIZE} impl={i} "
                      "metric=instr_per_msg reason=valgrind_not_found")
        return 1
    fails = 0
    with tempfile.TemporaryDirectory(prefix="zev-perf-instr-") as tmp:
        for t in transports:
            keys = f"bench=instr transport={t} size={SIZE}"
            fails += per_message(keys, impls, runs, n, ("receiver", "others"), "raw",
                                 lambda impl, m, tag: count(valgrind, a.thr, impl, t, m, tmp, tag),
                                 lambda r, impl, m: f"{t}-{r}-{impl}-{m}")
            sys.stdout.flush()
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
