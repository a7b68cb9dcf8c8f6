"""A local data repository: ``deep_coadd`` files on disk and their index.

The index (``index.json`` at the repository root) plays the part of the Butler
registry for one dataset type: one entry per file with its dataset id (UUID), the
data id (tract, patch, band), the path relative to the root, the byte size and the
patch's sky polygon. :func:`load_repository` reads it back and checks every entry
and every file, so that a broken repository fails at open time with the entry and
the key or path named, not halfway through a harvest.

Optional sections, for time-domain data (``harvester synth --epochs``):
``templates`` (``template_coadd`` files, entries as ``datasets``), ``visits``
(:class:`~harvester.epochs.VisitRecord`) and ``epochs`` (``visit_image`` and
``difference_image`` files, :class:`~harvester.epochs.EpochRef`). An index without
them (any older repository) loads with them empty.

Dependency rule: depends on :mod:`harvester.skymap` and the records of
:mod:`harvester.epochs` only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .epochs._refs import (
    EpochRef,
    VisitRecord,
    check_epoch_files,
    check_file_entry,
    epoch_json,
    parse_epochs,
    parse_visits,
    visit_json,
)
from .errors import RepositoryError
from .skymap import SkyMap, SkyMapConfig

__all__ = [
    "INDEX_NAME",
    "DatasetRef",
    "Repository",
    "drop_time_domain",
    "load_repository",
    "write_index",
]

INDEX_NAME = "index.json"
INDEX_FORMAT = "harvester-repository"
INDEX_VERSION = 1


@dataclass(frozen=True)
class DatasetRef:
    """One file of the repository (a Butler dataset, as far as harvester cares)."""

    id: str
    dataset_type: str
    tract: int
    patch: int
    band: str
    path: str
    size: int
    compressed: bool
    polygon: tuple[tuple[float, float], ...]

    @property
    def key(self) -> tuple[int, int, str]:
        return (self.tract, self.patch, self.band)


@dataclass(frozen=True)
class Repository:
    """A loaded repository: root folder, sky map and datasets by (tract, patch, band)."""

    root: Path
    skymap: SkyMap
    datasets: dict[tuple[int, int, str], DatasetRef]
    seed: int | None = None
    #: ``template_coadd`` files by (tract, patch, band).
    templates: dict[tuple[int, int, str], DatasetRef] = field(default_factory=dict)
    #: Single-epoch images (``visit_image``, ``difference_image``), in index order.
    epochs: tuple[EpochRef, ...] = ()
    #: The visits those images come from.
    visits: tuple[VisitRecord, ...] = ()
    #: Whether ``epochs`` are what a remote source's catalogue found for one run's
    #: targets (possibly none), rather than the repository's own index.
    catalogue: bool = False

    def __len__(self) -> int:
        return len(self.datasets)

    def __iter__(self) -> Iterator[DatasetRef]:
        return iter(self.datasets.values())

    def get(self, tract: int, patch: int, band: str) -> DatasetRef | None:
        return self.datasets.get((tract, patch, band))

    def path_of(self, ref: DatasetRef) -> Path:
        return self.root / ref.path

    def ensure(self, keys: Collection[tuple[int, int, str]]) -> None:
        """Make sure :meth:`get` knows every image of these (tract, patch, band) keys.

        An index knows them all already; a Butler repository asks the Butler for
        the ones it has not asked for (blocking). Images that do not exist stay
        unknown: their targets are recorded ``no_coverage``.
        """

    def ensure_all(self) -> None:
        """Make :meth:`get` know every image (a Butler repository asks for all once)."""

    def lookup_lines(self) -> list[str]:
        """How the images were found, for a plan's quote (none for an index)."""
        return []

    @property
    def bands(self) -> list[str]:
        return sorted({ref.band for ref in self})

    @property
    def total_bytes(self) -> int:
        return sum(ref.size for ref in self)


def write_index(
    root: Path,
    skymap: SkyMap,
    refs: Iterable[DatasetRef],
    seed: int | None = None,
    *,
    templates: Iterable[DatasetRef] | None = None,
    visits: Iterable[VisitRecord] | None = None,
    epochs: Iterable[EpochRef] | None = None,
) -> Path:
    """Write ``index.json`` atomically (temporary file, then rename).

    ``templates``, ``visits`` and ``epochs`` left as None are carried over from
    the index being replaced, so a coadd build keeps the time-domain sections an
    epoch build wrote, and the other way round.
    """
    path = root / INDEX_NAME
    carried = _raw_sections(path)
    doc: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "skymap": asdict(skymap.config),
        "seed": seed,
        "datasets": [_ref_json(ref) for ref in sorted(refs, key=lambda r: r.key)],
    }
    sections = {
        "templates": None
        if templates is None
        else [_ref_json(r) for r in sorted(templates, key=lambda r: r.key)],
        "visits": None if visits is None else [visit_json(v) for v in visits],
        "epochs": None if epochs is None else [epoch_json(e) for e in epochs],
    }
    for name, value in sections.items():
        value = carried.get(name) if value is None else value
        if value:
            doc[name] = value
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def drop_time_domain(root: Path) -> None:
    """Remove the ``templates``, ``visits`` and ``epochs`` sections from an index
    (before they are built again: a coadd build checks every entry it carries)."""
    path = root / INDEX_NAME
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return
    if isinstance(doc, dict) and {"templates", "visits", "epochs"} & set(doc):
        for name in ("templates", "visits", "epochs"):
            doc.pop(name, None)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, path)


def _ref_json(ref: DatasetRef) -> dict[str, Any]:
    return asdict(ref) | {"polygon": [list(p) for p in ref.polygon]}


def _raw_sections(path: Path) -> dict[str, Any]:
    """The time-domain sections of an existing index, as JSON (empty if none)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(doc, dict):
        return {}
    return {k: doc[k] for k in ("templates", "visits", "epochs") if k in doc}


_REQUIRED: dict[str, type] = {
    "id": str,
    "dataset_type": str,
    "tract": int,
    "patch": int,
    "band": str,
    "path": str,
    "size": int,
    "compressed": bool,
    "polygon": list,
}


def load_repository(root: str | os.PathLike[str], check_files: bool = True) -> Repository:
    """Read a repository's index and check it.

    Parameters
    ----------
    root : path
        The repository folder (the one holding ``index.json``).
    check_files : bool
        Also check that every file exists and has the recorded size.

    Raises
    ------
    RepositoryError
        If the index is missing or unreadable, an entry lacks a key or has a value of
        the wrong type, a path leaves the repository, or a file is missing or has the
        wrong size. The message names the index, the entry and the key or file.
    """
    root = Path(root)
    index = root / INDEX_NAME
    if not index.is_file():
        raise RepositoryError(
            f"{root}: not a repository (no {INDEX_NAME}); build one with `harvester synth`"
        )
    try:
        doc = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RepositoryError(f"{index}: cannot read the index: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
        raise RepositoryError(
            f"{index}: not a harvester repository index "
            f"(format {doc.get('format') if isinstance(doc, dict) else None!r})"
        )
    if doc.get("version") != INDEX_VERSION:
        raise RepositoryError(
            f"{index}: index version {doc.get('version')!r} is not supported "
            f"(this harvester reads version {INDEX_VERSION})"
        )
    try:
        skymap = SkyMap(SkyMapConfig(**doc["skymap"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise RepositoryError(f"{index}: bad 'skymap' section: {exc}") from exc
    entries = doc.get("datasets")
    if not isinstance(entries, list):
        raise RepositoryError(f"{index}: 'datasets' must be a list")
    datasets = _load_refs(index, root, entries, "dataset", check_files)
    templates = _load_refs(index, root, doc.get("templates", []), "template", check_files)
    epochs = parse_epochs(index, doc.get("epochs", []))
    check_epoch_files(index, root, epochs, check_files)
    visits = parse_visits(index, doc.get("visits", []))
    seed = doc.get("seed")
    return Repository(
        root=root,
        skymap=skymap,
        datasets=datasets,
        seed=seed if isinstance(seed, int) else None,
        templates=templates,
        epochs=tuple(epochs),
        visits=tuple(visits),
    )


def _load_refs(
    index: Path, root: Path, entries: Any, what: str, check_files: bool
) -> dict[tuple[int, int, str], DatasetRef]:
    """A list of coadd-like entries (``datasets``, ``templates``), checked."""
    if not isinstance(entries, list):
        raise RepositoryError(f"{index}: '{what}s' must be a list")
    out: dict[tuple[int, int, str], DatasetRef] = {}
    resolved_root = root.resolve()
    for i, entry in enumerate(entries):
        ref = _parse_entry(index, i, entry, what)
        where = f"{index}: {what} {i} ({ref.tract}, {ref.patch}, {ref.band})"
        check_file_entry(where, root, resolved_root, ref.path, ref.size, check_files)
        if ref.key in out:
            raise RepositoryError(f"{where}: duplicate data id")
        out[ref.key] = ref
    return out


def _parse_entry(index: Path, i: int, entry: Any, what: str = "dataset") -> DatasetRef:
    if not isinstance(entry, dict):
        raise RepositoryError(f"{index}: {what} {i} is not an object: {entry!r}")
    for key, typ in _REQUIRED.items():
        if key not in entry:
            raise RepositoryError(f"{index}: {what} {i} has no {key!r}")
        value = entry[key]
        # bool is an int subclass; a tract of `true` is still wrong.
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise RepositoryError(
                f"{index}: {what} {i} key {key!r} has {value!r}, expected {typ.__name__}"
            )
    try:
        polygon = tuple((float(p[0]), float(p[1])) for p in entry["polygon"])
    except (TypeError, ValueError, IndexError) as exc:
        raise RepositoryError(f"{index}: {what} {i} key 'polygon' is malformed: {exc}") from exc
    return DatasetRef(
        id=entry["id"],
        dataset_type=entry["dataset_type"],
        tract=entry["tract"],
        patch=entry["patch"],
        band=entry["band"],
        path=entry["path"],
        size=entry["size"],
        compressed=entry["compressed"],
        polygon=polygon,
    )
