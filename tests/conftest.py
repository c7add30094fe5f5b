"""Shared fixtures: the corpus beside the checkout (present in development and CI, absent for users)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus" / "vgmidi"


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The VGMIDI corpus folder; tests that need it skip cleanly where it is absent."""
    if not CORPUS.is_dir():
        pytest.skip("../shared/corpus/vgmidi is not present")
    return CORPUS


@pytest.fixture(scope="session", autouse=True)
def native_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The native training loops are built once per test session, into a folder of its own instead of the
    user's cache (subprocesses of the CLI inherit it)."""
    folder = tmp_path_factory.mktemp("xdg-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(folder))
        yield folder


@pytest.fixture(scope="session")
def native_loops(native_cache: Path):
    """The native training loops; tests that need them skip where the machine has no C++ compiler."""
    from chiptune_forge.model import native

    if native.find_compiler() is None:
        pytest.skip("no C++ compiler: the native training loops cannot be built here")
    loops = native.load()
    assert not isinstance(loops, str), loops
    return loops


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A run that collected no tests fails (exit 1) instead of pytest's exit 5: a broken collection or a
    wrong path in CI must never pass as 'nothing to do'."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
