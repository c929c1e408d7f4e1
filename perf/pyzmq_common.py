"""What perf/pyzmq_thr.py, pyzmq_lat.py and pyzmq_fair.py share: the PyZMQ
import, endpoints, the C helper processes they drive (a peer held open until
its stdin closes, a peer that prints READY and then a SAMPLE line) and the
RUN / RESULT / RATIO / DELTA / FAIL lines of perf/common.h. perf/syscalls.py
uses the peer and output helpers too.

The scripts run as `/usr/bin/python3 perf/X.py`, which puts perf/ first on
sys.path, so they import this module by name. Standard library only: PyZMQ is
imported by pyzmq(), which turns a missing module into a FAIL line.
"""
import argparse
import os
import socket
import statistics
import subprocess
import sys

TIMEOUT = 60.0  # seconds any one peer process may take


def pyzmq(bench, metric):
    """(zmq, IOLoop, ZMQStream); None after printing the FAIL line that leaves
    the bench's pyzmq_stream cells empty."""
    try:
        import zmq
        from tornado.ioloop import IOLoop
        from zmq.eventloop.zmqstream import ZMQStream
    except ImportError as e:
        print(f"FAIL bench={bench} impl=pyzmq_stream metric={metric} "
              f"reason=import_{type(e).__name__}", flush=True)
        return None
    return zmq, IOLoop, ZMQStream


def arg_parser(doc, prog, required=True):
    """The options every script takes; `--PROG PATH` names the C program."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument(f"--{prog}", required=required, help=f"path of the built {prog} program")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--runs", type=int)
    return ap


def info(bench, a, runs, zmq, extra=""):
    print(f"INFO {bench} mode={'full' if a.full else 'quick'} runs={runs} {extra}"
          f"{' ' if extra else ''}pyzmq={zmq.__version__} libzmq={zmq.zmq_version()} "
          f"python={sys.version.split()[0]}", flush=True)


# ------------------------------------------------------------------ endpoints

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def endpoint(transport, tag):
    """A fresh ipc or tcp endpoint (inproc cannot cross processes)."""
    if transport == "tcp":
        return f"tcp://127.0.0.1:{free_port()}"
    return f"ipc:///tmp/zev-perf-py-{os.getpid()}-{tag}"


def unlink_ep(ep):
    if ep.startswith("ipc://"):
        try:
            os.unlink(ep[6:])
        except OSError:
            pass


# ------------------------------------------------------------ peer processes

def start_held(cmd):
    """A peer that runs until its stdin is closed (a sender, the feeders)."""
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)


def stop_held(p):
    try:
        p.stdin.close()
        p.wait(timeout=15)
    except Exception:
        p.kill()
        p.wait()


def start_ready(cmd, role):
    """A peer that binds, prints READY, works and prints its SAMPLE line:
    (process, None) once READY was read, or (None, "<role>_not_ready")."""
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    except OSError:
        return None, f"{role}_not_started"
    if p.stdout.readline().strip() != "READY":
        p.kill()
        p.communicate()
        return None, f"{role}_not_ready"
    return p, None


def finish(p, timeout=TIMEOUT):
    """The rest of a start_ready peer's output: (text, None) or (None, reason)."""
    try:
        out, _ = p.communicate(timeout=timeout)
        return out, None
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        return None, "timeout"


def parse_sample(text):
    """The fields of the first SAMPLE line as floats: (dict, None), or
    (None, reason) with the reason of a FAIL line when there is one."""
    why = "no_sample"
    for ln in (text or "").splitlines():
        kind, _, rest = ln.partition(" ")
        kv = dict(f.split("=", 1) for f in rest.split() if "=" in f)
        if kind == "SAMPLE":
            return {k: float(v) for k, v in kv.items() if k not in ("bench", "impl")}, None
        if kind == "FAIL" and "reason" in kv:
            why = kv["reason"]
    return None, why


# -------------------------------------------------------------------- output

def print_run(keys, impl, run, fields, why=None):
    """A RUN line (fields: already formatted name=value text) or, when fields
    is None, a RUNFAIL line."""
    if fields is None:
        print(f"RUNFAIL {keys} impl={impl} run={run} reason={why}")
    else:
        print(f"RUN {keys} impl={impl} run={run} {fields}")
    sys.stdout.flush()


def report(keys, impl, metric, unit, vals):
    """RESULT line over the successful runs (None marks a failed one), or a
    FAIL line; returns the median or None."""
    ok = [v for v in vals if v is not None]
    if not ok:
        print(f"FAIL {keys} impl={impl} metric={metric} reason=no_successful_run")
        return None
    med = statistics.median(ok)
    print(f"RESULT {keys} impl={impl} metric={metric} unit={unit} median={med:.6g} "
          f"min={min(ok):.6g} max={max(ok):.6g} runs={len(ok)}")
    return med


def report_all(keys, vals, units):
    """report() for every impl and metric of vals[impl][metric] (units:
    metric -> unit); returns the medians keyed by (impl, metric)."""
    med = {(i, m): report(keys, i, m, units[m], vals[i][m]) for i in vals for m in units}
    sys.stdout.flush()
    return med


def ratio(keys, metric, num, vnum, den, vden):
    if vnum is not None and vden:
        print(f"RATIO {keys} metric={metric} num={num} den={den} ratio={vnum / vden:.4g}")


def delta(keys, metric, num, vnum, den, vden):
    if vnum is not None and vden is not None:
        print(f"DELTA {keys} metric={metric} num={num} den={den} delta={vnum - vden:.4g}")
