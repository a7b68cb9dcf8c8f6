"""Broken repositories give clear errors naming the index, entry and key or file."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harvester.errors import RepositoryError
from harvester.repo import Repository, load_repository


@pytest.fixture
def repo_copy(tmp_path: Path, tiny_repo: Repository) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(tiny_repo.root, root)
    return root


def _edit(root: Path, fn: Callable[[Any], object]) -> None:
    """Rewrite index.json through ``fn`` (the parsed JSON is untyped: Any)."""
    doc = json.loads((root / "index.json").read_text())
    fn(doc)
    (root / "index.json").write_text(json.dumps(doc))


def test_missing_index(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="not a repository"):
        load_repository(tmp_path)


def test_corrupt_json(repo_copy: Path) -> None:
    (repo_copy / "index.json").write_text('{"format": "harvester-repository", ')
    with pytest.raises(RepositoryError, match="index.json: cannot read the index"):
        load_repository(repo_copy)


def test_missing_key(repo_copy: Path) -> None:
    _edit(repo_copy, lambda d: d["datasets"][3].pop("band"))
    with pytest.raises(RepositoryError, match="dataset 3 has no 'band'"):
        load_repository(repo_copy)


def test_wrong_type(repo_copy: Path) -> None:
    _edit(repo_copy, lambda d: d["datasets"][2].__setitem__("tract", "x"))
    with pytest.raises(RepositoryError, match="dataset 2 key 'tract' has 'x', expected int"):
        load_repository(repo_copy)


def test_missing_file(repo_copy: Path, tiny_repo: Repository) -> None:
    ref = next(iter(tiny_repo))
    (repo_copy / ref.path).unlink()
    with pytest.raises(RepositoryError, match=f"file .*{Path(ref.path).name} is missing"):
        load_repository(repo_copy)
    # Without file checks the index still loads.
    assert len(load_repository(repo_copy, check_files=False)) == len(tiny_repo)


def test_truncated_file(repo_copy: Path, tiny_repo: Repository) -> None:
    ref = next(iter(tiny_repo))
    path = repo_copy / ref.path
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(RepositoryError, match="has 1000 bytes, the index says"):
        load_repository(repo_copy)


def test_path_outside_repository(repo_copy: Path) -> None:
    _edit(repo_copy, lambda d: d["datasets"][0].__setitem__("path", "../../etc/passwd"))
    with pytest.raises(RepositoryError, match="leaves the repository"):
        load_repository(repo_copy)


def test_wrong_format(repo_copy: Path) -> None:
    _edit(repo_copy, lambda d: d.__setitem__("format", "something"))
    with pytest.raises(RepositoryError, match="not a harvester repository index"):
        load_repository(repo_copy)


def test_duplicate_entry(repo_copy: Path) -> None:
    _edit(repo_copy, lambda d: d["datasets"].append(d["datasets"][0]))
    with pytest.raises(RepositoryError, match="duplicate data id"):
        load_repository(repo_copy)
