"""Shared fixtures: the corpus beside the checkout (present in development and CI, absent for users)."""

from __future__ import annotations

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


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A run that collected no tests fails (exit 1) instead of pytest's exit 5: a broken collection or a
    wrong path in CI must never pass as 'nothing to do'."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
