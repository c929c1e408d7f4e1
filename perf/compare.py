#!/usr/bin/python3
"""Runs the perf/ programs, collects their RESULT lines (each program already
takes the median of its runs and measures its raw-libzmq baseline in the same
run), writes RESULTS.md and the gnuplot PNGs, and prints the tables.

Usage (perf/run calls it after building):
  perf/compare.py --build BUILD_DIR [--full] [--record] [--out DIR]
                  [--only thr,lat,...] [--from-logs DIR] [--command "perf/run"]

By default everything goes to the build tree, OUT (BUILD_DIR/results):
RESULTS.md, thr.png, lat.png, scale.png, history.jsonl (the committed
perf/history.jsonl plus this run) and logs/ (each program's raw output, the
hyperfine JSON and run.json, the run's date, load and command). Nothing
tracked by git changes. --record (a complete run only) then also publishes
the run: perf/RESULTS.md, perf/*.png, perf/results/ (the logs), a line
appended to perf/history.jsonl and the README's section between its
perf:begin/perf:end markers.

--from-logs DIR runs no program: it re-reads the output an earlier run saved
in DIR (its logs/, or perf/results) and writes the same reports from it,
e.g. `--from-logs build-perf/results/logs --record` publishes the run that
`perf/run` just made without running it again.

Python 3 standard library only. Every number in RESULTS.md comes from a line a
program printed; a program that fails or times out leaves its cells empty
("—") and the failure is listed.
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

from report import DASH, SIZES, TRANSPORTS, Results, cell, num, si, table, xr
from targets import measure, read_history, record, sec_targets, sec_why

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = "/usr/bin/python3"  # Debian's, with python3-zmq and python3-tornado

STEPS = ["thr", "lat", "scale", "fair", "loop", "timers", "post", "hostile", "alloc", "zcsend", "fiber",
         "pyzmq_thr", "pyzmq_lat", "pyzmq_fair", "pyzmq_green", "syscalls", "instructions", "hyperfine"]


# --------------------------------------------------------------------- running

def run_step(name, cmd, timeout, logdir):
    """Runs one program; returns (lines, seconds, failure or None)."""
    t0 = time.monotonic()
    fail = None
    print(f"perf: {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                           cwd=HERE)
        out, err = p.stdout, p.stderr
        if p.returncode != 0:
            fail = f"exit status {p.returncode}"
    except subprocess.TimeoutExpired as e:
        out, err = e.stdout or b"", e.stderr or b""
        fail = f"timed out after {timeout} s"
    except OSError as e:
        out, err = b"", str(e).encode()
        fail = f"could not run: {e}"
    secs = time.monotonic() - t0
    text = out.decode(errors="replace")
    with open(os.path.join(logdir, f"{name}.log"), "w") as f:
        f.write(f"# {' '.join(cmd)}\n# {secs:.1f} s{', ' + fail if fail else ''}\n")
        f.write(text)
        if err:
            f.write("# stderr\n" + err.decode(errors="replace"))
    return text.splitlines(), secs, fail


def hyperfine_count(full):
    return 1000000 if full else 100000


def hyperfine_transports(full):
    return ["inproc", "tcp"] if full else ["inproc"]


def hyperfine_lines(js, transport, count):
    """RESULT/FAIL lines from hyperfine's --export-json file; (lines, failure)."""
    try:
        with open(js) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return [], f"{transport}: no JSON"
    lines = []
    for r in data.get("results", []):
        impl = r.get("command")
        codes = r.get("exit_codes") or []
        if codes and any(codes):
            lines.append(f"FAIL bench=hyperfine transport={transport} count={count} impl={impl} "
                         f"metric=seconds reason=exit_codes_{'_'.join(map(str, codes))}")
            continue
        lines.append(f"RESULT bench=hyperfine transport={transport} count={count} impl={impl} "
                     f"metric=seconds unit=s median={r['median']:.6g} min={r['min']:.6g} "
                     f"max={r['max']:.6g} runs={len(r.get('times', []))} mean={r['mean']:.6g} "
                     f"stddev={r.get('stddev') or 0:.3g}")
    return lines, None


def hyperfine_step(thr, full, logdir):
    """Whole-process time to move N messages: raw vs zev vs zloop."""
    hf = shutil.which("hyperfine")
    if not hf:
        return [], 0.0, "hyperfine not installed"
    count = hyperfine_count(full)
    runs = 10 if full else 5
    lines, total, fails = [], 0.0, []
    for transport in hyperfine_transports(full):
        js = os.path.join(logdir, f"hyperfine-{transport}.json")
        cmd = [hf, "-N", "-i", "--runs", str(runs), "--warmup", "1", "--export-json", js]
        for impl in ("raw", "zev_borrowed", "zloop"):
            cmd += ["-n", impl, f"{thr} --once --impl {impl} --transport {transport} --size 64 "
                                f"--count {count}"]
        _, secs, fail = run_step(f"hyperfine-{transport}", cmd, 600, logdir)
        total += secs
        if fail:
            fails.append(f"{transport}: {fail}")
        got, fail = hyperfine_lines(js, transport, count)
        lines += got
        if fail:
            fails.append(fail)
    return lines, total, "; ".join(fails) or None


def logged_step(name, logdir, full):
    """(lines, seconds, failure) of a step as an earlier run logged it."""
    def read(path):
        with open(path) as f:
            text = f.read().split("\n# stderr\n")[0].splitlines()
        m = re.match(r"# ([0-9.]+) s(?:, (.*))?$", text[1] if len(text) > 1 else "")
        return text, (float(m.group(1)) if m else 0.0), (m.group(2) if m else None)

    if name == "hyperfine":
        lines, total, fails = [], 0.0, []
        for transport in hyperfine_transports(full):
            base = os.path.join(logdir, f"hyperfine-{transport}")
            try:
                _, secs, fail = read(base + ".log")
            except OSError:
                secs, fail = 0.0, "not in the logs"
            total += secs
            got, jfail = hyperfine_lines(base + ".json", transport, hyperfine_count(full))
            lines += got
            fails += [f"{transport}: {f}" for f in (fail,) if f] + ([jfail] if jfail else [])
        return lines, total, "; ".join(fails) or None
    try:
        return read(os.path.join(logdir, f"{name}.log"))
    except OSError:
        return [], 0.0, "not in the logs"


# --------------------------------------------------------------------- tables

THR_IMPLS = ["raw", "zev_borrowed", "zev_kept", "zev_copy", "zloop"]
LAT_IMPLS = ["raw", "zev", "zloop", "raw_spin", "zev_spin"]
SCALE_IMPLS = ["zev_epoll", "zev_poll", "zmq_poll", "zloop"]


def sec_thr(R):
    s = ["## Throughput, PUSH → PULL (perf/thr.c)\n",
         "Messages per second at the receiver, first to last message; median of the runs "
         "(min–max). Same sender thread for every receiver; `raw` is a blocking `zmq_msg_recv` "
         "loop, the ceiling. `zev_kept` keeps and releases each frame, `zev_copy` copies it "
         "out, `zloop` reads one message per readiness callback.\n"]
    for t in TRANSPORTS:
        rows = []
        for z in SIZES:
            k = dict(bench="thr", transport=t, size=z, metric="msgs_per_s")
            row = [f"{int(z):,} B"] + [cell(R.get(impl=i, **k), si) for i in THR_IMPLS]
            row += [xr(R.ratio(bench="thr", transport=t, size=z, metric="msgs_per_s",
                               num="zev_borrowed", den=d)) for d in ("raw", "zloop")]
            rows.append(row)
        s.append(f"\n**{t}** (msg/s)\n\n")
        s.append(table(["size"] + THR_IMPLS + ["zev/raw", "zev/zloop"], rows))
    rows = []
    for t in TRANSPORTS:
        for z in SIZES:
            k = dict(bench="thr", transport=t, size=z, metric="rx_cpu_ns")
            rows.append([t, f"{int(z):,} B"] + [cell(R.get(impl=i, **k), spread=False)
                                               for i in THR_IMPLS])
    s.append("\nReceiver thread CPU time per message (ns, median):\n\n")
    s.append(table(["transport", "size"] + THR_IMPLS, rows))
    return "".join(s)


def sec_lat(R):
    s = ["## Round-trip latency, REQ ↔ REP, 64 B (perf/lat.c)\n",
         "Per-round-trip `clock_gettime(CLOCK_MONOTONIC)` on the client (the same client code in "
         "every row); p50 with min–max over runs, the other percentiles as medians over runs, µs. "
         "Rows name the echo server: `raw` blocking, `zev` a stream, `zloop`; `raw_spin` has both "
         "ends spinning on `ZMQ_DONTWAIT`, `zev_spin` a spinning client and a zev server with "
         "busy-poll (`spin_us`). Spinning rows are measured on inproc only: with ipc/tcp two "
         "spinning threads starve libzmq's I/O thread on a 2-core machine.\n"]
    for t in TRANSPORTS:
        rows = []
        for i in LAT_IMPLS:
            k = dict(bench="lat", transport=t, impl=i)
            if not R.get(metric="p50_us", **k) and i.endswith("_spin"):
                continue
            rows.append([i, cell(R.get(metric="p50_us", **k))] +
                        [cell(R.get(metric=m, **k), spread=False)
                         for m in ("p99_us", "p999_us", "max_us", "mean_us")])
        s.append(f"\n**{t}**\n\n")
        s.append(table(["server", "p50", "p99", "p99.9", "max", "mean"], rows))
        d50 = R.delta(bench="lat", transport=t, metric="p50_us", num="zev", den="raw")
        d999 = R.delta(bench="lat", transport=t, metric="p999_us", num="zev", den="raw")
        sp = R.ratio(bench="lat", transport=t, metric="p50_us", num="zev_spin", den="raw_spin")
        s.append(f"\nzev − raw: p50 {num(d50)} µs, p99.9 {num(d999)} µs"
                 + (f"; zev_spin / raw_spin p50: {xr(sp)}" if sp else "") + ".\n")
    return "".join(s)


def sec_scale(R):
    s = ["## Scale: N idle sockets registered, one active (perf/scale.c)\n",
         "Server thread CPU time per round trip (µs; waking, finding the ready socket, "
         "dispatching, echoing), median (min–max). zev_poll is zev's portable poll(2) backend, "
         "O(N) by nature; zmq_poll is a hand-written loop over an array of N+1 items; zloop has "
         "N+1 pollers. Quick mode stops zmq_poll and zloop at 1,000 sockets.\n"]
    rows = []
    for n in ("10", "100", "1000", "10000"):
        rows.append([f"{int(n):,}"] + [cell(R.get(bench="scale", sockets=n, impl=i, metric="srv_cpu_ns"),
                                            lambda v: num(v / 1000))
                                       for i in SCALE_IMPLS])
    s.append("\n" + table(["N"] + SCALE_IMPLS, rows))
    rows = []
    for i in SCALE_IMPLS:
        rows.append([i] + [xr(R.ratio(bench="scale_growth", impl=i, metric="srv_cpu_ns",
                                      num=f"n{n}", den="n10")) for n in ("100", "1000", "10000")])
    s.append("\nGrowth of the CPU cost relative to N = 10:\n\n")
    s.append(table(["impl", "N=100", "N=1,000", "N=10,000"], rows))
    rows = []
    for n in ("10", "100", "1000", "10000"):
        rows.append([f"{int(n):,}"] + [
            cell(R.get(bench="scale", sockets=n, impl=i, metric=m), spread=False)
            for i in ("zev_epoll", "zmq_poll") for m in ("rtt_p50_us", "wake_p50_us")])
    s.append("\nRound trip and wake-up (client send → server callback) medians, µs:\n\n")
    s.append(table(["N", "zev_epoll RTT", "zev_epoll wake", "zmq_poll RTT", "zmq_poll wake"], rows))
    return "".join(s)


def sec_fair(R):
    def rows(bench, transports, impls):
        out = []
        for t in transports:
            for i in impls:
                k = dict(bench=bench, transport=t, impl=i)
                if not R.get(metric="delay_p50_us", **k):
                    continue
                out.append([t, i] + [cell(R.get(metric=m, **k), spread=False) for m in
                                     ("delay_p50_us", "delay_p99_us", "delay_max_us", "msgs_p50",
                                      "msgs_p99", "msgs_max")] +
                           [cell(R.get(metric="fire_rate", **k), si, spread=False)])
        return out

    head = ["transport", "reactor", "delay p50 µs", "p99 µs", "max µs", "msgs p50", "msgs p99",
            "msgs max", "firehose msg/s"]
    s = ["## Fairness: a quiet socket under a firehose (perf/fair.c)\n",
         "One reactor reads a flooded PULL socket and a quiet one (one message per ms). Delay of "
         "the quiet messages in µs and in firehose messages handled meanwhile (median over runs "
         "of each run's p50 / p99 / max), and the firehose rate the reactor sustained meanwhile. "
         "`raw` is a zmq_poll loop reading one message per readable socket per round. zev "
         "reads up to a batch (64 here) from a stream per iteration: docs/design.md bounds a "
         "quiet message's wait, from the iteration that sees it, at 2 × batch − 1 firehose "
         "messages; `msgs` counts from the quiet message's send, before the loop can see it, "
         "so its max can exceed that bound. `zev_stream_set_batch` trades firehose rate for "
         "quiet delay.\n"]
    s.append("\n" + table(head, rows("fair", TRANSPORTS, ("raw", "zev", "zloop"))))
    s.append("\nEach reactor in its own process, with PyZMQ (perf/pyzmq_fair.py): the same feeder "
             "threads run in `fair --feed-only`, the reactors are `fair --react-only` (C) and two "
             "ZMQStreams on tornado's IOLoop (`pyzmq_stream`), and the reactor's handled count is "
             "shared through a mapped file so that msgs counts the same thing:\n")
    s.append("\n" + table(head, rows("pyzmq_fair", ("ipc", "tcp"),
                                     ("c_raw", "c_zev", "c_zloop", "pyzmq_stream"))))
    return "".join(s)


def sec_loop(R):
    s = ["## Loop overheads (perf/loop.c)\n",
         "\nEmpty iteration (`zev_loop_run_once(loop, 0)`, one idle stream) against `zmq_poll` "
         "on the same socket and the bare syscalls (`getpid` is libzmq's fork check before each "
         "poll of a socket's mailbox), ns:\n\n"]
    rows = [[i, cell(R.get(bench="loop_iter", impl=i, metric="ns_per_iter"))]
            for i in ("zev_epoll", "zev_poll", "zmq_poll", "epoll_wait", "poll", "getpid")]
    s.append(table(["impl", "ns / iteration"], rows))
    s.append("\n`zev_loop_add_callback` throughput against the same calls sent over inproc "
             "PUSH → PULL to a blocking receive loop, calls/s:\n\n")
    rows = []
    for p in ("1", "2"):
        k = dict(bench="callbacks", producers=p, metric="cb_per_s")
        rows.append([p, cell(R.get(impl="zev", **k), si), cell(R.get(impl="raw_inproc", **k), si),
                     xr(R.ratio(num="zev", den="raw_inproc", **k))])
    s.append(table(["producers", "zev", "raw inproc", "zev/raw"], rows))
    s.append("\n100,000 one-shot timers, delays random in [0, 1] ms; thread CPU ns per timer. "
             "zmq_timers is libzmq's draft API (repeating timers only: its fire cost includes "
             "re-arming); zloop keeps a list, ideal when every timer fires in one pass:\n\n")
    rows = []
    for i in ("zev", "zmq_timers", "zloop"):
        k = dict(bench="timers", timers="100000", impl=i)
        rows.append([i] + [cell(R.get(metric=m, **k)) for m in ("start_ns", "fire_ns",
                                                                 "start_fire_ns")])
    s.append(table(["impl", "start", "fire", "start + fire"], rows))
    s.append("\nOne loop iteration with 0 and with 100,000 timers pending (far in the future), ns "
             "— what every pending timer costs every iteration:\n\n")
    rows = []
    for i in ("zev", "zmq_timers", "zloop"):
        rows.append([i] + [cell(R.get(bench="timers_idle", pending=p, impl=i,
                                      metric="ns_per_iter")) for p in ("0", "100000")] +
                    [xr(R.ratio(bench="timers_idle_growth", impl=i, metric="ns_per_iter"))])
    s.append(table(["impl", "0 pending", "100,000 pending", "growth"], rows))
    return "".join(s)


TIMER_IMPLS = ["timerfd", "zev_epoll", "zev_poll", "zev_epoll_timerfd"]


def sec_timers(R):
    s = ["## Timer accuracy (perf/timers.c)\n",
         "\nA periodic timer's interval between ticks and a one-shot's delay, µs (medians of the "
         "runs; a tick is a wakeup). `timerfd` is the floor: a blocking read loop on a Linux "
         "timerfd. zev runs its loop with `zev_loop_run`, no busy-poll; `zev_epoll_timerfd` is "
         "epoll's wait for kernels without epoll_pwait2. drift: how far the average tick is from "
         "the period; cpu: the timer thread's CPU time over wall time.\n\n"]
    for case, period in (("periodic_100us", "100 µs"), ("periodic_1ms", "1 ms")):
        s.append(f"\n**{period} periodic**\n\n")
        rows = []
        for i in TIMER_IMPLS:
            k = dict(bench="timer_accuracy", case=case, impl=i)
            rows.append([i] + [cell(R.get(metric=m, **k)) for m in ("interval_avg",
                                                                    "interval_p50",
                                                                    "interval_p99")] +
                        [cell(R.get(metric="drift", **k), lambda v: f"{v:.2f} %"),
                         cell(R.get(metric="cpu", **k), lambda v: f"{v:.1f} %")])
        s.append(table(["impl", "average", "p50", "p99", "drift", "cpu"], rows))
    s.append("\n**300 µs one-shot** (delay from start to callback)\n\n")
    rows = []
    for i in TIMER_IMPLS:
        k = dict(bench="timer_accuracy", case="oneshot_300us", impl=i)
        rows.append([i] + [cell(R.get(metric=m, **k)) for m in ("delay_p50", "delay_p99")])
    s.append(table(["impl", "p50", "p99"], rows))
    return "".join(s)


HOSTILE_IMPLS = ["raw", "zev_default", "zev_unbounded"]


def sec_hostile(R):
    s = ["## Hostile peers: one message of many parts (perf/hostile.c)\n",
         "\nA peer process sends one message of N empty parts over tcp, then a one-part message; "
         "the receiver runs in a process of its own. `raw` is the floor: a blocking "
         "`zmq_msg_recv` loop holding nothing. `zev_default` keeps the default bound of "
         "65,536 parts per message (longer messages are drained and dropped whole); "
         "`zev_unbounded` sets `zev_stream_set_max_parts(s, 0)` and gets every message whole. "
         "rss: peak RSS growth, MiB; stall: the longest time a 1 ms zev timer on the same loop "
         "could not run, ms (raw: the whole receive, nothing else can run meanwhile); recv: "
         "first part to the last message, ms. Medians of the runs.\n\n"]
    rows = []
    for parts in ("10000", "100000", "1000000"):
        for i in HOSTILE_IMPLS:
            k = dict(bench="hostile", parts=parts, impl=i)
            rows.append([f"{int(parts):,}", i] + [cell(R.get(metric=m, **k), lambda v: f"{v:.1f}")
                                                  for m in ("rss_mib", "stall_ms", "recv_ms")])
    s.append(table(["parts", "impl", "rss MiB", "stall ms", "recv ms"], rows))
    return "".join(s)


POST_LAT_IMPLS = ["eventfd", "eventfd_epoll", "zev_add_callback", "zev_post", "zactor"]
POST_THR_IMPLS = ["zev_add_callback", "zev_post", "zactor"]


def sec_post(R):
    gap = int(R.info_value("post", "gap_us") or 50)
    ring = R.info_value("post", "ring") or "256"
    pinned = (R.info_value("post", "consumers_cpu") or "-1") != "-1"
    s = ["## Cross-thread posts (perf/post.c)\n",
         "Producer threads post a 16-byte message (its send time, producer, slot, sequence) to "
         "one consumer; a producer reuses a slot once its post ran. `eventfd` is the floor: the "
         "producer writes an eventfd, the consumer blocks in `read()` on it (a syscall on each "
         "side, no queue); `eventfd_epoll` waits in `epoll_wait` on it first, as any epoll loop "
         "woken through an eventfd does; `zev_add_callback` mallocs a node per post, `zev_post` "
         "uses the caller's `zev_post_t`; `zactor` is a CZMQ actor receiving a frame per post on "
         "its pipe (one pipe per producer, polled with zpoller).\n",
         f"\n**Latency**, paced and interleaved: every row's consumer waits at once; in rounds "
         f"of {3 * gap} µs each producer posts once, at a random moment of the round's first "
         f"{gap} µs, to the row whose turn it is (the rows take turns in a shuffled order), so a "
         "consumer is asleep when its posts come and the machine's drift hits every row alike; "
         "with several producers their posts may meet in an awake consumer. "
         + ("*Cores apart*: the producers on one core, the consumers on the other, so every "
            "wake-up crosses cores; *one core*: all on one core, a post hands the core over. "
            if pinned else "Threads not pinned: the scheduler places them (both cases alike). ")
         + "Post → callback, µs; p50 with min–max over runs, p99 and max as medians over runs, "
         "and p50 over the eventfd floor's:\n\n"]
    rows = []
    for p in ("1", "2", "4"):
        for i in POST_LAT_IMPLS:
            row, have = [p, i], False
            for case in ("latency", "latency_one_core"):
                k = dict(bench="post", case=case, producers=p)
                have = have or bool(R.get(impl=i, metric="p50_us", **k))
                row += ([cell(R.get(impl=i, metric="p50_us", **k))] +
                        [cell(R.get(impl=i, metric=m, **k), spread=False)
                         for m in ("p99_us", "max_us")] +
                        [DASH if i == "eventfd" else
                         xr(R.ratio(metric="p50_us", num=i, den="eventfd", **k))])
            if have:
                rows.append(row)
    s.append(table(["producers", "impl", "cores apart: p50", "p99", "max", "/ eventfd",
                    "one core: p50", "p99", "max", "/ eventfd"], rows))
    s.append(f"\n**Throughput**, flat out: each producer posts as fast as its ring of {ring} "
             "slots lets it, one row at a time, producers and consumer on cores apart. Posts per "
             "second at the consumer (the zev loop thread, the actor), first to last, median "
             "(min–max); the consumer thread's CPU time per post and how often it went to sleep "
             "(voluntary context switches per 1,000 posts), medians; heap allocations per post "
             "(producers + consumer; malloc interposed):\n\n")

    def allocs(k):
        tx, rx = (R.get(metric=m, **k) for m in ("tx_allocs", "rx_allocs"))
        return DASH if not tx or not rx else f"{tx['median']:.2g} + {rx['median']:.2g}"

    rows = []
    for p in ("1", "2", "4"):
        for i in POST_THR_IMPLS:
            k = dict(bench="post", case="throughput", producers=p, impl=i)
            rows.append([p, i, cell(R.get(metric="msgs_per_s", **k), si)] +
                        [cell(R.get(metric=m, **k), spread=False)
                         for m in ("rx_cpu_ns", "rx_sleeps")] + [allocs(k)])
    s.append(table(["producers", "impl", "posts/s", "consumer CPU ns / post",
                    "sleeps / 1,000 posts", "allocs / post"], rows))
    rows = []
    for p in ("1", "2", "4"):
        k = dict(bench="post", case="throughput", producers=p, metric="msgs_per_s")
        rows.append([p] + [xr(R.ratio(num=n, den=d, **k))
                           for n, d in (("zev_post", "zev_add_callback"), ("zev_post", "zactor"),
                                        ("zev_add_callback", "zactor"))])
    s.append("\nRatios of the median rates:\n\n")
    s.append(table(["producers", "zev_post / zev_add_callback", "zev_post / zactor",
                    "zev_add_callback / zactor"], rows))
    return "".join(s)


def sec_alloc(R):
    s = ["## Heap allocations per message on the receiving thread (perf/alloc.c)\n",
         "malloc/calloc/realloc interposed for the whole process and counted on the receiver "
         "thread after a 10 % warm-up, 64 B messages (the sender's allocations are not counted):"
         "\n\n"]
    rows = []
    for t in TRANSPORTS:
        rows.append([t] + [cell(R.get(bench="alloc", transport=t, impl=i, metric="allocs_per_msg"),
                                lambda v: f"{v:.2g}", spread=False)
                           for i in ("raw", "zev_borrowed", "zev_kept", "zloop")])
    s.append(table(["transport", "raw", "zev_borrowed", "zev_kept", "zloop"], rows))
    return "".join(s)


ZC_IMPLS = ["raw_copy", "raw_zc", "zev_copy", "zev_zc", "zev_zc_delay"]
ZC_RATIOS = [("zev_zc", "raw_zc"), ("zev_zc_delay", "raw_zc"), ("zev_zc", "zev_copy")]
ZC_SIZES = ["65536", "1048576"]


def sec_zcsend(R):
    def xr3(v):  # ratios here span 0.005× to 200×
        return DASH if v is None else f"{v:.3g}×"

    s = ["## Zero-copy send (perf/zcsend.c)\n",
         "PUSH → PULL, one sender at a time into the same receiver (a blocking raw `zmq_msg_recv` "
         "thread that counts and touches the first byte). `raw_copy` is `zmq_send`, `raw_zc` "
         "`zmq_msg_init_data` with a free function + `zmq_msg_send`, `zev_copy` "
         "`zev_stream_send`, `zev_zc` `zev_stream_send_zc` with a tracker per message, released "
         "on completion (every free function and every completion is counted), `zev_zc_delay` "
         "the same with `zev_stream_set_tracker_delay` (1 ms by default: completions share the "
         "loop's wakeups instead of waking it one by one). Buffers come from "
         "a preallocated pool, round-robin for the copy rows, reused by the zc rows only after "
         "their free function ran; HWM = 4 MiB / size (at least 8). Messages per second at the "
         "receiver, first to last; median of the runs (min–max). The copy rows are dominated by "
         "libzmq allocating each message body (malloc and first-touch page faults of 64 KiB – "
         "1 MiB blocks). zev_copy at 1 MiB pays most: when the receiver stalls, the stream "
         "copies up to its max_queue (the HWM here) bodies in a row, the receiver frees them "
         "together and glibc trims the heap, so the next burst faults its pages in again "
         "(profile in the history section below).\n"]
    transports = [t for t in TRANSPORTS
                  if any(R.get(bench="zcsend", transport=t, size=z, impl=i, metric="msgs_per_s")
                         for z in ZC_SIZES for i in ZC_IMPLS)] or ["inproc", "tcp"]
    rows = []
    for t in transports:
        for z in ZC_SIZES:
            k = dict(bench="zcsend", transport=t, size=z, metric="msgs_per_s")
            rows.append([t, f"{int(z) // 1024:,} KiB"] + [cell(R.get(impl=i, **k), si)
                                                         for i in ZC_IMPLS] +
                        [xr3(R.ratio(num=n, den=d, **k)) for n, d in ZC_RATIOS])
    heads = ["transport", "size"] + ZC_IMPLS + [f"{n}/{d}" for n, d in ZC_RATIOS]
    s.append("\n" + table(heads, rows))
    rows = []
    for t in transports:
        for z in ZC_SIZES:
            k = dict(bench="zcsend", transport=t, size=z, metric="tx_cpu_ns")
            rows.append([t, f"{int(z) // 1024:,} KiB"] + [cell(R.get(impl=i, **k), spread=False)
                                                         for i in ZC_IMPLS] +
                        [xr3(R.ratio(num=n, den=d, **k)) for n, d in ZC_RATIOS])
    s.append("\nSender thread CPU time per message (ns, median; from the first send until "
             "everything is handed to libzmq and, for the zc rows, every buffer is back):\n\n")
    s.append(table(heads, rows))
    rows = []
    for t in transports:
        for z in ZC_SIZES:
            k = dict(bench="zcsend", transport=t, size=z)
            cells = []
            for i in ZC_IMPLS:
                c = cell(R.get(impl=i, metric="tx_sleeps", **k), lambda v: f"{v:.3f}", spread=False)
                it = R.get(impl=i, metric="tx_iters", **k)
                cells.append(c + (" / " + cell(it, lambda v: f"{v:.3f}", spread=False) if it else ""))
            rows.append([t, f"{int(z) // 1024:,} KiB"] + cells)
    s.append("\nTimes the sender thread went to sleep per message (voluntary context switches, "
             "median; a count that explains the CPU time above and hardly moves with the "
             "machine's load), and for the zev rows after the slash the loop iterations it ran "
             "per message (each one a wait in the backend, a system call):\n\n")
    s.append(table(["transport", "size"] + ZC_IMPLS, rows))
    return "".join(s)


def sec_pyzmq(R):
    s = ["## PyZMQ ZMQStream (perf/pyzmq_thr.py, perf/pyzmq_lat.py)\n",
         "Throughput: the sender is `thr --send-only` (the same C sender code) in its own "
         "process; receivers `c_raw`, `c_zev` (C, `thr --recv-only`), `pyzmq_stream` "
         "(ZMQStream.on_recv on tornado/asyncio) and `pyzmq_recv` (a blocking recv loop in "
         "Python), msg/s:\n\n"]
    rows = []
    for t in ("ipc", "tcp"):
        for z in SIZES:
            k = dict(bench="pyzmq_thr", transport=t, size=z, metric="msgs_per_s")
            if not any(R.get(impl=i, **k) for i in ("c_raw", "c_zev", "pyzmq_stream")):
                continue
            rows.append([t, f"{int(z):,} B"] +
                        [cell(R.get(impl=i, **k), si) for i in ("c_raw", "c_zev", "pyzmq_stream",
                                                                "pyzmq_recv")] +
                        [xr(R.ratio(num="c_zev", den="pyzmq_stream", **k))])
    s.append(table(["transport", "size", "c_raw", "c_zev", "pyzmq_stream", "pyzmq_recv",
                    "zev/pyzmq_stream"], rows))
    s.append("\nLatency: the C client `lat --client-only` against each echo server in its own "
             "process, 64 B, µs:\n\n")
    rows = []
    for t in ("ipc", "tcp"):
        for i in ("c_raw", "c_zev", "pyzmq_stream"):
            k = dict(bench="pyzmq_lat", transport=t, impl=i)
            if not R.get(metric="p50_us", **k):
                continue
            rows.append([t, i, cell(R.get(metric="p50_us", **k))] +
                        [cell(R.get(metric=m, **k), spread=False) for m in ("p99_us", "p999_us")])
    s.append(table(["transport", "server", "p50", "p99", "p99.9"], rows))
    return "".join(s)


FIBER_YIELD_IMPLS = ["fibers_1", "fibers_2", "fibers_100", "bare_yield", "bare_switch"]


def sec_fiber(R):
    s = ["## Fibers beside callbacks (perf/fiber.c, perf/pyzmq_green.py)\n",
         "Each fiber row runs beside the callback code doing the same work, interleaved run by "
         "run in one process; median (min–max) over runs.\n",
         "\n**Ping-pong**, PAIR ↔ PAIR over inproc, 64 B, both ends on one loop in one thread: "
         "wall ns per round trip and the thread's CPU ns per round trip. `callback`: two streams "
         "whose on_recv echo and send the next ping; `fiber`: two fibers calling "
         "`zev_fiber_send` + `zev_fiber_recv`; `raw`: one thread calling zmq_send / "
         "zmq_msg_recv on both sockets in turn, never waiting (no loop at all: the floor of "
         "libzmq's own work).\n\n"]
    k = dict(bench="fiber_pingpong", transport="inproc", size="64")
    rows = [[i, cell(R.get(impl=i, metric="rtt_ns", **k)),
             cell(R.get(impl=i, metric="cpu_ns", **k), spread=False)]
            for i in ("callback", "fiber", "raw")]
    s.append(table(["impl", "RTT ns", "CPU ns"], rows))
    s.append(f"\nfiber / callback: {xr(R.ratio(metric='rtt_ns', num='fiber', den='callback', **k))}"
             " (target ≤ 1.15×).\n")
    s.append("\n**PUSH → PULL**, 64 B, perf/thr.c's sender thread, the receiver on the loop "
             "thread: `stream` is on_recv with borrowed frames (thr's zev_borrowed), `fiber` one "
             "fiber calling `zev_fiber_recv` in a loop, `raw` a blocking `zmq_msg_recv` loop; msg/s "
             "and the receiver's CPU ns per message:\n\n")
    rows = []
    for t in TRANSPORTS:
        k = dict(bench="fiber_thr", transport=t, size="64")
        rows.append([t] + [cell(R.get(impl=i, metric="msgs_per_s", **k), si)
                           for i in ("raw", "stream", "fiber")] +
                    [xr(R.ratio(metric="msgs_per_s", num="fiber", den="stream", **k))] +
                    [cell(R.get(impl=i, metric="rx_cpu_ns", **k), spread=False)
                     for i in ("stream", "fiber")])
    s.append(table(["transport", "raw", "stream", "fiber", "fiber/stream", "stream CPU ns",
                    "fiber CPU ns"], rows))
    instr = [(t, R.get(bench="instr", transport=t, size="64", thread="receiver", impl=i,
                       metric="instr_per_msg"))
             for t in ("ipc", "tcp") for i in ("zev_borrowed", "zev_fiber")]
    if all(v for _, v in instr[:2]):
        s.append("\nInstructions per message of the receiving thread (perf/instructions.py, "
                 "callgrind, `thr --recv-only`): "
                 + "; ".join(f"{instr[j][0]} stream {instr[j][1]['median']:.0f}, fiber "
                             f"{instr[j + 1][1]['median']:.0f}"
                             for j in (0, 2) if instr[j][1] and instr[j + 1][1]) + ".\n")
    s.append("\n**Yield**: k fibers calling `zev_fiber_yield` in a loop, ns per yield, the "
             "thread's CPU time (it never waits, and a busy machine's preemptions are left out). "
             "A yield resumes in the next loop iteration, so it costs two context switches and 1/k "
             "of an iteration. Beside it, in the same run, core/ctx.c's bare switch (main ↔ one "
             "context, ns per switch) and a bare yield through a scheduler context (two "
             "switches, no loop; perf/ctxswitch.c's op=yield):\n\n")
    rows = []
    for i in FIBER_YIELD_IMPLS:
        m = "ns_per_switch" if i == "bare_switch" else "ns_per_yield"
        rows.append([i, cell(R.get(bench="fiber_yield", impl=i, metric=m))])
    s.append(table(["impl", "ns"], rows))
    it, sw = R.info_value("fiber_yield", "iteration_ns"), R.info_value("fiber_yield",
                                                                      "two_switches_ns")
    if it and sw:
        s.append(f"\nFrom fibers_1 = I + 2s and fibers_2 = I/2 + 2s: one loop iteration I ≈ {it} "
                 f"ns, two switches 2s ≈ {sw} ns.\n")
    n = R.info_value("fiber_sleep", "fibers") or "100000"
    mmc = R.info_value("fiber_sleep", "max_map_count")
    s.append(f"\n**{int(n):,} sleeping fibers**, default stacks (64 KiB + a guard page), all "
             "asleep in `zev_fiber_sleep` at once: the process's RSS then (rss) and its growth "
             "over the RSS before the spawns; per fiber: `zev_fiber_spawn`, first resume until "
             "asleep, cancel + return + join; fibers/s over the whole cycle (spawn + join rate). "
             f"`timer` is the callback way: {int(n):,} one-shot zev timers (start, cancel)"
             + (f". vm.max_map_count was {int(mmc):,}" if mmc else "") + ":\n\n")
    rows = []
    for i in ("fiber", "timer"):
        k = dict(bench="fiber_sleep", fibers=n, impl=i)
        rows.append([i] + [cell(R.get(metric=m, **k), lambda v: f"{v:,.1f}")
                           for m in ("rss_mib", "growth_mib")] +
                    [cell(R.get(metric=m, **k), spread=False)
                     for m in ("spawn_ns", "start_ns", "exit_ns")] +
                    [cell(R.get(metric="fibers_per_s", **k), si)])
    s.append(table(["impl", "rss MiB", "growth MiB", "spawn ns", "start ns", "exit ns", "per s"],
                   rows))
    sp = R.get(bench="fiber_spawn", impl="serial", metric="ns_per_spawn_join")
    s.append(f"\nOne fiber at a time (spawn, the child returns, join; stacks from the pool): "
             f"{cell(sp)} ns per spawn + join.\n")
    s.append("\n**zmq.green on gevent** (perf/pyzmq_green.py): the same ping-pong (two greenlets "
             "on gevent's hub, inproc, in-process; `c_fiber` / `c_callback` are `fiber --once` "
             "runs), and PUSH → PULL fed by `thr --send-only` in its own process (`c_fiber` is "
             "`thr --recv-only --impl zev_fiber`, `c_stream` zev_borrowed, `c_raw` a blocking "
             "recv loop, the ceiling for this sender); round trips or messages per second:\n\n")
    rows = []
    k = dict(bench="green_pingpong", transport="inproc", size="64", metric="rt_per_s")
    rows.append(["ping-pong", "inproc"] + [cell(R.get(impl=i, **k), si) for i in
                                           ("c_fiber", "c_callback")] + [DASH] +
                [cell(R.get(impl="pyzmq_green", **k), si),
                 xr(R.ratio(num="c_fiber", den="pyzmq_green", **k))])
    for t in ("ipc", "tcp"):
        k = dict(bench="green_thr", transport=t, size="64", metric="msgs_per_s")
        rows.append(["PUSH → PULL", t] + [cell(R.get(impl=i, **k), si) for i in
                                          ("c_fiber", "c_stream", "c_raw", "pyzmq_green")] +
                    [xr(R.ratio(num="c_fiber", den="pyzmq_green", **k))])
    s.append(table(["work", "transport", "c_fiber", "c_callback / c_stream", "c_raw",
                    "pyzmq_green", "c_fiber / green"], rows))
    return "".join(s)


def sec_syscalls(R):
    tracer = R.info_value("syscalls", "tracer") or "perf or strace"
    s = ["## Syscalls per round trip (perf/syscalls.py)\n",
         "The echo server of the latency row (`lat --server-only`, ipc, REQ ↔ REP, 64 B) "
         f"counted with {tracer} (`perf stat --per-thread` on the syscall tracepoints, or "
         "`strace -f`), the client outside it; calls per round trip, median over runs. "
         "`server` is the thread running the echo loop, `io` libzmq's threads. The tracer slows "
         "every call down: only the counts mean anything here.\n\n"]
    impls = ("raw", "zev", "zloop")
    for thread in ("server", "io"):
        names = sorted({r["syscall"] for r in R.results if r.get("bench") == "syscalls"
                        and r.get("thread") == thread and r["syscall"] != "all"})
        if not names:
            continue
        rows = [[n] + [cell(R.get(bench="syscalls", impl=i, thread=thread, syscall=n),
                            spread=False) for i in impls] for n in names + ["all"]]
        s.append(f"\n**{thread} thread**\n\n")
        s.append(table(["syscall"] + list(impls), rows))
    return "".join(s)


def sec_instr(R):
    s = ["## Instructions per message (perf/instructions.py)\n",
         "valgrind's callgrind counts the user-space instructions of `thr --recv-only` (64 B, "
         "fed from another process by the same sender as the throughput rows); per message = "
         "the difference between a run of N and of N/5 messages, so start-up cancels; median "
         "over runs. Under callgrind the receiver is far slower than the sender and mostly finds "
         "messages waiting, so this is mainly the per-message path, plus the user-space part of "
         "what waiting it still does; no kernel time counts here. `receiver` is the receiving "
         "thread, `others` libzmq's I/O thread and the rest of the process.\n\n"]
    impls = ("raw", "zev_borrowed", "zev_kept", "zev_copy")
    rows = []
    for t in TRANSPORTS:
        for th in ("receiver", "others"):
            k = dict(bench="instr", transport=t, thread=th, metric="instr_per_msg")
            if not R.get(impl="raw", **k):
                continue
            rows.append([t, th] + [cell(R.get(impl=i, **k), fmt=lambda v: f"{v:.0f}",
                                        spread=False) for i in impls] +
                        [(lambda d: DASH if d is None else f"{d:+.0f}")(
                            R.delta(num="zev_borrowed", den="raw", **k))])
    s.append(table(["transport", "thread"] + list(impls) + ["zev_borrowed − raw"], rows))
    return "".join(s)


def sec_hyperfine(R):
    s = ["## Whole process (hyperfine)\n",
         "`hyperfine -N --export-json` over `thr --once --impl I --transport T --size 64 "
         "--count N`: process start, connect, N messages, exit; seconds, median (min–max):\n\n"]
    rows = []
    for r in R.results:
        if r.get("bench") != "hyperfine":
            continue
        base = R.get(bench="hyperfine", transport=r["transport"], impl="raw")
        rel = r["median"] / base["median"] if base and base["median"] else None
        rows.append([r["transport"], f"{int(r['count']):,}", r["impl"], cell(r, lambda v: f"{v:.3f}"),
                     xr(rel)])
    s.append(table(["transport", "messages", "receiver", "seconds", "vs raw"], rows))
    return "".join(s)


# ------------------------------------------------------------------------ plots

def gnuplot(script, png, size="1500,500"):
    gp = shutil.which("gnuplot")
    if not gp:
        return "gnuplot not installed"
    for term in (f"pngcairo size {size} font ',10'", f"png size {size}"):
        p = subprocess.run([gp], input=f"set terminal {term}\nset output '{png}'\n"
                           f"set termoption noenhanced\n{script}",
                           text=True, capture_output=True)
        if p.returncode == 0 and os.path.exists(png) and os.path.getsize(png) > 0:
            return None
    return p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "gnuplot failed"


def dat(v):
    return "?" if v is None else f"{v:.6g}"


def plots(R, outdir, tmp):
    made, errs = [], []
    # throughput: one panel per transport, clusters = sizes, bars = receivers
    panels = []
    for t in TRANSPORTS:
        f = os.path.join(tmp, f"thr-{t}.dat")
        with open(f, "w") as fh:
            fh.write("size " + " ".join(THR_IMPLS) + "\n")
            for z in SIZES:
                vals = [R.get(bench="thr", transport=t, size=z, impl=i, metric="msgs_per_s")
                        for i in THR_IMPLS]
                fh.write(f"{int(z) if int(z) < 1024 else str(int(z) // 1024) + 'KiB'} " +
                         " ".join(dat(v["median"] if v else None) for v in vals) + "\n")
        panels.append(f"set title '{t}'\nplot for [c=2:{len(THR_IMPLS) + 1}] '{f}' "
                      f"using c:xtic(1) title columnhead")
    script = ("set datafile missing '?'\nset style data histograms\nset style histogram cluster "
              "gap 1\nset style fill solid 0.8 border -1\nset logscale y\nset ylabel 'msg/s'\n"
              "set key top right\nset grid ytics\nset multiplot layout 1,3 title "
              "'PUSH→PULL throughput (median)'\n" + "\n".join(panels) + "\nunset multiplot\n")
    png = os.path.join(outdir, "thr.png")
    e = gnuplot(script, png)
    (errs.append(f"thr.png: {e}") if e else made.append("thr.png"))
    # latency percentiles: one panel per transport, clusters = servers
    panels = []
    for t in TRANSPORTS:
        f = os.path.join(tmp, f"lat-{t}.dat")
        with open(f, "w") as fh:
            fh.write("server p50 p99 p99.9\n")
            for i in LAT_IMPLS:
                vals = [R.get(bench="lat", transport=t, impl=i, metric=m)
                        for m in ("p50_us", "p99_us", "p999_us")]
                if not any(vals):
                    continue
                fh.write(f"{i} " + " ".join(dat(v["median"] if v else None) for v in vals) + "\n")
        panels.append(f"set title '{t}'\nplot for [c=2:4] '{f}' using c:xtic(1) title columnhead")
    script = ("set datafile missing '?'\nset style data histograms\nset style histogram cluster "
              "gap 1\nset style fill solid 0.8 border -1\nset logscale y\nset ylabel 'µs'\n"
              "set key top left\nset grid ytics\nset multiplot layout 1,3 title "
              "'Round-trip latency, 64 B (median of runs)'\n" + "\n".join(panels) +
              "\nunset multiplot\n")
    png = os.path.join(outdir, "lat.png")
    e = gnuplot(script, png)
    (errs.append(f"lat.png: {e}") if e else made.append("lat.png"))
    # scale: CPU per round trip vs N, log-log
    f = os.path.join(tmp, "scale.dat")
    with open(f, "w") as fh:
        fh.write("N " + " ".join(SCALE_IMPLS) + "\n")
        for n in ("10", "100", "1000", "10000"):
            vals = [R.get(bench="scale", sockets=n, impl=i, metric="srv_cpu_ns") for i in SCALE_IMPLS]
            fh.write(n + " " + " ".join(dat(v["median"] / 1000 if v else None) for v in vals) + "\n")
    script = ("set datafile missing '?'\nset logscale xy\nset xlabel 'registered sockets'\n"
              "set ylabel 'server CPU µs per round trip'\nset key top left\nset grid\n"
              "set title 'One active socket among N (median)'\n"
              f"plot for [c=2:{len(SCALE_IMPLS) + 1}] '{f}' using 1:c with linespoints lw 2 "
              "title columnhead\n")
    png = os.path.join(outdir, "scale.png")
    e = gnuplot(script, png, "900,600")
    (errs.append(f"scale.png: {e}") if e else made.append("scale.png"))
    return made, errs


# ------------------------------------------------------------------------- main

def sh(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def machine():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    model = ln.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            mem = f"{kb / 1048576:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    u = platform.uname()
    return (f"{os.cpu_count()} CPUs ({sh(['nproc'])} usable), {model or 'unknown CPU'}, {mem} RAM; "
            f"{u.system} {u.release} {u.machine}")


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def versions():
    v = [f"libzmq {sh(['pkg-config', '--modversion', 'libzmq']) or '?'}",
         f"CZMQ {sh(['pkg-config', '--modversion', 'libczmq']) or 'not installed'}"]
    pz = sh([PY, "-c", "import zmq, tornado; print(zmq.__version__, tornado.version)"]).split()
    v.append(f"PyZMQ {pz[0]} / tornado {pz[1]}" if len(pz) == 2 else "PyZMQ not installed")
    v.append((sh(["cc", "--version"]).splitlines() or ["cc ?"])[0])
    hf = sh(["hyperfine", "--version"])
    if hf:
        v.append(hf)
    return ", ".join(v)


def git_rev():
    rev = sh(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    if rev and sh(["git", "-C", ROOT, "status", "--porcelain", "--", "core", "backends", "include"]):
        rev += " + uncommitted changes in core/, backends/ or include/"
    return rev or "unknown"


HISTORY_MARK = "<!-- history:"
COMMITTED_RESULTS = os.path.join(HERE, "RESULTS.md")
COMMITTED_HISTORY = os.path.join(HERE, "history.jsonl")
COMMITTED_LOGS = os.path.join(HERE, "results")
README = os.path.join(ROOT, "README.md")


def kept_history():
    """The hand-kept log of measured changes at the end of the committed
    perf/RESULTS.md (from HISTORY_MARK on): every RESULTS.md written ends
    with it, so regenerating the tables never loses it."""
    try:
        with open(COMMITTED_RESULTS) as f:
            text = f.read()
    except OSError:
        return ""
    i = text.find(HISTORY_MARK)
    return "\n" + text[i:] if i >= 0 else ""


README_BEGIN = "<!-- perf:begin (written by perf/compare.py) -->"
README_END = "<!-- perf:end -->"


def update_readme(head, sections, plots_made):
    """Puts this run's sections (the targets verdict, why the missed ones are
    missed, the throughput table) into the top-level README between its
    markers, so the README never shows a number that no program printed."""
    try:
        with open(README) as f:
            text = f.read()
    except OSError:
        return False
    if README_BEGIN not in text or README_END not in text:
        return False
    meta = [line for line in head if line.startswith(("- Date", "- Command", "- Machine",
                                                      "- Load"))]
    pics = " ".join(f"![{m}](perf/{m})" for m in plots_made)
    demote = lambda sec: re.sub(r"(?m)^## ", "### ", sec)  # README nests them under ## Benchmarks
    section = "\n".join([README_BEGIN, "", *meta, "", *map(demote, sections), pics, "",
                         README_END])
    before = text.split(README_BEGIN)[0]
    after = text.split(README_END, 1)[1]
    with open(README, "w") as f:
        f.write(before + section + after)
    return True


RUN_META = "run.json"  # in the logs: when, where and how the run was made


def now():
    return datetime.datetime.now(datetime.timezone.utc)


def new_meta(a, build):
    return {"started": now().isoformat(timespec="seconds"), "mode": "full" if a.full else "quick",
            "command": a.command, "rev": git_rev(), "load_before": loadavg(),
            "machine": machine(), "versions": versions(), "build": os.path.relpath(build, ROOT)}


def logged_meta(logdir, a, build):
    """The run.json an earlier run left in its logs; what can be said
    without it (logs of a run older than run.json) is marked unknown."""
    try:
        with open(os.path.join(logdir, RUN_META)) as f:
            return json.load(f)
    except (OSError, ValueError):
        t = max((os.path.getmtime(os.path.join(logdir, n)) for n in os.listdir(logdir)),
                default=0)
        when = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
        return {"started": when.isoformat(timespec="seconds"),
                "finished": when.isoformat(timespec="seconds"),
                "mode": "full" if a.full else "quick", "command": "unknown (no run.json)",
                "rev": "unknown", "load_before": "?", "load_after": "?",
                "machine": "unknown (no run.json)", "versions": "unknown (no run.json)",
                "build": os.path.relpath(build, ROOT)}


def run_steps(steps, bindir, full, logdir):
    """Runs every step; [(step, lines, seconds, failure)]."""
    mode = ["--full"] if full else []
    timeout = 1800 if full else 300
    ran = []
    for step in steps:
        if step == "hyperfine":
            lines, secs, fail = hyperfine_step(os.path.join(bindir, "thr"), full, logdir)
        elif step in ("syscalls", "instructions"):  # scripts that drive lat / thr
            prog = "lat" if step == "syscalls" else "thr"
            lines, secs, fail = run_step(step, [PY, os.path.join(HERE, step + ".py"), "--" + prog,
                                                os.path.join(bindir, prog)] + mode, timeout, logdir)
        elif step == "pyzmq_green":  # drives two C programs: thr and fiber
            if not os.path.exists(PY):
                lines, secs, fail = [], 0.0, f"{PY} not found"
            else:
                lines, secs, fail = run_step(step, [PY, os.path.join(HERE, step + ".py"), "--thr",
                                                    os.path.join(bindir, "thr"), "--fiber",
                                                    os.path.join(bindir, "fiber")] + mode,
                                             timeout, logdir)
        elif step.startswith("pyzmq_"):
            name = step[len("pyzmq_"):]  # the C program the script drives: thr, lat, fair
            prog, flag = os.path.join(bindir, name), "--" + name
            if not os.path.exists(PY):
                lines, secs, fail = [], 0.0, f"{PY} not found"
            else:
                lines, secs, fail = run_step(step, [PY, os.path.join(HERE, step + ".py"), flag,
                                                    prog] + mode, timeout, logdir)
        else:
            lines, secs, fail = run_step(step, [os.path.join(bindir, step)] + mode, timeout, logdir)
        ran.append((step, lines, secs, fail))
    return ran


def results_md(R, meta, ran, history, made, plot_errs, logs_ref):
    """RESULTS.md's text; (text, head lines, README sections)."""
    started = datetime.datetime.fromisoformat(meta["started"])
    finished = datetime.datetime.fromisoformat(meta["finished"])
    load0 = meta["load_before"]
    try:
        busy = float(load0.split()[0]) > 0.5
    except (ValueError, IndexError):
        busy = False
    head = ["# zev benchmark results\n",
            "Generated by `perf/compare.py` (via `perf/run`); every number below was printed by a "
            "program in perf/ in this run. Do not edit by hand: re-run the command.\n",
            f"- Date: {started:%Y-%m-%d %H:%M} UTC ({(finished - started).total_seconds():.0f} s)",
            f"- Command: `{meta['command']}` ({meta['mode']} mode)",
            f"- Machine: {meta['machine']}",
            f"- Load average before / after: {load0} / {meta['load_after']}"
            + (" — the machine was busy: expect noise" if busy else ""),
            f"- zev revision: {meta['rev']}; Release build ({meta['build']})",
            f"- Versions: {meta['versions']}",
            "- Steps: " + ", ".join(f"{s} {t:.0f} s" + (f" ({f})" if f else "")
                                    for s, _, t, f in ran),
            ""]
    if made:
        head.append(" ".join(f"![{m}]({m})" for m in made) + "\n")
    targets, why = sec_targets(R, history), sec_why(R, history)
    body = [targets, why, sec_thr(R), sec_lat(R), sec_syscalls(R), sec_instr(R), sec_scale(R), sec_fair(R),
            sec_loop(R), sec_timers(R), sec_post(R), sec_hostile(R), sec_alloc(R), sec_zcsend(R), sec_pyzmq(R),
            sec_fiber(R), sec_hyperfine(R)]
    tail = ["## Failures, skipped rows and empty cells\n"]
    if not R.fails and not any(f for _, _, _, f in ran) and not plot_errs:
        tail.append("None.\n")
    for s, _, _, f in ran:
        if f:
            tail.append(f"- step {s}: {f}")
    for f in R.fails:
        tail.append("- " + " ".join(f"{k}={v}" for k, v in f.items()))
    for e in plot_errs:
        tail.append(f"- plot {e}")
    tail.append(f"\nRaw program output: {logs_ref}*.log (and hyperfine-*.json, {RUN_META}).\n")
    md = "\n".join(head) + "\n" + "\n".join(body) + "\n" + "\n".join(tail) + "\n"
    return md, head, [targets, why, sec_thr(R)]


def shown(path):
    """A path as the user would type it from the repository root."""
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith("..") else rel


def publish(out, logdir, md, kept, head, readme_sections, made, entry):
    """--record: the run becomes the committed one: perf/RESULTS.md (md,
    then the hand-kept history `kept`), perf/*.png, perf/results/ (this
    run's logs only), perf/history.jsonl and the README's section. Returns
    what it wrote."""
    wrote = []
    with open(COMMITTED_RESULTS, "w") as f:
        f.write(md + kept)
    wrote.append(COMMITTED_RESULTS)
    for m in made:
        shutil.copyfile(os.path.join(out, m), os.path.join(HERE, m))
        wrote.append(os.path.join(HERE, m))
    os.makedirs(COMMITTED_LOGS, exist_ok=True)
    for n in os.listdir(COMMITTED_LOGS):  # a quick run after a full one has fewer logs
        if n.endswith((".log", ".json")):
            os.unlink(os.path.join(COMMITTED_LOGS, n))
    for n in sorted(os.listdir(logdir)):
        shutil.copyfile(os.path.join(logdir, n), os.path.join(COMMITTED_LOGS, n))
    wrote.append(COMMITTED_LOGS + "/")
    # --from-logs --record of a run already recorded must not count it twice
    if any((r.get("date"), r.get("rev")) == (entry["date"], entry["rev"])
           for r in read_history(COMMITTED_HISTORY, entry["mode"])):
        print(f"perf: {shown(COMMITTED_HISTORY)} already holds this run ({entry['date']})",
              file=sys.stderr)
    else:
        record(COMMITTED_HISTORY, entry)
        wrote.append(COMMITTED_HISTORY)
    if update_readme(head, readme_sections, made):
        wrote.append(README)
    return wrote


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", required=True, help="build directory with perf/ programs")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--only", help="comma-separated steps: " + ",".join(STEPS))
    ap.add_argument("--command", default="perf/compare.py", help="command line to record")
    ap.add_argument("--out", help="where RESULTS.md, the PNGs, history.jsonl and logs/ go "
                                  "(default: BUILD/results)")
    ap.add_argument("--record", action="store_true",
                    help="also update perf/RESULTS.md, perf/*.png, perf/results/, "
                         "perf/history.jsonl and the README's table (a complete run only)")
    ap.add_argument("--from-logs", metavar="DIR",
                    help="run nothing: write the reports from the logs an earlier run saved in DIR")
    a = ap.parse_args()
    if a.record and a.only:
        ap.error("--record publishes a complete run: drop --only")
    build = os.path.abspath(a.build)
    bindir = os.path.join(build, "perf")
    out = os.path.abspath(a.out or os.path.join(build, "results"))
    logdir = os.path.join(out, "logs")
    steps = a.only.split(",") if a.only else STEPS
    if a.from_logs:
        src = os.path.abspath(a.from_logs)
        if not os.path.isdir(src):
            ap.error(f"--from-logs {a.from_logs}: no such directory")
        meta = logged_meta(src, a, build)
        full = meta["mode"] == "full"
        if src != logdir:
            shutil.rmtree(logdir, ignore_errors=True)
            shutil.copytree(src, logdir)
        ran = [(step, *logged_step(step, logdir, full)) for step in steps]
    else:
        shutil.rmtree(logdir, ignore_errors=True)  # this run's logs only
        os.makedirs(logdir)
        meta = new_meta(a, build)
        full = a.full
        ran = run_steps(steps, bindir, full, logdir)
        meta.update(finished=now().isoformat(timespec="seconds"), load_after=loadavg())
        with open(os.path.join(logdir, RUN_META), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
            f.write("\n")
    R = Results()
    for _, lines, _, _ in ran:
        R.feed(lines)

    # The targets table and the "why" quote ranges over the committed
    # history plus this run. The build tree gets a copy of that history with
    # this run appended (when complete); perf/history.jsonl only with --record.
    started = datetime.datetime.fromisoformat(meta["started"])
    entry = {"date": f"{started:%Y-%m-%d %H:%M}", "mode": meta["mode"], "rev": meta["rev"],
             "load": meta["load_before"], "figures": measure(R)}
    history = [r for r in read_history(COMMITTED_HISTORY, meta["mode"])
               if (r.get("date"), r.get("rev")) != (entry["date"], entry["rev"])] + [entry]
    out_history = os.path.join(out, "history.jsonl")
    if os.path.exists(COMMITTED_HISTORY):
        shutil.copyfile(COMMITTED_HISTORY, out_history)
    elif os.path.exists(out_history):
        os.unlink(out_history)
    if not a.only:
        record(out_history, entry)

    with tempfile.TemporaryDirectory() as tmp:
        made, plot_errs = plots(R, out, tmp)
    md, head, readme_sections = results_md(R, meta, ran, history, made, plot_errs,
                                           shown(logdir) + "/")
    kept = kept_history()  # read before anything rewrites perf/RESULTS.md
    with open(os.path.join(out, "RESULTS.md"), "w") as f:
        f.write(md + kept)
    print(md)
    print(f"perf: wrote {shown(os.path.join(out, 'RESULTS.md'))}"
          + (f", {', '.join(made)}" if made else "") + f", history.jsonl and logs/ in {shown(out)}",
          file=sys.stderr)
    if a.record:
        md, head, readme_sections = results_md(R, meta, ran, history, made, plot_errs,
                                               shown(COMMITTED_LOGS) + "/")
        wrote = publish(out, logdir, md, kept, head, readme_sections, made, entry)
        print("perf: recorded this run in " + ", ".join(shown(w) for w in wrote), file=sys.stderr)
    else:
        print("perf: the committed perf/RESULTS.md and README are unchanged; "
              "`perf/run --record` publishes a run", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
