#!/usr/bin/python3
"""Instructions per message of a zero-copy sender: zev against raw libzmq.

Why: zcsend's sender CPU time per message (tx_cpu_ns) moves by tens of
percent between runs on a shared VM, and most of a zev_zc sender's extra
cost over raw_zc is user-space work (the stream's queue, a status, a
tracker and its completion per message). That work is counted here with
valgrind's callgrind (--separate-threads) on `zcsend --runs 1 --impls I`:
the sender is zcsend's main thread (thread 1), which for the zev rows also
runs the loop, its callbacks and the completions; libzmq's threads and the
receiver are `others`. Kernel time is not counted.

Per message = (count at N - count at N/5) / (N - N/5): start-up, the buffer
pool's fill and teardown cancel.

Usage: perf/zcinstr.py --zcsend BUILD/perf/zcsend [--runs N] [--count N]
       [--transports inproc,tcp] [--sizes 65536] [--impls raw_zc,zev_zc,zev_zc_delay]
Output: RESULT/DELTA/RATIO/FAIL lines in the grammar of perf/common.h:
  RESULT bench=zcinstr transport=T size=S thread=sender|others impl=I
         metric=instr_per_msg unit=instr median=.. min=.. max=.. runs=N
"""
import os
import shutil
import subprocess
import sys
import tempfile

from instructions import per_message, totals
from pyzmq_common import arg_parser

TIMEOUT = 600


def count(valgrind, zcsend, impl, transport, size, n, tmp, tag):
    """({"sender": Ir, "others": Ir}, None) for one sender of n messages, or
    (None, reason)."""
    prefix = os.path.join(tmp, f"cg-{tag}")
    cmd = [valgrind, "--tool=callgrind", "--separate-threads=yes",
           f"--callgrind-out-file={prefix}", "--log-file=/dev/null", zcsend, "--runs", "1",
           "--impls", impl, "--transports", transport, "--sizes", str(size), "--count", str(n)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return None, "timeout"
    if p.returncode != 0 or "RESULT" not in p.stdout:
        return None, f"zcsend_exit_{p.returncode}"
    t = totals(prefix)
    if 1 not in t:
        return None, "no_callgrind_output"
    return {"sender": t[1], "others": sum(v for k, v in t.items() if k != 1)}, None


def main():
    ap = arg_parser(__doc__, "zcsend")
    ap.add_argument("--count", type=int)
    ap.add_argument("--transports", default="inproc,tcp")
    ap.add_argument("--sizes", default="65536")
    ap.add_argument("--impls", default="raw_zc,zev_zc,zev_zc_delay")
    a = ap.parse_args()
    impls = a.impls.split(",")
    runs = a.runs or 3
    n = a.count or 20000
    n0 = n // 5
    valgrind = shutil.which("valgrind")
    print(f"INFO zcinstr runs={runs} messages={n} baseline_messages={n0}")
    fails = 0
    with tempfile.TemporaryDirectory(prefix="zev-perf-zcinstr-") as tmp:
        for t in a.transports.split(","):
            for size in (int(s) for s in a.sizes.split(",")):
                keys = f"bench=zcinstr transport={t} size={size}"
                fails += per_message(
                    keys, impls, runs, n, ("sender", "others"), "raw_zc",
                    lambda impl, m, tag: (count(valgrind, a.zcsend, impl, t, size, m, tmp, tag)
                                          if valgrind else (None, "valgrind_not_found")),
                    lambda r, impl, m: f"{t}-{size}-{r}-{impl}-{m}")
                sys.stdout.flush()
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
