"""Check that what the README and docs/ name exists: every repository path and link (and the heading
a link's ``#anchor`` names), every ``bench/results/`` file, every command-line flag of our commands,
every ``atom_fast`` Python name; and that no page refers to documents outside the repository.

    python tools/check_docs.py            # exit 1 and one line per problem, FILE:LINE: what

Read from the Markdown source: inline code spans and link targets. A code span is a path when it
has a ``/`` or a file suffix and no spaces; placeholders (``<...>``, ``*``, ``{...}``, ``NAME``) are
matched as patterns. Flags are checked in code spans that run one of our commands (``atom-fast``,
``python -m atom_fast...``, ``bench/...``, ``tools/...``, ``examples/...``, ``scripts/...``)
against the ``add_argument`` calls of the repository.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
         *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "bench" / "results").rglob("README.md"))]
SUFFIXES = (".py", ".md", ".json", ".sh", ".cpp", ".h", ".cu", ".csv", ".png", ".toml", ".txt",
            ".pt", ".npy", ".npz", ".cfg", ".yml", ".yaml")
# Paths that a run creates, not the repository: checked as patterns only when they are ours.
CREATED = ("runs/", "out/", "STORE/", "/tmp/", "~/", "$", "DIR/", "data/", "cifar-10", "tiny-imagenet",
           "train/", "test/", "checkpoint.pt", "synthetic.pt", "results.json", "manifest.json",
           "images.png", "accuracy.png", "synthetic.png", ".cache/", "res_", "losses", "/proc/",
           "<cache>", "train_data_batch", "val_data", "map_clsloc")
# Flags of other programs that the pages mention on their own (torchrun, pip, pytest, pytest-xdist).
EXTERNAL_FLAGS = {"--shutdown-timeout", "--nproc-per-node", "--nnodes", "--standalone",
                  "--rdzv-backend", "--rdzv-endpoint", "--no-build-isolation", "--no-deps",
                  "--durations", "--dist", "--index-url", "--extra-index-url"}
TOP = {p.name for p in ROOT.iterdir() if not p.name.startswith(".") or p.name == ".ci"}
# Words that point at documents which are not in the repository.
OUTSIDE = [re.compile(p, re.IGNORECASE) for p in (
    r"\bSPEC(\.md)?\b(?! ?[:=])", r"\bFIELD\.md\b", r"\bSTYLE\.md\b", r"\bthe issue\b", r"\bissue \d+\b",
    r"\bthis session\b", r"\bthe session\b", r"\bticket\b", r"\bissue's\b",
    r"\b(the|this|that) [\w-]+ issue\b")]
OUR_COMMANDS = re.compile(r"^(\S+/)?(atom-fast|python3? (-m )?(atom_fast|bench|tools|examples)|"
                          r"bash (bench|scripts|tools)/|(bench|tools|examples|scripts)/)")


def _lines(text):
    """(line number, line, inside a fenced code block) of every line but the fence markers."""
    fenced = False
    for i, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        yield i, line, fenced


def code_spans(text):
    """(line number, content) of every inline code span and fenced code line."""
    out = []
    for i, line, fenced in _lines(text):
        if fenced:
            out.append((i, line.strip()))
            continue
        for m in re.finditer(r"(`+)(.+?)\1", line):
            out.append((i, m.group(2).strip()))
    return out


def links(text):
    """(line number, target) of every Markdown link outside code."""
    out = []
    for i, line, fenced in _lines(text):
        if fenced:
            continue
        line = re.sub(r"`[^`]*`", "", line)
        for m in re.finditer(r"\]\(([^)\s]+)\)", line):
            out.append((i, m.group(1)))
    return out


def anchors(text):
    """The ``#anchor`` of every Markdown heading, as GitHub makes them: lower case, punctuation other
    than ``-`` and ``_`` dropped, spaces as ``-``, a repeated one suffixed ``-1``, ``-2``, ..."""
    out, seen = set(), {}
    for _, line, fenced in _lines(text):
        m = re.match(r"#{1,6} +(.+?) *#* *$", line)
        if fenced or not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def defined_flags():
    """Every ``--flag`` the repository's argparse parsers define (``--no-X`` for boolean pairs)."""
    flags = {"--help"}
    for path in [*ROOT.glob("atom_fast/**/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("tools/**/*.py"),
                 *ROOT.glob("examples/*.py"), *ROOT.glob("kernels/*.py")]:
        text = path.read_text()
        for m in re.finditer(r"add_argument\(\s*((?:\"-[^\"]*\"\s*,\s*)+)", text):
            names = re.findall(r"\"(--[a-z0-9-]+)\"", m.group(1))
            flags.update(names)
            tail = text[m.end():m.end() + 400].split("add_argument(")[0]
            if "BooleanOptionalAction" in tail:
                flags.update("--no-" + n[2:] for n in names)
    for path in ROOT.glob("**/*.sh"):
        if ".venv" in path.parts:
            continue
        flags.update(re.findall(r"(--[a-z0-9][a-z0-9-]*)\)", path.read_text()))  # case patterns
    return flags


def is_path(span):
    """A repository path: starts with a top-level entry of the repository, or is a file name."""
    if any(c in span for c in " ()=|^:,'\"") or span.startswith(("-", "@", ".")):
        return False
    head = span.split("/")[0]
    if "/" in span:
        return head in TOP
    return span.endswith(SUFFIXES)


def path_exists(span, page):
    span = span.rstrip(".,;:")
    if any(span.startswith(c) or c in span for c in CREATED):
        return True
    target = span.split("#")[0]
    if not target:
        return True
    if "/." in target:  # name.json/.csv/.png: the first of the alternatives
        target = target.split("/.")[0]
    pattern = re.sub(r"<[^>]*>|\{[^}]*\}|\*|\bN+\b|YYYY-MM-DD|DATE|NAME|DEVICE", "*", target)
    bases = [ROOT, (ROOT / page).parent]
    for base in bases:
        if "*" in pattern:
            if list(base.glob(pattern.lstrip("/"))):
                return True
        elif (base / target).exists():
            return True
    # a naming scheme (`bench/results/gpu-validation-<gpu>-<date>/`): its folder must exist
    if "<" in target and "/" in target.rstrip("/"):
        return (ROOT / target.rstrip("/").rsplit("/", 1)[0]).is_dir()
    # a bare file name (e.g. `loss_table.py`) may live anywhere in the repository, or be one a
    # command of the repository writes (`h100-summary.json`: "summary.json" in its source)
    if "/" not in target:
        if any(ROOT.glob(f"**/{pattern}")):
            return True
        tail = target.split("-", 1)[-1]
        return any(tail in p.read_text(errors="ignore") for p in
                   [*ROOT.glob("tools/**/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("bench/*.sh")])
    # an installed module path (atom_fast/kernels/... is kernels/...)
    if target.startswith("atom_fast/kernels/"):
        return (ROOT / "kernels" / target[len("atom_fast/kernels/"):]).exists()
    return False


def python_name_exists(name):
    """``atom_fast.a.b`` importable as a module, or an attribute chain from the longest module."""
    name = name.rstrip(".,;:()")
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def check(pages=PAGES):
    problems = []
    flags = defined_flags()
    for page in pages:
        text = (ROOT / page).read_text()
        for i, line in enumerate(text.splitlines(), 1):
            for pat in OUTSIDE:
                m = pat.search(line)
                if m:
                    problems.append(f"{page}:{i}: refers to a document outside the repository "
                                    f"({m.group(0)!r})")
        for i, target in links(text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            file = (ROOT / page).parent / path if path else ROOT / page
            if path and not file.exists():
                problems.append(f"{page}:{i}: link to a missing file: {target}")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
                problems.append(f"{page}:{i}: link to a missing heading: {target}")
        for i, span in code_spans(text):
            words = span.split()
            if is_path(span) and not path_exists(span, page):
                problems.append(f"{page}:{i}: no such path in the repository: {span}")
            for m in re.finditer(r"\batom_fast(\.[A-Za-z_][A-Za-z0-9_]*)+", span):
                if "/" in span[max(0, m.start() - 1):m.start()]:
                    continue
                if not python_name_exists(m.group(0)):
                    problems.append(f"{page}:{i}: no such Python name: {m.group(0)}")
            # a span of several commands (a && b, a | b): only our commands' flags are ours
            ours = [part for part in re.split(r"&&|\|\||[|;]", span) if OUR_COMMANDS.match(part.strip())]
            if words and ours:
                for flag in re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", " ".join(ours)):
                    if flag not in flags:
                        problems.append(f"{page}:{i}: no command defines the flag {flag}: {span}")
            elif re.fullmatch(r"--[a-z0-9][a-z0-9-]*( \S+)?", span):
                flag = span.split()[0]
                if flag not in flags | EXTERNAL_FLAGS:
                    problems.append(f"{page}:{i}: no command defines the flag {flag}")
    return problems


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pages", nargs="*", help="pages to check (default: README.md, docs/*.md, "
                                            "bench/results/**/README.md)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    problems = check(args.pages or PAGES)
    for line in problems:
        print(line)
    print(f"check_docs: {len(problems)} problem(s) in {len(args.pages or PAGES)} page(s)",
          file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

