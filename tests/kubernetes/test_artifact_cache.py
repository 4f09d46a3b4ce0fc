"""The artifact cache: pods of one version asking at once each get the same whole archive."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from deployd.runtime.kubernetes.artifacts import ensure_archive

pytestmark = pytest.mark.timeout(60)


def test_concurrent_builds_of_one_archive_all_succeed_with_one_sha(tmp_path: Path) -> None:
    folder = tmp_path / "v1"
    (folder / "lib").mkdir(parents=True)
    for i in range(10):
        (folder / "lib" / f"m{i}.py").write_text("x = 1\n" * 200)
    results: list[tuple[Path, str]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def build() -> None:
        start.wait()
        try:
            results.append(ensure_archive(tmp_path / "cache", "hello", 1, folder))
        except BaseException as exc:  # collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(results) == 8 and len({sha for _p, sha in results}) == 1
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []
