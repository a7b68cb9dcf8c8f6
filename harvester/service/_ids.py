"""Dataset identifiers as the RSP spells them, and their lookup in the index.

Two spellings name a dataset (``daf_butler`` ``Butler.parse_dataset_uri``):
``butler://<label>/<uuid>`` and ``ivo://<anything>?repo=<label>&id=<uuid>``. An ID is
only ever looked up in the loaded index by its UUID: no user string reaches a path.

Every image type the service holds is looked up the same way: coadds
(``deep_coadd``, ``template_coadd``: :class:`~harvester.repo.DatasetRef`) and
single-epoch images (``visit_image``, ``difference_image``:
:class:`~harvester.epochs.EpochRef`), together :data:`ServedRef`.

Dependency rule: standard library, :mod:`harvester.repo` and the epoch records.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, urlsplit

from ..epochs._refs import EpochRef
from ..repo import DatasetRef

__all__ = [
    "MAX_ID_LENGTH",
    "DatasetIndex",
    "IdError",
    "ServedRef",
    "datalink_id",
    "datalink_url",
    "parse_dataset_id",
    "publisher_did",
]

#: A file the service holds: a coadd-like dataset or a single-epoch image.
ServedRef = DatasetRef | EpochRef

#: Longer IDs are not parsed at all.
MAX_ID_LENGTH = 512


class IdError(ValueError):
    """An ID that names no dataset: ``fault`` is ``UsageFault`` or ``NotFoundFault``."""

    def __init__(self, fault: str, message: str) -> None:
        super().__init__(f"{fault}: {message}")
        self.fault = fault
        self.message = message


def parse_dataset_id(text: str) -> tuple[str, uuid.UUID]:
    """``(label, uuid)`` of a ``butler://`` or ``ivo://`` dataset ID.

    Raises
    ------
    IdError
        ``UsageFault`` if no valid ID can be extracted.
    """
    bad = IdError("UsageFault", f"Unable to extract valid dataset ID from {text!r}")
    if len(text) > MAX_ID_LENGTH or any(ord(c) < 32 for c in text):
        raise bad
    try:
        parts = urlsplit(text)
    except ValueError:
        raise bad from None
    if parts.scheme == "butler":
        label, sep, rest = (parts.netloc + parts.path).partition("/")
        if not label or not sep or "/" in rest or parts.query or parts.fragment:
            raise bad
        value = rest
    elif parts.scheme == "ivo":
        try:
            query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise bad from None
        labels, ids = query.get("repo", []), query.get("id", [])
        if len(labels) != 1 or len(ids) != 1 or not labels[0]:
            raise bad
        label, value = labels[0], ids[0]
    else:
        raise bad
    try:
        # Hex with or without dashes, as UUID() reads it; nothing else.
        if not all(c in "0123456789abcdefABCDEF-" for c in value):
            raise ValueError(value)
        return label, uuid.UUID(value)
    except ValueError:
        raise bad from None


def publisher_did(dataset: str, ident: uuid.UUID | str) -> str:
    """``obs_publisher_did`` as ``dp1.yaml`` writes it."""
    return f"ivo://org.rubinobs/usdac/lsst-{dataset}?repo={dataset}&id={ident}"


def datalink_id(dataset: str, ident: uuid.UUID | str) -> str:
    """The ID in SIA ``access_url`` (DataLink) links (the other IVOID spelling)."""
    return f"ivo://org.rubinobs/lsst-{dataset}?repo={dataset}&id={ident}"


def datalink_url(base_url: str, dataset: str, ident: uuid.UUID | str) -> str:
    """A DataLink ``links`` URL for one dataset."""
    return f"{base_url}/api/datalink/links?ID={quote(datalink_id(dataset, ident), safe='')}"


@dataclass(frozen=True)
class DatasetIndex:
    """Datasets by UUID, in index order."""

    dataset: str
    refs: tuple[ServedRef, ...]
    by_uuid: Mapping[uuid.UUID, int]

    @classmethod
    def build(cls, dataset: str, refs: Iterable[ServedRef]) -> DatasetIndex:
        ordered = tuple(refs)
        by_uuid = {uuid.UUID(ref.id): i for i, ref in enumerate(ordered)}
        return cls(dataset, ordered, by_uuid)

    def __len__(self) -> int:
        return len(self.refs)

    def lookup(self, text: str) -> tuple[int, ServedRef]:
        """The (position, dataset) a DataLink/SODA ID names.

        Raises
        ------
        IdError
            ``UsageFault`` for an unparsable ID, ``NotFoundFault`` for another
            label or an unknown UUID.
        """
        label, ident = parse_dataset_id(text)
        i = self.by_uuid.get(ident) if label == self.dataset else None
        if i is None:
            raise IdError("NotFoundFault", f"Unknown dataset ID {text!r}")
        return i, self.refs[i]

    def find_uuid(self, ident: uuid.UUID) -> int | None:
        return self.by_uuid.get(ident)
