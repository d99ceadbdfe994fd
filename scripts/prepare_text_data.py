#!/usr/bin/env python3
"""Build English text corpora from Debian packages (stdlib only).

Outputs (under --out, default .data/):
  train.txt.xz    training text; documents separated by a line "<|doc|>"
  heldout.txt     held-out text from a package never used for train
  stream.txt.xz   one long book-length text (Jane Austen's six novels)
  SOURCES.md      packages, versions, licences and sizes

The three splits come from disjoint packages:
  train   dictionaries (GCIDE, FOLDOC, Jargon, Devil's Dictionary), fortunes,
          Python / Django / SQLAlchemy / PostgreSQL / Perl / Git / Linux kernel
          documentation, Debian manuals (reference, developers, maint-guide, policy)
  heldout debian-handbook (English HTML), a package that train never reads
  stream  r-cran-janeaustenr (novels stored as R data; decoded here)

Packages are fetched with `apt-get download` into --cache (reused when the
.deb is already there) and unpacked with `dpkg-deb -x`.  All inputs are read
in sorted order and the train shuffle uses a fixed seed, so the output is a
function of the package versions only (recorded in SOURCES.md; versions are
not pinned because Debian mirrors keep only the current one).  Paragraphs are
de-duplicated across train, and heldout drops any paragraph seen in train;
SOURCES.md reports the 13-gram overlap between the splits.

Usage:  python scripts/prepare_text_data.py --out .data
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import lzma
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import unicodedata
import zlib
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterable, Iterator

DOC_SEP = "<|doc|>"
SEED = 20240601
HELDOUT_CHARS = 800_000          # heldout.txt is cut at this many characters
STREAM_MIN_CHARS = 1_200_000
DICT_CHUNK_CHARS = 4_000         # dictionary entries are grouped into docs of ~this size
XZ_PRESET = 9 | lzma.PRESET_EXTREME

# --------------------------------------------------------------------------
# Debian packages
# --------------------------------------------------------------------------


@dataclass
class Package:
    """One downloaded and unpacked Debian package."""

    name: str
    version: str
    deb_size: int
    licence: str
    root: Path
    chars: dict[str, int] = field(default_factory=dict)  # split -> characters used


def run(cmd: list[str], cwd: Path | None = None) -> str:
    """Run a command, fail loudly, return stdout."""
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr}")
    return res.stdout


def fetch_deb(name: str, cache: Path) -> Path:
    """Return the cached .deb of `name`, downloading it with apt-get if needed."""
    found = sorted(cache.glob(f"{name}_*.deb"))
    if not found:
        try:
            run(["apt-get", "download", name], cwd=cache)
        except RuntimeError:
            run(["apt-get", "update"])  # fresh machine: package lists may be missing
            run(["apt-get", "download", name], cwd=cache)
        found = sorted(cache.glob(f"{name}_*.deb"))
    if not found:
        raise RuntimeError(f"apt-get download {name} produced no .deb")
    return found[-1]


# Packages whose debian/copyright is free-form text: licence read by hand from that file.
KNOWN_LICENCES = {
    "dict-gcide": "GPL-2+ (GCIDE dictionary data)",
    "dict-foldoc": "GFDL-1.1+, no invariant sections (FOLDOC); Dictionary.debian: verbatim-copy notice",
    "dict-devil": "public domain (copyright expired)",
    "fortunes": "BSD-3-clause (fortune-mod, Regents of the University of California)",
    "python3.11-doc": "PSF-2.0 (Python Software Foundation License) and the notices in its copyright file",
}


def licence_summary(name: str, copyright_file: Path) -> str:
    """Licence of a package: the `License:` of its `Files: *` stanza (DEP-5), else KNOWN_LICENCES."""
    if name in KNOWN_LICENCES:
        return KNOWN_LICENCES[name]
    if not copyright_file.exists():
        return "(no copyright file)"
    text = copyright_file.read_text(errors="replace")
    stanzas = [s for s in re.split(r"\n\s*\n", text) if re.search(r"^License:", s, re.M)]
    main = next((s for s in stanzas if re.search(r"^Files:\s*\*\s*$", s, re.M)), stanzas[0] if stanzas else "")
    found = re.search(r"^License:\s*(\S.*)$", main, re.M)
    if not found:
        return "(see copyright file)"
    others = {m.strip() for m in re.findall(r"^License:\s*(\S.*)$", text, re.M)} - {found.group(1).strip()}
    return found.group(1).strip() + (f" (+{len(others)} other licences for some files)" if others else "")


def open_package(name: str, cache: Path, work: Path) -> Package:
    """Download (if needed) and unpack one package; read its version and licence."""
    deb = fetch_deb(name, cache)
    root = work / name
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    run(["dpkg-deb", "-x", str(deb), str(root)])
    version = run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
    copyright_file = root / "usr/share/doc" / name / "copyright"
    return Package(name, version, deb.stat().st_size, licence_summary(name, copyright_file), root)


# --------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------

_WS = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"""[.!?]["'”’)\]]*$""")


def collapse(text: str) -> str:
    """Collapse all whitespace runs to single spaces."""
    return _WS.sub(" ", text).strip()


def letter_ratio(text: str) -> float:
    """Fraction of non-space characters that are letters."""
    chars = [c for c in text if not c.isspace()]
    return sum(c.isalpha() for c in chars) / max(1, len(chars))


def is_prose(par: str, min_words: int = 6) -> bool:
    """True for a paragraph that looks like real sentences (not code, lists or tables)."""
    words = par.split()
    if len(words) < min_words or not _SENTENCE_END.search(par):
        return False
    if letter_ratio(par) < 0.75 or not re.search(r"[a-z]", par):
        return False
    if re.search(r"https?://|[{}<>|\\]{1}|_{2,}|={2,}|\$\(", par):
        return False
    return sum(w.isupper() and len(w) > 1 for w in words) < len(words) / 3


def blocks(text: str) -> list[str]:
    """Split text into blank-line separated blocks (raw, not collapsed)."""
    return [b for b in re.split(r"\n\s*\n", text) if b.strip()]


def group(items: Iterable[str], limit: int = DICT_CHUNK_CHARS) -> list[str]:
    """Join consecutive short items (blank-line separated) into documents of about `limit` chars."""
    docs, cur, size = [], [], 0
    for item in items:
        cur.append(item)
        size += len(item)
        if size >= limit:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def normalise_doc(paragraphs: list[str]) -> str:
    """Join cleaned paragraphs into one document."""
    return "\n\n".join(p for p in paragraphs if p)


# --------------------------------------------------------------------------
# HTML -> paragraphs
# --------------------------------------------------------------------------

_BLOCK_TAGS = {"p", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "div", "blockquote",
               "td", "th", "tr", "table", "ul", "ol", "dl", "section", "body", "title", "br",
               "caption", "figure", "article", "main"}
_SKIP_TAGS = {"script", "style", "pre", "head", "nav", "header", "footer", "table", "code-block",
              "svg", "math", "button", "form", "select", "textarea"}
_SKIP_CLASSES = {"sphinxsidebar", "related", "footer", "highlight", "headerlink", "navheader",
                 "navfooter", "toc", "docnav", "mobile-nav", "breadcrumbs", "programlisting",
                 "screen", "synopsis", "cmdsynopsis", "funcsynopsis", "literallayout", "sig",
                 "index", "legalnotice", "copyright", "authorgroup", "revhistory", "admonition-title",
                 "footnotes", "toc-backref", "contents", "example", "informalexample", "indexterm",
                 "toctree-wrapper", "doctest", "rubric"}
_VOID_TAGS = {"br", "img", "hr", "meta", "link", "input", "area", "base", "col", "wbr", "source"}


class HtmlText(HTMLParser):
    """Collect prose paragraphs (and the page's <h1>) from an HTML page, skipping code and navigation."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool]] = []  # (tag, skipping)
        self.buf: list[str] = []
        self.paragraphs: list[str] = []
        self.title = ""
        self.in_h1 = False

    @property
    def skipping(self) -> bool:
        return bool(self.stack) and self.stack[-1][1]

    def flush(self) -> None:
        text = collapse("".join(self.buf))
        self.buf = []
        if text:
            self.paragraphs.append(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = set((dict(attrs).get("class") or "").split())
        if tag in _BLOCK_TAGS:
            self.flush()
        if tag in _VOID_TAGS:
            return
        skip = self.skipping or tag in _SKIP_TAGS or bool(classes & _SKIP_CLASSES) \
            or any(c.startswith("highlight") for c in classes)
        self.stack.append((tag, skip))
        if tag == "h1" and not skip and not self.title:
            self.in_h1 = True

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID_TAGS:
            return
        if any(t == tag for t, _ in self.stack):
            while self.stack:
                t, _ = self.stack.pop()
                if t == tag:
                    break
        if tag in _BLOCK_TAGS:
            if tag == "h1" and self.in_h1:
                self.title = collapse("".join(self.buf))
                self.in_h1 = False
                self.buf = []
            self.flush()

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.buf.append(data)


def html_doc(path: Path, min_words: int = 6) -> str:
    """One document from one HTML page: its title plus prose paragraphs ('' if too little prose)."""
    parser = HtmlText()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    parser.close()
    parser.flush()
    pars = [p.replace("¶", "").strip() for p in parser.paragraphs]
    pars = [p for p in pars if is_prose(p, min_words)]
    if sum(len(p) for p in pars) < 300:
        return ""
    title = re.sub(r"^[\d.]+\s*", "", parser.title.replace("¶", "")).strip()
    return normalise_doc(([title] if title else []) + pars)


def html_docs(files: Iterable[Path]) -> list[str]:
    """Documents from HTML pages, in sorted path order, empty pages dropped."""
    return [d for d in (html_doc(f) for f in sorted(files)) if d]


# --------------------------------------------------------------------------
# dictd databases
# --------------------------------------------------------------------------

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def b64_number(s: str) -> int:
    """Decode dictd's base64 integer encoding."""
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


def dictd_entries(dz: Path) -> list[tuple[str, str]]:
    """(headword, raw text) of each entry of a dictd database, in file order, without 00-database-* entries."""
    data = gzip.decompress(dz.read_bytes())  # .dz is gzip-compatible
    index = dz.with_name(dz.name.replace(".dict.dz", ".index"))
    spans: dict[int, tuple[int, str]] = {}
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        off, size = b64_number(parts[1]), b64_number(parts[2])
        spans.setdefault(off, (size, parts[0]))
    return [(word, data[off:off + size].decode("utf-8", errors="replace"))
            for off, (size, word) in sorted(spans.items())]


_GCIDE_ACCENTS = {"'": "\u0301", "`": "\u0300", '"': "\u0308", "~": "\u0303", ",": "\u0327", "^": "\u0302"}
_GCIDE_CODES = {"ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "eth": "ð", "thorn": "þ", "deg": "°",
                "sect": "§", "imac": "i", "aum": "a", "th": "th", "ng": "ng", "add": "a", "udd": "u",
                "asl": "a", "yogh": "ȝ", "root": "√", "oo": "oo"}


def gcide_chars(text: str) -> str:
    """Replace GCIDE character codes ([e'] style accents, [ae], [imac] ...) with Unicode or plain letters."""
    def accent(m: re.Match) -> str:
        mark, letters = m.group(1), m.group(2)
        comb = _GCIDE_ACCENTS.get(mark)
        return unicodedata.normalize("NFC", letters + comb) if comb and len(letters) == 1 else letters
    text = re.sub(r"\[(['`\"~,^=.*-])([A-Za-z]{1,2})\]", accent, text)
    text = re.sub(r"\[([A-Za-z]{1,2})\^\]", r"\1", text)            # breve (pronunciation only)
    text = re.sub(r"\[=?([a-zA-Z]{2,5})\]", lambda m: _GCIDE_CODES.get(m.group(1), m.group(0)), text)
    return re.sub(r"\[\d\]", "", text)


def gcide_entry(raw: str) -> str:
    """Turn one GCIDE entry into readable definition paragraphs."""
    raw = gcide_chars(raw)
    raw = re.sub(r"\[(?:[^\]]*Webster[^\]]*|PJC|WordNet[^\]]*|[A-Z]{2,4})\]", "", raw)
    raw = re.sub(r"--[A-Z][^\n]*(\n {20,}\S[^\n]*)*", "", raw)   # citations: --Shak.
    raw = re.sub(r"\{([^}]*)\}", lambda m: re.sub(r"[*\"`]", "", m.group(1)), raw)
    out = []
    for i, block in enumerate(blocks(raw)):
        text = collapse(block)
        if i == 0:
            text = re.sub(r"\\[^\\]*\\", "", text)                # pronunciation \Ab*do"men\
            text = re.sub(r"\[[^\]]*\]", "", text)                # etymology
            text = re.sub(r"\([^()]*[\"`*][^()]*\)", "", text)       # (kon"takt) pronunciation
        text = re.sub(r"\[[^\]]{1,40}\.\]", "", text)              # [Obs.] [R.] [See X.]
        text = re.sub(r"\[(?:[Ss]lang|[Aa]rchaic|Cant|Poetic|Low|[Vv]ulgar|Colloq)\]", "", text)
        text = collapse(re.sub(r"\s+([,.;:])", r"\1", text))
        if text.startswith("Syn:"):
            continue                                               # synonym lists
        if "?" in text and re.search(r"\s\?[\s,;.]", text):
            continue                                               # unrenderable Greek/Hebrew
        if letter_ratio(text) > 0.7 and len(text.split()) >= 2:
            out.append(text)
    return "\n".join(out) if sum(len(t.split()) for t in out) >= 5 else ""


def gcide_docs(pkg: Package) -> list[str]:
    """GCIDE (1913 Webster + additions): one paragraph group per headword, grouped into docs."""
    entries = dictd_entries(pkg.root / "usr/share/dictd/gcide.dict.dz")
    return group(e for e in (gcide_entry(raw) for _, raw in entries) if e)


def foldoc_entry(word: str, raw: str) -> str:
    """One FOLDOC entry as 'headword' + cleaned paragraphs (no dates, references or URLs)."""
    pars = []
    for block in blocks(raw)[1:]:
        text = collapse(block)
        text = re.sub(r"\{([^}]*)\}", r"\1", text)
        text = re.sub(r"^<([^>]+)>\s*", "", text)                 # <programming> category
        text = re.sub(r"^(\d+\.)\s*<[^>]+>\s*", r"\1 ", text)
        text = re.sub(r"\b__?(\w[^_]*?)__?\b", r"\1", text)
        text = re.sub(r"\(\d{4}-\d\d-\d\d\)$", "", text).strip()
        text = re.sub(r"^/[^/\s]+/\s*", "", text)                      # /nan'oh-bot/ pronunciation
        if not text or text.startswith(("[", "(http", "See ")) or "http" in text:
            continue
        if is_prose(text, 4):
            pars.append(text)
    return normalise_doc([word] + pars) if pars else ""


def foldoc_docs(pkg: Package) -> list[str]:
    """Free On-line Dictionary of Computing."""
    entries = dictd_entries(pkg.root / "usr/share/dictd/foldoc.dict.dz")
    return group(e for e in (foldoc_entry(w, raw) for w, raw in entries) if e)


def jargon_entry(raw: str) -> str:
    """One Jargon File entry: headword line plus prose paragraphs (drops indented examples)."""
    lines = raw.strip("\n").splitlines()
    head = lines[0].strip() if lines else ""
    pars = []
    for block in blocks("\n".join(lines[1:])):
        if re.match(r"\s{8,}\S", block) or not re.match(r"\s{0,6}\S", block):
            continue                                              # verse, code, ASCII art
        text = collapse(re.sub(r"\{([^}]*)\}", r"\1", block))
        text = re.sub(r"\{\s*|\s*\}", "", text)
        if re.fullmatch(r"(/[^/]*/,?\s*)?[a-z. ,]+\.?", text):      # '/bler'gl/, n.' line
            continue
        text = re.sub(r"^\[[^\]]{1,40}\]\s*", "", text)            # [common] [IBM] usage tag
        if is_prose(text, 5):
            pars.append(text)
    return normalise_doc([head] + pars) if pars and head else ""


def jargon_docs(pkg: Package) -> list[str]:
    """The Jargon File (hacker slang), one doc per entry group."""
    entries = dictd_entries(pkg.root / "usr/share/dictd/jargon.dict.dz")
    return group(e for e in (jargon_entry(raw) for _, raw in entries) if e)


def devil_docs(pkg: Package) -> list[str]:
    """Ambrose Bierce's Devil's Dictionary: definition paragraphs, verse dropped."""
    entries = dictd_entries(pkg.root / "usr/share/dictd/devil.dict.dz")
    items = []
    for _, raw in entries:
        pars = []
        for block in blocks(raw):
            if re.match(r"\s{4,}\S", block):
                continue                                          # indented verse
            text = collapse(re.sub(r"_([^_]+)_", r"\1", block))
            if is_prose(text, 4):
                pars.append(text)
        if pars:
            items.append("\n\n".join(pars))
    return group(items)


def fortune_text(raw: str) -> str:
    """Clean one fortune cookie: join wrapped lines, keep the attribution on its own line."""
    body, attribution = [], ""
    for line in raw.strip("\n").splitlines():
        s = line.strip()
        if re.match(r"^--+\s*\S", s) and line[:1].isspace() or (s.startswith("-- ") and not body):
            attribution = collapse(s)
        elif s:
            body.append(s)
    text = collapse(" ".join(body))
    if re.search(r"https?://|<\w|^>", text):
        return ""
    if not is_prose(text, 5) and not (len(text.split()) >= 5 and letter_ratio(text) > 0.8):
        return ""
    return text + ("\n" + attribution if attribution else "")


def fortunes_docs(pkg: Package) -> list[str]:
    """fortune(6) cookie files (strfile format, '%' separators); ASCII art files skipped."""
    base = pkg.root / "usr/share/games/fortunes"
    docs = []
    for path in sorted(base.iterdir()):
        if path.suffix in (".dat", ".u8") or path.is_symlink() or "art" in path.name:
            continue
        cookies = re.split(r"^%\s*$", path.read_text(encoding="utf-8", errors="replace"), flags=re.M)
        docs += group((t for t in map(fortune_text, cookies) if t), limit=3000)
    return docs


# --------------------------------------------------------------------------
# Documentation packages
# --------------------------------------------------------------------------


def python_docs(pkg: Package) -> list[str]:
    """Python 3.11 documentation (Sphinx HTML), one doc per page."""
    base = pkg.root / "usr/share/doc/python3.11/html"
    skip = {"genindex", "py-modindex", "search", "contents", "bugs", "copyright", "license", "about"}

    def wanted(f: Path) -> bool:
        if f.parent.name == "whatsnew":                    # only the recent "what's new" pages
            return f.stem in ("3.8", "3.9", "3.10", "3.11")
        return not {"_static", "_sources"} & set(f.parts) and f.stem not in skip \
            and not f.stem.startswith("genindex")
    return html_docs(f for f in base.rglob("*.html") if wanted(f))


def sphinx_tree_docs(base: Path, skip_dirs: set[str]) -> list[str]:
    """Documents from a Sphinx HTML tree, without index/search pages and the given sub-folders."""
    skip = {"genindex", "py-modindex", "search", "searchindex", "index", "contents"}
    files = [f for f in base.rglob("*.html")
             if f.stem not in skip and not (set(f.relative_to(base).parts[:-1]) & skip_dirs)]
    return html_docs(files)


def linux_docs(pkg: Package) -> list[str]:
    """Linux kernel documentation (Sphinx HTML): admin guide, process, driver and subsystem docs."""
    base = next((pkg.root / "usr/share/doc").glob("linux-doc-*")) / "html"
    return sphinx_tree_docs(base, {"_static", "_sources", "_images", "translations"})


def django_docs(pkg: Package) -> list[str]:
    """Django 3.2 documentation (Sphinx HTML); release notes skipped."""
    base = pkg.root / "usr/share/doc/python-django-doc/html"
    return sphinx_tree_docs(base, {"_static", "_sources", "_images", "releases"})


def html_package_docs(pkg: Package) -> list[str]:
    """Every English HTML page of a documentation package (git-doc, debian-policy, sqlalchemy docs)."""
    skip = {"genindex", "py-modindex", "search", "searchindex", "contents", "changelog"}
    files = [f for f in pkg.root.rglob("*.html") if f.is_file() and f.stem not in skip
             and not {"_static", "_sources", "_images", "changelog"} & set(f.parts)
             and not re.search(r"\.(?!en\.)[a-z]{2}(_[A-Z]{2})?\.html$", f.name)]
    return html_docs(files)


def postgresql_docs(pkg: Package) -> list[str]:
    """PostgreSQL 15 manual (DocBook HTML); release notes and reference index pages skipped."""
    base = next((pkg.root / "usr/share/doc").glob("postgresql-doc-*")) / "html"
    files = [f for f in base.glob("*.html") if not f.name.startswith(("release-", "bookindex", "index"))]
    return html_docs(files)


def debian_manuals_docs(pkg: Package) -> list[str]:
    """Debian manuals shipped as English HTML (debian-reference, developers-reference, maint-guide)."""
    files = [f for f in pkg.root.rglob("*.html")
             if (".en." in f.name or pkg.name == "developers-reference")
             and "_static" not in f.parts and f.stem not in ("genindex", "search", "index")]
    return html_docs(files)


_POD_CODES = re.compile(r"[A-Z]<<+\s+(.*?)\s+>>+|[A-Z]<([^<>]*)>")


def pod_inline(text: str) -> str:
    """Resolve POD formatting codes (C<..>, L<..|..>, E<gt> ...) to plain text."""
    entities = {"gt": ">", "lt": "<", "verbar": "|", "sol": "/", "quot": '"', "amp": "&"}
    for _ in range(4):
        def repl(m: re.Match) -> str:
            inner = m.group(1) if m.group(1) is not None else m.group(2)
            code = m.group(0)[0]
            if code == "E":
                return entities.get(inner, html.unescape(f"&{inner};"))
            if code == "L":
                inner = inner.split("|", 1)[0] if "|" in inner else inner.split("/")[-1].strip('"')
            if code in "XZ":
                return ""
            return inner
        new = _POD_CODES.sub(repl, text)
        if new == text:
            break
        text = new
    return text


def pod_doc(path: Path) -> str:
    """One Perl .pod file as prose: drops verbatim (indented) blocks, commands and item lists of code."""
    title, pars = "", []
    in_begin = False
    for block in blocks(path.read_text(encoding="utf-8", errors="replace")):
        if block.startswith("=begin") or block.startswith("=for"):
            in_begin = block.startswith("=begin")
            continue
        if block.startswith("=end"):
            in_begin = False
            continue
        if in_begin or block[:1].isspace():
            continue
        if block.startswith("="):
            if block.startswith("=head1 NAME"):
                title = "NAME"
            continue
        text = collapse(pod_inline(block))
        if title == "NAME":
            title = text
            continue
        if is_prose(text):
            pars.append(text)
    if sum(len(p) for p in pars) < 300:
        return ""
    return normalise_doc(([title] if title else []) + pars)


def perl_docs(pkg: Package) -> list[str]:
    """Perl core documentation (perlfaq, perltut, perlop ...); perldelta history files skipped."""
    files = sorted(f for f in pkg.root.rglob("*.pod")
                   if not re.match(r"perl5\d+delta|perl\d+delta|perlhist|perlartistic|perlgpl", f.stem))
    return [d for d in (pod_doc(f) for f in files) if d]


# --------------------------------------------------------------------------
# Held-out and stream sources
# --------------------------------------------------------------------------


def handbook_docs(pkg: Package) -> list[str]:
    """The Debian Administrator's Handbook, English HTML only (held-out split)."""
    base = pkg.root / "usr/share/doc/debian-handbook/html/en-US"
    files = [f for f in base.glob("*.html") if f.stem not in ("index", "ix01")]
    return html_docs(files)


class RReader:
    """Minimal reader for R's XDR serialization (enough for character vectors and named lists)."""

    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()
        if version == 3:
            n = self.int()
            self.pos += n  # skip the native encoding name

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def item(self) -> object:
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (254, 253, 252, 251, 250, 242, 241):          # NULL, environments, markers
            return None
        if kind == 255:                                          # reference
            return self.refs[(flags >> 8 or self.int()) - 1]
        if kind == 1:                                            # symbol
            self.refs.append(self.item())
            return self.refs[-1]
        if kind in (2, 6, 239, 240):                             # pairlist -> dict
            attr = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            car, cdr = self.item(), self.item()
            out = {tag: car}
            out.update(cdr if isinstance(cdr, dict) else {})
            return out
        if kind == 9:                                            # CHARSXP
            n = self.int()
            if n < 0:
                return None
            self.pos += n
            return self.data[self.pos - n:self.pos].decode("utf-8", errors="replace")
        if kind in (10, 13, 14, 16, 19, 20):                     # vectors
            n = self.int()
            if kind in (10, 13):
                vec = list(struct.unpack_from(f">{n}i", self.data, self.pos))
                self.pos += 4 * n
            elif kind == 14:
                vec = list(struct.unpack_from(f">{n}d", self.data, self.pos))
                self.pos += 8 * n
            else:
                vec = [self.item() for _ in range(n)]
            attr = self.item() if has_attr else None
            if isinstance(attr, dict) and "names" in attr:
                return dict(zip(attr["names"], vec))
            return vec
        raise ValueError(f"unsupported R type {kind}")


def r_lazyload(rdx: Path) -> dict[str, object]:
    """Load every object of an R lazy-load database (name.rdx + name.rdb)."""
    index = RReader(gzip.decompress(rdx.read_bytes())).item()
    rdb = rdx.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (off, size) in index["variables"].items():
        blob = rdb[int(off):int(off) + int(size)]
        out[name] = RReader(zlib.decompress(blob[4:])).item()  # 4-byte length + zlib stream
    return out


def novel_text(lines: list[str]) -> str:
    """Re-flow a Project Gutenberg style novel: paragraphs on one line, headings kept, _italics_ removed."""
    pars = []
    for block in blocks("\n".join(x or "" for x in lines)):
        text = collapse(re.sub(r"_([^_]+)_", r"\1", block))
        text = text.replace("_", "")
        if text:
            pars.append(text)
    return "\n\n".join(pars)


AUSTEN_ORDER = ["sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey",
                "persuasion"]  # publication order


def austen_stream(pkg: Package) -> str:
    """Jane Austen's six completed novels, one continuous text in publication order."""
    data = r_lazyload(next(pkg.root.rglob("janeaustenr/data/Rdata.rdx")))
    return "\n\n".join(novel_text(data[name]) for name in AUSTEN_ORDER)


# --------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------

TRAIN_SOURCES: dict[str, Callable[[Package], list[str]]] = {
    "dict-gcide": gcide_docs,
    "dict-foldoc": foldoc_docs,
    "dict-jargon": jargon_docs,
    "dict-devil": devil_docs,
    "fortunes": fortunes_docs,
    "python3.11-doc": python_docs,
    "postgresql-doc-15": postgresql_docs,
    "perl-doc": perl_docs,
    "linux-doc-6.1": linux_docs,
    "python-django-doc": django_docs,
    "git-doc": html_package_docs,
    "python-sqlalchemy-doc": html_package_docs,
    "debian-policy": html_package_docs,
    "debian-reference-en": debian_manuals_docs,
    "developers-reference": debian_manuals_docs,
    "maint-guide": debian_manuals_docs,
}
HELDOUT_SOURCES: dict[str, Callable[[Package], list[str]]] = {"debian-handbook": handbook_docs}
STREAM_SOURCES: dict[str, Callable[[Package], str]] = {"r-cran-janeaustenr": austen_stream}


def par_key(par: str) -> str:
    """Hash key of a paragraph for exact de-duplication (case and spacing insensitive)."""
    return hashlib.blake2b(collapse(par).lower().encode(), digest_size=12).hexdigest()


def dedupe_docs(docs: list[str], seen: set[str]) -> list[str]:
    """Drop paragraphs already seen (updating `seen`); drop documents left empty."""
    out = []
    for doc in docs:
        pars = []
        for par in doc.split("\n\n"):
            key = par_key(par)
            if key not in seen:
                seen.add(key)
                pars.append(par)
        if pars and sum(len(p) for p in pars) >= 40:
            out.append("\n\n".join(pars))
    return out


def take_chars(docs: list[str], limit: int) -> list[str]:
    """The first documents (in order) up to `limit` characters; the last one cut at a paragraph break."""
    kept, total = [], 0
    for doc in docs:
        if total + len(doc) > limit:
            doc = doc[:limit - total].rsplit("\n\n", 1)[0]
            if len(doc) > 200:
                kept.append(doc)
            break
        kept.append(doc)
        total += len(doc)
    return kept


def join_docs(docs: list[str]) -> str:
    """Serialise documents with the <|doc|> separator line."""
    return "".join(doc.strip() + f"\n{DOC_SEP}\n" for doc in docs)


def ngrams(text: str, n: int = 13) -> Iterator[int]:
    """Hashes of word n-grams (lower-cased words) for overlap checks."""
    words = re.findall(r"[a-z0-9']+", text.lower())
    for i in range(len(words) - n + 1):
        yield hash(" ".join(words[i:i + n]))


def overlaps(probes: dict[str, str], reference: str, n: int = 13) -> dict[str, float]:
    """For each probe text, the fraction of its word n-grams that also occur in `reference` (one pass)."""
    grams = {name: set(ngrams(text, n)) for name, text in probes.items()}
    union = set().union(*grams.values())
    hits = {g for g in ngrams(reference, n) if g in union}
    return {name: len(g & hits) / max(1, len(g)) for name, g in grams.items()}


def write_xz(path: Path, text: str) -> int:
    """Write UTF-8 text xz-compressed; return compressed size."""
    path.write_bytes(lzma.compress(text.encode("utf-8"), preset=XZ_PRESET))
    return path.stat().st_size


def sources_md(split_pkgs: dict[str, list[Package]], sizes: dict[str, tuple[int, int]],
               checks: list[str]) -> str:
    """Render SOURCES.md."""
    lines = ["# Text data sources", "",
             "Built by `scripts/prepare_text_data.py` from Debian packages (`apt-get download`).",
             "Licence = the `License:` names in the package's /usr/share/doc/<pkg>/copyright.", ""]
    for split, pkgs in split_pkgs.items():
        chars, comp = sizes[split]
        size = f"{chars:,} characters" + (f", {comp:,} bytes compressed" if comp else "")
        lines += [f"## {split} ({size})", "",
                  "| package | version | .deb bytes | characters used | licence |",
                  "|---|---|---|---|---|"]
        for p in pkgs:
            lines.append(f"| {p.name} | {p.version} | {p.deb_size:,} | {p.chars.get(split, 0):,} | "
                         f"{p.licence.replace('|', '/')} |")
        lines.append("")
    lines += ["## Checks", ""] + [f"- {c}" for c in checks] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(".data"), help="output folder (default .data)")
    ap.add_argument("--cache", type=Path, default=Path(".cache/debian-debs"),
                    help="where downloaded .deb files are kept (default .cache/debian-debs)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    split_pkgs: dict[str, list[Package]] = {"train": [], "heldout": [], "stream": []}
    sizes: dict[str, tuple[int, int]] = {}

    with tempfile.TemporaryDirectory(prefix="prepare_text_data_") as tmp:
        work = Path(tmp)

        # train: every source, paragraphs de-duplicated, documents shuffled with a fixed seed
        seen: set[str] = set()
        train_docs: list[str] = []
        for name, extract in TRAIN_SOURCES.items():
            pkg = open_package(name, args.cache, work)
            docs = dedupe_docs(extract(pkg), seen)
            pkg.chars["train"] = sum(len(d) for d in docs)
            split_pkgs["train"].append(pkg)
            train_docs += docs
            print(f"train   {name:22s} {len(docs):6d} docs {pkg.chars['train']:>11,} chars", flush=True)
            shutil.rmtree(pkg.root)
        random.Random(SEED).shuffle(train_docs)
        train = join_docs(train_docs)

        # heldout: another package; paragraphs that also occur in train are removed
        held_docs: list[str] = []
        for name, extract in HELDOUT_SOURCES.items():
            pkg = open_package(name, args.cache, work)
            docs = dedupe_docs(extract(pkg), seen)
            kept = take_chars(docs, HELDOUT_CHARS)
            total = sum(len(d) for d in kept)
            pkg.chars["heldout"] = total
            split_pkgs["heldout"].append(pkg)
            held_docs += kept
            print(f"heldout {name:22s} {len(kept):6d} docs {total:>11,} chars", flush=True)
            shutil.rmtree(pkg.root)
        heldout = join_docs(held_docs)

        # stream: one long continuous text
        parts = []
        for name, extract in STREAM_SOURCES.items():
            pkg = open_package(name, args.cache, work)
            text = extract(pkg)
            pkg.chars["stream"] = len(text)
            split_pkgs["stream"].append(pkg)
            parts.append(text)
            print(f"stream  {name:22s} {len(text):>11,} chars", flush=True)
            shutil.rmtree(pkg.root)
        stream = "\n\n".join(parts) + "\n"
        if len(stream) < STREAM_MIN_CHARS:
            raise RuntimeError(f"stream text too short: {len(stream)} chars")

    print("checking n-gram overlap and compressing ...", flush=True)
    vs_train = overlaps({"heldout": heldout, "stream": stream}, train)
    vs_held = overlaps({"stream": stream}, heldout)
    checks = [f"13-gram overlap heldout->train: {vs_train['heldout']:.4%} of heldout 13-grams",
              f"13-gram overlap stream->train: {vs_train['stream']:.4%} of stream 13-grams",
              f"13-gram overlap stream->heldout: {vs_held['stream']:.4%} of stream 13-grams",
              f"train documents: {len(train_docs):,}; heldout documents: {len(held_docs):,}",
              f"train shuffle seed: {SEED}"]
    sizes["train"] = (len(train), write_xz(args.out / "train.txt.xz", train))
    (args.out / "heldout.txt").write_text(heldout, encoding="utf-8")
    sizes["heldout"] = (len(heldout), 0)
    sizes["stream"] = (len(stream), write_xz(args.out / "stream.txt.xz", stream))
    (args.out / "SOURCES.md").write_text(sources_md(split_pkgs, sizes, checks), encoding="utf-8")
    for line in checks:
        print(line)
    for split, (chars, comp) in sizes.items():
        print(f"{split:8s} {chars:>12,} chars {comp:>12,} bytes xz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
