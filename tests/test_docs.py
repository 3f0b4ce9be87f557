"""The README and docs/ name only what exists (tools/check_docs.py), and the check finds what it
should: a planted page with each kind of problem fails it."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_docs", ROOT / "tools" / "check_docs.py")
check_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_docs)


def test_the_pages_name_only_what_exists():
    problems = check_docs.check()
    assert not problems, "\n".join(problems)


def test_each_kind_of_problem_is_found(tmp_path, monkeypatch):
    page = ROOT / "docs" / "_planted_for_test.md"
    page.write_text(
        "See `atom_fast/no_such_module.py` and [a page](no-such-page.md).\n"
        "Run `atom-fast --dataset mnist --no-such-flag 3`.\n"
        "Call `atom_fast.no_such_function`.\n"
        "As the SPEC says, and FIELD.md too.\n"
        "Fine: `atom_fast/loss.py`, `atom-fast --ipc 10`, `atom_fast.attention_loss`.\n"
        "Headings: [gone](loss.md#no-such-heading), [here](#a-heading), [there](loss.md#the-math).\n"
        "As the performance issue's target says.\n"
        "## A heading\n")
    try:
        problems = check_docs.check([str(page.relative_to(ROOT))])
    finally:
        page.unlink()
    text = "\n".join(problems)
    assert "no such path in the repository: atom_fast/no_such_module.py" in text
    assert "link to a missing file: no-such-page.md" in text
    assert "no command defines the flag --no-such-flag" in text
    assert "no such Python name: atom_fast.no_such_function" in text
    assert "'SPEC'" in text and "'FIELD.md'" in text
    assert "link to a missing heading: loss.md#no-such-heading" in text
    assert "\"issue's\"" in text
    assert len(problems) == 9, text  # the "issue" line matches two patterns
