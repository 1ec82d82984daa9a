"""Every Python block of README.md and docs/*.md runs as a test, so that no example can rot.

``python -m pytest`` collects each ```` ```python ```` block of README.md and docs/*.md
(``testpaths`` in pyproject.toml) with pytest-markdown-docs and runs it as written:

- in a fresh namespace that holds only the reader's own objects, made small (see
  :func:`reader_objects`): ``train_set`` (256 items of 20 features, 10 classes), ``model``
  (an MLP over them), ``optimizer`` (SGD on it) and ``epochs`` (2). Everything else a
  block uses, it imports or defines itself, as a reader copying it would have to;
- in a temporary working directory (files a block writes land there), with torch's
  global seed fixed.

Options go after the language in the fence's info string (pytest-markdown-docs's syntax;
GitHub shows the language only, and mkdocs.yml's hook strips the options before MkDocs
renders the block):

- ``continuation``: the block continues the one before it, whose names it uses.
- ``fixture:world_of_one``: the block starts a ``torch.distributed`` process group; it runs
  as ``torchrun --nproc_per_node 1`` would start it (RANK=0, WORLD_SIZE=1, a free
  MASTER_PORT), and the group is destroyed afterwards.
- ``fixture:needs_cuda``: skipped, with that reason, where no CUDA GPU is visible.
- ``fixture:needs_torchrun``: needs several processes (e.g. scorer ranks beside trainer
  ranks): skipped with that reason; the gloo tests run the same code in processes.
- ``fixture:long_run``: minutes of work: skipped with that reason.
- ``notest``: not a program (a fragment of the block before it): not collected.

This module is also the pytest plugin that does it; tests/conftest.py registers
:class:`MarkdownExamples` so that its fixtures reach README.md, which lies outside tests/.
"""

from __future__ import annotations

import pathlib
import socket
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # not docs/results: generated reports
OPTIONS = ("continuation", "notest", "fixture:world_of_one", "fixture:needs_cuda", "fixture:needs_torchrun",
           "fixture:long_run")

try:
    from pytest_markdown_docs.plugin import MarkdownInlinePythonItem, MarkdownTextFile
except ImportError:  # the plugin is in the [test] extra; without it the blocks are skipped, not lost
    MarkdownInlinePythonItem = MarkdownTextFile = None


# Blocks that do not run yet, in files other helpers are editing: expected to fail, strictly
# (a block that starts to pass fails the suite until its entry goes). (file, the block's first
# line, or its start) -> what it needs.
KNOWN_FAILURES: Dict[Tuple[str, str], str] = {}


def reader_objects() -> Dict[str, Any]:
    """The objects the docs take as given ("Given `train_set`, `model` and `epochs`"),
    small enough that every example runs in about a second."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(256, 20, generator=generator)
    labels = torch.randint(0, 10, (256,), generator=generator)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    return {
        "train_set": torch.utils.data.TensorDataset(features, labels),
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.05),
        "epochs": 2,
    }


def _known_failure(item: pytest.Item) -> Optional[Tuple[str, str]]:
    """The KNOWN_FAILURES key of a block's item, or None."""
    path = pathlib.Path(item.path)
    first = path.read_text(encoding="utf8").splitlines()[item.start_line].strip()
    name = path.relative_to(ROOT).as_posix()
    return next((key for key in KNOWN_FAILURES if key[0] == name and first.startswith(key[1])), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _PluginMissing(pytest.File):
    def collect(self):
        pytest.skip("pytest-markdown-docs is not installed (pip install 'isample[test]'): its Python blocks did not run")


class MarkdownExamples:
    """The pytest plugin: collects the blocks of README.md and docs/*.md, gives them the
    reader's objects and a sandbox, and skips those that need what this machine lacks."""

    def pytest_collect_file(self, file_path: pathlib.Path, parent: pytest.Collector):
        """README.md and docs/*.md: one test per Python block (pytest-markdown-docs's collector)."""
        if pathlib.Path(file_path).resolve() not in EXAMPLES:
            return None
        if MarkdownTextFile is None:
            return _PluginMissing.from_parent(parent, path=file_path)
        if parent.config.option.markdowndocs:
            return None  # `pytest --markdown-docs` was asked for: the plugin collects them itself
        return MarkdownTextFile.from_parent(parent, path=file_path)

    @pytest.hookimpl(optionalhook=True)
    def pytest_markdown_docs_globals(self) -> Dict[str, Any]:
        """Called for every block: fresh objects, so that no block sees another's training."""
        return reader_objects()

    def pytest_collection_modifyitems(self, items: List[pytest.Item]) -> None:
        """Every block runs in the sandbox."""
        if MarkdownInlinePythonItem is None:
            return
        for item in items:
            if isinstance(item, MarkdownInlinePythonItem):
                item.add_marker(pytest.mark.usefixtures("markdown_sandbox"))
                reason = KNOWN_FAILURES.get(_known_failure(item))
                if reason:
                    item.add_marker(pytest.mark.xfail(reason=reason, strict=True))

    @pytest.fixture
    def markdown_sandbox(self, tmp_path, monkeypatch):
        """A temporary working directory, torch's global seed fixed, torch's threads restored."""
        monkeypatch.chdir(tmp_path)
        threads = torch.get_num_threads()
        torch.manual_seed(0)
        yield tmp_path
        torch.set_num_threads(threads)

    @pytest.fixture
    def world_of_one(self, monkeypatch):
        """The environment ``torchrun --nproc_per_node 1`` gives its process; the process
        group the block starts is destroyed afterwards."""
        import torch.distributed as dist

        environment = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        yield
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    @pytest.fixture
    def needs_cuda(self):
        """Skips a block on a machine without a CUDA GPU."""
        import isample

        if not isample.cuda_available():
            pytest.skip("needs a CUDA GPU (isample.cuda_available() is False here)")

    @pytest.fixture
    def needs_torchrun(self):
        """Skips a block that needs several processes."""
        pytest.skip("needs several processes under torchrun; the gloo tests run the same calls in processes")

    @pytest.fixture
    def long_run(self):
        """Skips a block that trains for minutes."""
        pytest.skip("a long run (minutes): not part of the test suite")


# -- the collection itself ---------------------------------------------------------------


def _python_fences(path: pathlib.Path) -> List[List[str]]:
    """The info strings of the Python fences of a Markdown file, split into words."""
    markdown_it = pytest.importorskip("markdown_it", reason="pytest-markdown-docs (and markdown-it-py) not installed")
    tokens = markdown_it.MarkdownIt("commonmark").parse(path.read_text(encoding="utf8"))
    fences = [token.info.split() for token in tokens if token.type == "fence"]
    return [info for info in fences if info and info[0] in ("py", "python", "python3")]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_fences_use_only_the_documented_options(path):
    """A misspelt option (``notests``, ``fixture:needs_gpu``) would be ignored or fail
    obscurely: each Python fence uses only the options this module documents."""
    for info in _python_fences(path):
        unknown = [option for option in info[1:] if option not in OPTIONS]
        assert not unknown, f"{path.name}: fence ```{' '.join(info)}: unknown option(s) {unknown}; known: {OPTIONS}"


def test_the_python_blocks_are_collected(pytestconfig, request):
    """Every Python fence of README.md and docs/*.md that is not ``notest`` is a test item
    when the whole suite runs (the collection is not silently empty)."""
    assert {"README.md", "docs"} <= set(pytestconfig.getini("testpaths"))
    assert pytestconfig.pluginmanager.get_plugin("isample-markdown-examples") is not None
    if MarkdownTextFile is None:
        pytest.skip("pytest-markdown-docs is not installed")
    expected = sum(1 for path in EXAMPLES for info in _python_fences(path) if "notest" not in info)
    assert expected >= 4  # README's quick start and trees, at least two in docs/
    items = []
    for path in EXAMPLES:
        collector = MarkdownTextFile.from_parent(request.session, path=path)
        items += [item for item in collector.collect() if isinstance(item, MarkdownInlinePythonItem)]
    assert len(items) == expected
    matched = [_known_failure(item) for item in items]
    for key in KNOWN_FAILURES:  # an entry whose block moved or went away goes too
        assert matched.count(key) == 1, f"KNOWN_FAILURES entry {key} matches {matched.count(key)} blocks, not 1"
