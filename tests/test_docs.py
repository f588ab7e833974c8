"""The README and docs/ as a new user meets them: the README's first screen (up to its table of contents) fits in 60
lines, every relative link leads to a file and heading that exist, and the README's Python API example runs from a
folder outside the repository."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import FIXTURE, ROOT, read_jsonl

README = ROOT / "README.md"
FIRST_SCREEN_LINES = 60
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """Markdown without its fenced code blocks, where brackets and # lines are code, not links or headings."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def anchors(text: str) -> set[str]:
    """The anchors GitHub gives a file's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", prose(text), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def broken_links(path) -> list[str]:
    """`target` of every relative link in a markdown file whose file, or heading after #, does not exist."""
    broken = []
    for target in LINK.findall(prose(path.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists() or anchor and anchor not in anchors(linked.read_text(encoding="utf-8")):
            broken.append(target)
    return broken


def test_the_first_screen_ends_with_the_table_of_contents_within_60_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert "## Contents" in lines
    assert lines.index("## Contents") <= FIRST_SCREEN_LINES
    quick_start = lines[lines.index("## Quick start"):lines.index("## Contents")]
    for command in ("pip install -r requirements.txt", "bash generate.sh configs/tiny.yaml", "--question",
                    "python -m lynx.fetch", "python -m pytest -q"):
        assert any(command in line for line in quick_start), command


def test_every_relative_link_of_the_readme_and_docs_leads_somewhere():
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    assert {p: broken_links(p) for p in pages} == {p: [] for p in pages}


def test_a_link_to_a_missing_file_or_heading_is_found(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Other\n\n## Keys added to the original's\n")
    page.write_text("# Page\n\n[ok](other.md#keys-added-to-the-originals) [ok](#page) [web](https://example.org)\n"
                    "[gone](gone.md) [no heading](other.md#keys) [here](#nowhere)\n\n```\n[code](not-a-link.md)\n```\n")
    assert broken_links(page) == ["gone.md", "other.md#keys", "#nowhere"]


def test_the_readme_python_example_runs_from_another_folder(tmp_path):
    """The README's example, with the repository's folder filled in, from a folder outside it and without
    PYTHONPATH: it prints the answer the original gave that question about that image."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert '"/path/to/lynx"' in example
    example = example.replace('"/path/to/lynx"', repr(str(ROOT)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [original] = [r["text_output"] for r in read_jsonl(FIXTURE / "expected" / "images_greedy.jsonl")
                  if r["index"] == 17]  # images/img_a.jpg, "What is in the image?"
    assert proc.stdout.strip() == repr([original])
