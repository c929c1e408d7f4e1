#!/usr/bin/env python3
"""Checks that the generated reference manual says what include/zev.h says:
for every public function (ZEV_API) the man page named after it exists and
holds the whole text of the function's comment, and with --html the HTML
manual's zev.h page holds it too. Run by ctest (docs-manual) on the
build's docs/ output.

Usage: check-manual.py ZEV_H MAN3_DIR [--html HTML_DIR]
Python 3 standard library only.
"""
import html
import os
import re
import sys


def words(text):
    """Text reduced to its words, so layout, quoting and escapes do not count."""
    return " ".join(re.findall(r"[a-z0-9_]+", text.lower()))


def contracts(header):
    """{function: words of its comment(s)} for every ZEV_API declaration: the
    comment block before it (shared by the declarations that follow up to a
    blank line) and the comment on its own last line."""
    out, comment, lines = {}, None, open(header, encoding="utf-8").read().split("\n")
    i = 0
    while i < len(lines):
        s = lines[i].strip()
        if s.startswith("/*"):
            block = [s]
            while "*/" not in lines[i]:
                i += 1
                block.append(lines[i])
            comment = " ".join(block)
        elif not s:
            comment = None
        elif s.startswith("ZEV_API"):
            decl = [lines[i]]
            while ";" not in re.sub(r"/\*.*", "", decl[-1]):
                i += 1
                decl.append(lines[i])
            code = " ".join(re.sub(r"/\*.*?\*/", "", d) for d in decl)
            name = re.search(r"\b(zev_\w+)\s*\(", code).group(1)
            trail = re.search(r"/\*(.*?)\*/", decl[-1])
            text = " ".join(t for t in (comment, trail and trail.group(1)) if t)
            out[name] = words(re.sub(r"/\*|\*/|\n\s*\*", " ", text))
        i += 1
    return out


def roff_text(path):
    t = open(path, encoding="utf-8", errors="replace").read()
    t = re.sub(r"\\f[BIRP]|\\&|\\\(..|\\-", lambda m: "-" if m.group(0) == "\\-" else " ", t)
    return words(re.sub(r"(?m)^\.\w+", " ", t))


def html_text(path):
    t = open(path, encoding="utf-8", errors="replace").read()
    return words(html.unescape(re.sub(r"<[^>]+>", " ", t)))


def main():
    args = sys.argv[1:]
    html_dir = None
    if "--html" in args:
        k = args.index("--html")
        html_dir = args[k + 1]
        del args[k:k + 2]
    if len(args) != 2:
        sys.exit(__doc__.split("\n\n")[1])
    header, man3 = args
    funcs = contracts(header)
    if not funcs:
        sys.exit(f"check-manual: no ZEV_API declarations found in {header}")
    bad = []
    page = html_text(os.path.join(html_dir, "zev_8h.html")) if html_dir else None
    for name, text in funcs.items():
        path = os.path.join(man3, name + ".3")
        if not os.path.exists(path):
            bad.append(f"{name}: no man page {path}")
            continue
        body = roff_text(path)
        if words(name) not in body:
            bad.append(f"{name}: {path} does not name it")
        if text and text not in body:
            bad.append(f"{name}: {path} lacks its comment: {text[:60]}...")
        if page is not None and text and text not in page:
            bad.append(f"{name}: the HTML page zev_8h.html lacks its comment: {text[:60]}...")
    for b in bad:
        print("check-manual:", b, file=sys.stderr)
    if bad:
        return 1
    print(f"check-manual: {len(funcs)} functions, each with its man page"
          + (" and its HTML text" if html_dir else "") + " holding its whole comment")
    return 0


if __name__ == "__main__":
    sys.exit(main())
