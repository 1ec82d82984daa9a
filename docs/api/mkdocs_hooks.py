"""MkDocs hooks (mkdocs.yml ``hooks:``): the same Markdown reads well on GitHub and on the site.

- A Python fence's test options (```` ```python continuation ````, ``fixture:...``, ``notest``:
  pytest-markdown-docs's, see tests/test_docs_examples.py) are dropped before MkDocs renders
  the block: MkDocs' fence syntax takes only a language there, GitHub shows the language only.
- A link from a page to a file of the repository outside docs/ (``../examples/ddp_train.py``)
  works on GitHub but has no page on the site: the target must exist (else the build fails,
  as for a broken link inside docs/), and on the site the link becomes its text, followed by
  the repository path.

This file lies in docs/ but is not part of the site (mkdocs.yml's ``exclude_docs``).
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.exceptions import PluginError

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<lang>python3?|py)[ \t]+[^\n`]*$", re.MULTILINE)
LINK = re.compile(r"(?<!!)\[(?P<text>[^\]\n]+)\]\((?P<target>\.\./[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Drop the test options of Python fences; check and unlink links that leave docs/."""
    markdown = FENCE.sub(lambda m: f"{m['indent']}{m['fence']}{m['lang']}", markdown)
    docs_dir = Path(config["docs_dir"]).resolve()
    repository = docs_dir.parent
    source = Path(page.file.abs_src_path).resolve()

    def outside(match: re.Match) -> str:
        target = (source.parent / match["target"]).resolve()
        if docs_dir in target.parents:
            return match[0]  # inside docs/: MkDocs checks it
        if repository not in target.parents or not target.exists():
            raise PluginError(f"{page.file.src_uri}: the link {match[0]} points to {target}, which does not exist")
        path = posixpath.join(*target.relative_to(repository).parts)
        text = match["text"]
        return text if path in text else f"{text} (`{path}`)"

    return LINK.sub(outside, markdown)
