"""A user's text files as language-modelling documents, for ``fastadapt adapt-lm --source/--target``.

Each path given is a file or a folder. A file is read whatever its name; a folder is searched
recursively for files whose names match one of the ``--glob`` patterns (default :data:`DEFAULT_GLOB`),
skipping hidden files and folders (names starting with ``.``, e.g. ``.git``) and following no symbolic
link to a folder. Files are read in sorted path order as UTF-8 (a byte-order mark is dropped, line
ends become ``\\n``) and cut into documents of about :data:`DOC_CHARS` characters at line ends, preferring
blank lines, so that the 1-in-10 held-out split of ``lm_data.split`` samples every part of the text
whatever the number of files.

Every failure names the argument and the path: a path that does not exist, a file that cannot be read
(permissions), a binary file (a NUL byte, or bytes that are not UTF-8), an empty file named on the
command line, a folder with no matching file that holds text. Empty files found in a folder (an
``__init__.py``) are skipped.
"""
from __future__ import annotations

import fnmatch
import os

DEFAULT_GLOB = "*.txt,*.md,*.rst,*.py"
DOC_CHARS = 2000  # a document ends at the first blank line after this many characters
MAX_DOC_CHARS = 8000  # ... or at the first line end after this many, blank line or not


def patterns(text: str) -> list[str]:
    """``--glob``'s comma-separated file name patterns."""
    out = [p.strip() for p in text.split(",") if p.strip()]
    if not out:
        raise ValueError(f"--glob must name one or more file name patterns such as {DEFAULT_GLOB!r}, got {text!r}")
    return out


def read_documents(paths, arg: str, glob: str = DEFAULT_GLOB) -> tuple[list[str], dict]:
    """(documents, {"files": n, "characters": n}) of the files and folders ``paths`` given to ``arg``."""
    names = patterns(glob)
    texts = []
    for path in paths:
        if os.path.isdir(path):
            found = _find(path, names, arg)
            read = [t for t in (_read(f, arg) for f in found) if t.strip()]
            if not read:
                what = f"{len(found)} matching files, all empty" if found else "no file matching"
                raise ValueError(f"{arg} {path!r}: {what} {','.join(names)} in it (searched recursively, hidden "
                                 f"files and folders skipped; --glob sets the patterns)")
            texts.extend(read)
        elif os.path.isfile(path):
            text = _read(path, arg)
            if not text.strip():
                raise ValueError(f"{arg} {path!r} is empty" + (" (only white space)" if text else ""))
            texts.append(text)
        elif os.path.lexists(path):
            raise ValueError(f"{arg} {path!r} is neither a file nor a folder")
        else:
            raise FileNotFoundError(f"{arg} {path!r} does not exist")
    docs = [d for t in texts for d in cut(t)]
    return docs, {"files": len(texts), "characters": sum(len(t) for t in texts)}


def _find(folder: str, names: list[str], arg: str) -> list[str]:
    def unreadable(exc: OSError):
        raise ValueError(f"{arg} {folder!r}: cannot list {exc.filename!r}: {exc.strerror or exc}")

    found = []
    for root, dirs, files in os.walk(folder, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, f) for f in sorted(files)
                     if not f.startswith(".") and any(fnmatch.fnmatch(f, p) for p in names))
    return found


def _read(path: str, arg: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"{arg} {path!r} cannot be read: {exc.strerror or exc}") from None
    nul = data.find(b"\0")
    if nul >= 0:
        raise ValueError(f"{arg} {path!r} is not a text file: it holds a NUL byte (at byte {nul})")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{arg} {path!r} is not UTF-8 text: byte {data[exc.start]:#04x} at byte {exc.start} "
                         f"({exc.reason})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def cut(text: str) -> list[str]:
    """``text`` in pieces of whole lines: each ends at the first blank line after DOC_CHARS characters,
    or at the first line end after MAX_DOC_CHARS; pieces of only white space are dropped."""
    docs, lines, size = [], [], 0
    for line in text.splitlines(keepends=True):
        lines.append(line)
        size += len(line)
        if (size >= DOC_CHARS and not line.strip()) or size >= MAX_DOC_CHARS:
            docs.append("".join(lines))
            lines, size = [], 0
    docs.append("".join(lines))
    return [d for d in docs if d.strip()]
