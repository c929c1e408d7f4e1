"""Shared by perf/compare.py and perf/targets.py: the parser for the lines
the perf/ programs print (the grammar in perf/common.h) and the formatting of
table cells. Python 3 standard library only."""

DASH = "—"
TRANSPORTS = ["inproc", "ipc", "tcp"]
SIZES = ["64", "1024", "65536"]


# --------------------------------------------------------------------- parsing

class Results:
    def __init__(self):
        self.results, self.ratios, self.deltas, self.fails, self.info = [], [], [], [], []

    def feed(self, lines):
        for ln in lines:
            kind, _, rest = ln.partition(" ")
            if kind == "INFO":
                self.info.append(rest)
                continue
            if kind not in ("RESULT", "RATIO", "DELTA", "FAIL", "RUNFAIL"):
                continue
            kv = {}
            for f in rest.split():
                k, eq, v = f.partition("=")
                if eq:
                    kv[k] = v
            for k in ("median", "min", "max", "ratio", "delta", "mean", "stddev"):
                if k in kv:
                    try:
                        kv[k] = float(kv[k])
                    except ValueError:
                        kv[k] = None
            {"RESULT": self.results, "RATIO": self.ratios, "DELTA": self.deltas,
             "FAIL": self.fails, "RUNFAIL": self.fails}[kind].append(kv)

    @staticmethod
    def _match(rec, want):
        return all(str(rec.get(k)) == str(v) for k, v in want.items())

    def get(self, **want):
        for r in self.results:
            if self._match(r, want):
                return r
        return None

    def ratio(self, **want):
        for r in self.ratios:
            if self._match(r, want):
                return r["ratio"]
        return None

    def info_value(self, program, key):
        """The value of `key=` in the first INFO line that starts with `program`."""
        for line in self.info:
            words = line.split()
            if words and words[0] == program:
                for w in words[1:]:
                    k, eq, v = w.partition("=")
                    if eq and k == key:
                        return v
        return None

    def delta(self, **want):
        for r in self.deltas:
            if self._match(r, want):
                return r["delta"]
        return None


# ------------------------------------------------------------------ formatting

def si(v, unit=""):
    if v is None:
        return DASH
    a = abs(v)
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            return f"{v / div:.3g} {suf}{unit}".strip()
    return f"{v:.3g} {unit}".strip()


def num(v, digits=3):
    if v is None:
        return DASH
    if abs(v) >= 10 ** digits:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def cell(rec, fmt=num, spread=True):
    if not rec or rec.get("median") is None:
        return DASH
    s = fmt(rec["median"])
    if spread and rec.get("runs", "1") != "1":
        s += f" ({fmt(rec['min'])}–{fmt(rec['max'])})"
    return s


def xr(v):
    return DASH if v is None else f"{v:.2f}×"


def table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"
