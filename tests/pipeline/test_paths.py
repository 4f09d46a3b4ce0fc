"""Monorepo helpers of the pipeline (issue 16): which commits change a component's `paths`
(git glob pathspecs on a real repository), and the component's folder of an export."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployd.config import ComponentConfig
from deployd.errors import ComponentError
from deployd.pipeline.tree import component_root
from deployd.toolchains import git as gitops
from tests.conftest import Work, git


@pytest.fixture
def repo(tmp_path: Path) -> Work:
    path = tmp_path / "mono"
    path.mkdir()
    git("init", "-q", "-b", "main", cwd=path)
    work = Work(path)
    work.commit("one", {"a/x.py": "1", "a/deep/y.py": "1", "b/z.py": "1", "README.md": "r"})
    return work


def test_changes_under_follows_git_glob_pathspecs(repo: Work) -> None:
    base = git("rev-parse", "HEAD", cwd=repo.path)
    deep = repo.commit("deep", {"a/deep/y.py": "2"})
    readme = repo.commit("readme", {"README.md": "s"})
    assert gitops.changes_under(repo.path, base, deep, ("a/**",)) is True
    assert gitops.changes_under(repo.path, base, deep, ("a/*.py",)) is False  # one level only
    assert gitops.changes_under(repo.path, base, deep, ("a/**/*.py",)) is True
    assert gitops.changes_under(repo.path, base, deep, ("b/**",)) is False
    assert gitops.changes_under(repo.path, deep, readme, ("a/**", "b/**")) is False
    assert gitops.changes_under(repo.path, deep, readme, ("README.md",)) is True
    # A glob is never a shell word: it reaches git as one argument.
    assert gitops.changes_under(repo.path, base, readme, ("$(touch pwned)/**",)) is False
    assert not (repo.path / "pwned").exists()
    # Cannot tell (a commit that is not there): None, which the pipeline builds.
    assert gitops.changes_under(repo.path, "0" * 40, readme, ("a/**",)) is None


def test_the_component_folder_of_an_export_must_be_a_folder(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "components" / "billing").mkdir(parents=True)
    (tree / "components" / "billing" / "component.json").write_text("{}")
    (tree / "file").write_text("x")
    dest = tmp_path / "src"
    component_root(tree, ComponentConfig(name="billing", path="components/billing"), "a" * 40, dest)
    assert (dest / "component.json").exists()
    for bad in ("components/crm", "file"):
        with pytest.raises(ComponentError, match=f"path '{bad}' of component x is not a folder"):
            component_root(tree, ComponentConfig(name="x", path=bad), "a" * 40, tmp_path / "d")
