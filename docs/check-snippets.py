#!/usr/bin/env python3
"""Checks that the C snippets of the documentation compile, and that its
relative links lead somewhere.

    check-snippets.py <cc> <include-dir> <file.md>...

Every ```c block is compiled on its own (-fsyntax-only, -Werror) with
<zev.h> and the usual libc headers included first. A block right after a
`<!-- snippet: body -->` line is a function body: it is compiled inside a
function whose parameters give it `loop` (zev_loop_t *), `s`
(zev_stream_t *), `ctx` (a zmq context) and `sock` (a zmq socket). Other
blocks are whole translation units (functions, declarations, a main). A
block after `<!-- snippet: skip -->` is not compiled (pseudo-code).

Relative links ([text](path), [text](path#anchor), [text](#anchor)) must
name a file or directory of the repository without leaving it, and an
anchor into a Markdown file must name one of its headings.
"""
import os
import re
import subprocess
import sys
import tempfile

PRELUDE = """#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zev.h>
"""

BODY_OPEN = ("void snippet_body(zev_loop_t *loop, zev_stream_t *s, void *ctx, void *sock);\n"
             "void snippet_body(zev_loop_t *loop, zev_stream_t *s, void *ctx, void *sock)\n{\n"
             "    (void)loop; (void)s; (void)ctx; (void)sock;\n")


def blocks(text):
    """(line number, kind, code) for each ```c block."""
    lines = text.splitlines()
    out, i, mark = [], 0, None
    while i < len(lines):
        line = lines[i].strip()
        m = re.match(r"<!--\s*snippet:\s*(\w+)\s*-->", line)
        if m:
            mark = m.group(1)
        elif line == "```c":
            start = i + 1
            j = start
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            out.append((start + 1, mark or "unit", "\n".join(lines[start:j])))
            mark, i = None, j
        elif line:
            mark = None if not line.startswith("<!--") else mark
        i += 1
    return out


def compile_block(cc, include, kind, code):
    if kind == "body":
        src = PRELUDE + BODY_OPEN + code + "\n}\n"
    else:
        src = PRELUDE + code + "\n"
    with tempfile.NamedTemporaryFile("w", suffix=".c", delete=False) as f:
        f.write(src)
        path = f.name
    try:
        run = subprocess.run(
            [cc, "-std=c11", "-D_GNU_SOURCE", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
             "-Wno-unused-function", "-Wno-unused-parameter", "-Wno-unused-variable",
             "-Wno-unused-but-set-variable", "-I", include, path],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        return run.returncode, run.stdout.replace(path, "<snippet>")
    finally:
        os.unlink(path)


def anchors(path):
    """GitHub's anchors for the headings of a Markdown file."""
    out = set()
    in_code = False
    for line in open(path, encoding="utf-8"):
        if line.startswith("```"):
            in_code = not in_code
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m and not in_code:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def check_links(md, text, root):
    bad = []
    for m in re.finditer(r"\]\(([^)\s]+)\)", text):
        target = m.group(1)
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(os.path.dirname(md), path)) if path else md
        if not full.startswith(root + os.sep) and full != root:
            bad.append(f"{md}: link {target} leaves the repository")
        elif not os.path.exists(full):
            bad.append(f"{md}: link {target}: no such file")
        elif anchor and full.endswith(".md") and anchor not in anchors(full):
            bad.append(f"{md}: link {target}: no such heading")
    return bad


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    cc, include, files = sys.argv[1], sys.argv[2], sys.argv[3:]
    root = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    failures, count = [], 0
    for md in files:
        md = os.path.abspath(md)
        text = open(md, encoding="utf-8").read()
        failures += check_links(md, text, root)
        for line, kind, code in blocks(text):
            if kind == "skip":
                continue
            count += 1
            rc, out = compile_block(cc, include, kind, code)
            if rc:
                failures.append(f"{md}:{line}: the snippet does not compile:\n{out}")
    for f in failures:
        print("FAIL", f)
    if failures:
        sys.exit(1)
    print(f"ok: {count} snippets compile, links resolve")


if __name__ == "__main__":
    main()
