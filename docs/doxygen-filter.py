#!/usr/bin/env python3
"""Doxygen INPUT_FILTER for include/zev.h: turns its plain C contract
comments into Doxygen comments on the fly, so that zev.h stays written for
people and remains the manual's single source.

Rules (what zev.h's comments already follow):
- The comment that opens the file documents the file (\\file).
- A comment that starts a line and is followed, without a blank line, by
  declarations documents each of them, up to the next blank line or comment
  (zev_msg_parts ... zev_msg_frame share one comment; each gets it).
- A comment after code on the same line documents that line's declaration
  or member (/**< ... */).
- Comments followed by a blank line (the "---- loop" section rulers) stay
  plain comments.
- With --man, each public function (a ZEV_API declaration) also goes into a
  group of its own named after it, titled with its comment's opening clause,
  so that Doxygen writes one man page per function (`man zev_stream_send`,
  NAME: "zev_stream_send - Sends a copy of data as one part"). The HTML
  manual is built without them: one page, in zev.h's order.

Usage (Doxygen runs it as: filter <file>):  doxygen-filter.py [--man] include/zev.h
Python 3 standard library only; output goes to stdout.
"""
import re
import sys

FUNC_NAME = re.compile(r"\b(zev_\w+)\s*\(")


def code_part(line):
    """The line without its comments (for brace and semicolon counting)."""
    return re.sub(r"/\*.*?(\*/|$)", "", re.sub(r"//.*", "", line))


def escape(text):
    """zev.h's comments are plain text: characters Doxygen would read as
    commands or HTML (and a leading '"', which makes it drop a member's
    comment) are escaped so they print as written."""
    return re.sub(r'([\\@<>&"#])', r"\\\1", text)


def escape_comment(text):
    """Escapes the body of a /* ... */ comment, not its delimiters."""
    m = re.match(r"^(.*?/\*)(.*?)(\*/.*)?$", text, re.S)
    return m.group(1) + escape(m.group(2)) + (m.group(3) or "")


def trailing_doc(line):
    """Turns a comment after code on the line into a member comment."""
    m = re.match(r"^(\s*\S.*?)/\*(?![*!])(.*)$", line)
    if m and m.group(1).strip() and "*/" not in m.group(1):
        return f"{m.group(1)}/**<" + escape_comment("/*" + m.group(2))[2:]
    return line


def read_items(lines):
    """Splits the file into (kind, lines) items: 'blank'; 'comment' for a
    comment that starts its line; 'pp' for a preprocessor line (with its
    continuations); 'decl' for a declaration up to its ';' at depth 0 (a
    function, a typedef, a whole struct); 'other' for extern "C" braces."""
    items, i, n = [], 0, len(lines)
    while i < n:
        line = lines[i]
        s = line.strip()
        if not s:
            items.append(("blank", [line]))
            i += 1
        elif s.startswith("/*"):
            block = [line]
            while "*/" not in block[-1][block[-1].find("/*") + 2 if len(block) == 1 else 0:]:
                i += 1
                block.append(lines[i])
            items.append(("comment", block))
            i += 1
        elif s.startswith("#"):
            block = [line]
            while block[-1].rstrip().endswith("\\") and i + 1 < n:
                i += 1
                block.append(lines[i])
            items.append(("pp", block))
            i += 1
        elif s in ("}", 'extern "C" {') or s.startswith("extern \"C\""):
            items.append(("other", [line]))
            i += 1
        else:
            block, depth = [], 0
            while i < n:
                block.append(lines[i])
                c = code_part(lines[i])
                depth += c.count("{") + c.count("(") - c.count("}") - c.count(")")
                i += 1
                if depth <= 0 and c.rstrip().endswith(";"):
                    break
            items.append(("decl", block))
    return items


def as_doc(comment, first=False):
    """A leading /* ... */ block as a /** ... */ block (\\file for the first)."""
    text = escape_comment("\n".join(comment))
    head = "/** \\file\n *" if first else "/**"
    text = re.sub(r"/\*(?![*!])", lambda _: head, text, count=1)
    return text.split("\n")


def brief(comment):
    """The comment's opening clause (up to the first '.', ':' or ';' outside
    parentheses), for the one-line description of a function's man page."""
    body = " ".join(l.strip().lstrip("/*").rstrip("*/").strip() for l in comment)
    body = re.sub(r"\s+", " ", body).strip()
    depth = 0
    for i, c in enumerate(body):
        depth += (c == "(") - (c == ")")
        if depth == 0 and c in ".:;" and (i + 1 == len(body) or body[i + 1] == " "):
            return escape(body[:i])
    return escape(body)


def filtered(text, man):
    lines = text.split("\n")
    out, doc, seen_code = [], None, False
    for item in read_items(lines):
        kind, block = item[0], item[1]
        if kind == "comment":
            if doc is not None:
                out += doc["plain"] if not doc["used"] else []
            # the file's opening comment documents the file
            if not seen_code and not out:
                out += as_doc(block, first=True)
                if not man:  # the HTML manual's front page points at it
                    out += ["/** \\mainpage zev reference manual",
                            " * The whole API is one header, \\ref zev.h : every declaration",
                            " * there carries its contract (ownership, threads, errors). */"]
                doc = None
            else:
                doc = {"plain": block, "doc": as_doc(block), "used": False}
            continue
        if kind == "blank" or (kind == "pp" and not block[0].lstrip().startswith("#define")) \
                or kind == "other":
            if doc is not None and not doc["used"]:
                out += doc["plain"]
            doc = None
            seen_code = seen_code or kind != "blank"
            out += block
            continue
        seen_code = True
        block = [trailing_doc(l) for l in block]
        m = FUNC_NAME.search(code_part(" ".join(block))) if kind == "decl" else None
        is_api = man and m and block[0].lstrip().startswith("ZEV_API")
        if is_api:
            name = m.group(1)
            trail = re.search(r"/\*\*<(.*?)\*/", block[-1])
            # a line's own comment names it best when a comment covers several
            title = trail.group(1).strip() if trail else (brief(doc["plain"]) if doc else name)
            out += [f"/** \\defgroup {name} {title}",
                    " * \\#include \\<zev.h\\>",
                    " *",
                    " * The conventions every zev function follows (errors, threads, lifetimes)",
                    " * are in zev.h(3).",
                    " * @{ */"]
        if doc is not None:
            out += doc["doc"]
            doc["used"] = True
        out += block
        if is_api:
            out.append("/** @} */")
    if doc is not None and not doc["used"]:
        out += doc["plain"]
    return "\n".join(out)


def main():
    args = sys.argv[1:]
    man = args[:1] == ["--man"]
    if man:
        args = args[1:]
    if len(args) != 1:
        sys.exit("usage: doxygen-filter.py [--man] FILE  (Doxygen's INPUT_FILTER)")
    with open(args[0], encoding="utf-8") as f:
        sys.stdout.write(filtered(f.read(), man))


if __name__ == "__main__":
    main()
