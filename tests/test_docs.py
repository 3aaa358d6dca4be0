"""The documentation stays true to the repository: the README is a short user's guide (at most 250
lines), every relative link and anchor in README.md, docs/, tests/README.md and benchmarks/RESULTS.md
resolves, every repository path and `megaglot.*` name they cite exists, every document the code
cites is in the repository, and tests/README.md lists every test file.

Pure text and imports, no processes: a second or two (most of it importing torch for the names).
"""

import glob
import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "tests/README.md", "benchmarks/RESULTS.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
README_MAX_LINES = 250

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A repository path: starts at a top-level directory of the repo, not inside another path.
REPO_PATH = re.compile(r"(?<![\w/.$-])((?:megaglot|csrc|tools|examples|benchmarks|tests|docs)/[\w./*-]*)")


def repo_paths(text: str) -> set:
    """Repository paths cited in text: a file (with an extension), a folder (trailing /) or a glob; not
    prose such as "docs/s" or "megaglot/hf"."""
    found = {m.rstrip(".") for m in REPO_PATH.findall(text)}
    return {p for p in found if p.endswith("/") or "*" in p or "." in p.rsplit("/", 1)[-1]}
CODE_SPAN = re.compile(r"`([^`\n]+)`")
DOTTED = re.compile(r"(?<![\w.])(megaglot(?:\.\w+)+)")
# A document named in code: a bare or relative *.md file name (outputs written under $OUT excluded).
CITED_DOC = re.compile(r"(?<![\w/.$-])((?:[\w-]+/)*[\w-]+\.md)\b")
GENERATED = ("examples/data/cache/",)  # made by the demo at run time, not in a clean checkout
CODE_DIRS = ["megaglot", "tools", "examples", "benchmarks", "tests", "csrc"]
CODE_EXT = (".py", ".cpp", ".h", ".cu", ".cuh")


def read(rel: str) -> str:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(rel: str) -> set:
    return {slug(m.group(2)) for m in re.finditer(r"^(#+)\s+(.*)$", read(rel), re.M)}


def exists(path: str) -> bool:
    full = os.path.join(ROOT, path)
    return bool(glob.glob(full)) if "*" in path else os.path.exists(full)


def test_readme_is_short():
    lines = read("README.md").count("\n")
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines; at most {README_MAX_LINES}: "
                                       "move reference material to docs/")


@pytest.mark.parametrize("doc", DOCS)
def test_links_resolve(doc):
    bad = []
    for target in LINK.findall(read(doc)):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        rel = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        if not os.path.exists(os.path.join(ROOT, rel)):
            bad.append(f"{target} (no file {rel})")
        elif anchor and rel.endswith(".md") and anchor not in anchors(rel):
            bad.append(f"{target} (no heading #{anchor} in {rel})")
    assert not bad, f"{doc}: broken links: " + "; ".join(bad)


@pytest.mark.parametrize("doc", DOCS)
def test_cited_paths_exist(doc):
    missing = sorted(p for p in repo_paths(read(doc)) if not p.startswith(GENERATED) and not exists(p))
    assert not missing, f"{doc} cites paths that are not in the repository: {missing}"


@pytest.mark.parametrize("doc", DOCS)
def test_cited_names_import(doc):
    """`megaglot.x.y` in a code span must be a module or an attribute of one (catches docs left behind
    by a rename)."""
    names = {n for span in CODE_SPAN.findall(read(doc)) for n in DOTTED.findall(span)}
    missing = []
    for name in sorted(names):
        parts = name.split(".")
        if parts[1] == "_C":  # the extension: installed, or JIT-built under another module name
            from megaglot.kernels import load_extension
            obj, cut = load_extension(), 2
        else:
            for cut in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                    break
                except ImportError:
                    continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            missing.append(name)
    assert not missing, f"{doc} names what megaglot does not have: {missing}"


def test_documents_cited_by_the_code_exist():
    """A bare name (`GUIDE.md`) must be some file of the repository; a path, that file."""
    repo_md = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "**", "*.md"), recursive=True)
               if "/.venv/" not in p}
    missing = []
    for top in CODE_DIRS + ["setup.py"]:
        files = [os.path.join(ROOT, top)] if top.endswith(".py") else glob.glob(
            os.path.join(ROOT, top, "**", "*"), recursive=True)
        for path in files:
            if not path.endswith(CODE_EXT) or path == os.path.abspath(__file__):
                continue
            with open(path, encoding="utf-8") as f:
                text = f.read()
            for name in {n.rstrip(".") for n in CITED_DOC.findall(text)} | repo_paths(text):
                found = exists(name) if "/" in name else name in repo_md
                if not found and not name.startswith(GENERATED):
                    missing.append(f"{os.path.relpath(path, ROOT)}: {name}")
    assert not missing, "the code cites files that are not in the repository: " + "; ".join(sorted(missing))


def test_test_catalogue_lists_every_test_file():
    text = read("tests/README.md")
    listed = set(re.findall(r"^\| `(test_\w+\.py)` \|", text, re.M))
    present = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py"))}
    assert not present - listed, f"tests/README.md has no line for {sorted(present - listed)}"
    assert not listed - present, f"tests/README.md lists files that do not exist: {sorted(listed - present)}"


def test_slug_matches_github():
    assert slug("Training step: `benchmarks/bench_train.py`") == "training-step-benchmarksbench_trainpy"
    assert slug("FLOPs and MFU") == "flops-and-mfu"
