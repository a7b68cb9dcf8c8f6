"""Each epoch image's header WCS, by dataset id, for the per-target outputs.

The per-target files and ``stack.h5`` of a single-epoch run are made at its end
(maybe by a later run, on resume) from the stamps in the stack's shards, and
each stamp's WCS is its image's header WCS with CRPIX moved. A local run reads
that WCS from the image's file when it needs it. A remote run has no file to go
back to: its reader hands each unit's cards to :meth:`EpochHeaders.save`, which
keeps them beside the stamps, ``stack_parts/wcs/<dataset id>.json`` (the cards
as JSON: every value exactly as the reader parsed it), written once per image
and atomically, before the unit's ledger rows are committed; :meth:`EpochHeaders.cards`
looks there first. ``--fresh`` clears them with the shards.

Dependency rule: the repository, :mod:`harvester.epochs`, errors, the stack's
folder name and the epoch reader's :func:`~harvester.sources._epoch_read.image_wcs_cards`.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

from astropy.io import fits

from .epochs import EpochRef
from .epochs._batch import Card
from .errors import ConfigError
from .repo import Repository
from .sinks.stack import PARTS
from .sources._epoch_read import image_wcs_cards

__all__ = ["WCS_FOLDER", "EpochHeaders"]

#: Where a remote run keeps its images' header WCS, under the output folder.
WCS_FOLDER = f"{PARTS}/wcs"
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


class EpochHeaders:
    """The header WCS cards of a run's epoch images (see the module docstring).
    Thread-safe.

    Parameters
    ----------
    repo : Repository
        Its ``epochs`` say where each image's file is (when it is a local one).
    out : Path, optional
        The output folder: where a remote run's cards are kept.
    """

    def __init__(self, repo: Repository, out: Path | None) -> None:
        self.root = repo.root
        self.folder = None if out is None else out / WCS_FOLDER
        self._refs = {r.id: r for r in repo.epochs}
        self._cards: dict[str, list[Card]] = {}
        self._lock = threading.Lock()

    def _file(self, dataset_id: str) -> Path | None:
        if self.folder is None:
            return None
        return self.folder / f"{_SAFE.sub('_', dataset_id)}.json"

    def _local(self, ref: EpochRef) -> Path | None:
        path = self.root / ref.path
        return path if "://" not in ref.path and path.is_file() else None

    def save(self, ref: EpochRef, cards: Sequence[Card]) -> None:
        """Keep an image's cards in the output folder, unless its file is local (then
        it is read again when needed) or they are kept already."""
        with self._lock:
            if ref.id in self._cards:
                return
            self._cards[ref.id] = list(cards)
        target = self._file(ref.id)
        if target is None or self._local(ref) is not None or target.is_file():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps([[k, v] for k, v, _ in cards]))
        os.replace(tmp, target)

    def cards(self, dataset_id: str) -> list[Card]:
        """An image's header WCS cards: as saved by this or an earlier run, else read
        from its file.

        Raises
        ------
        ConfigError
            Neither is there (the ledger names an image the repository no longer
            lists, and no run kept its WCS).
        """
        with self._lock:
            found = self._cards.get(dataset_id)
        if found is not None:
            return found
        saved = self._file(dataset_id)
        ref = self._refs.get(dataset_id)
        if saved is not None and saved.is_file():
            found = [(str(k), v, "") for k, v in json.loads(saved.read_text())]
        elif ref is not None and (path := self._local(ref)) is not None:
            found = image_wcs_cards(path)
        else:
            raise ConfigError(
                f"{self.root}: the ledger names image {dataset_id}, which the repository's "
                "index no longer lists (and no run kept its WCS); use another output folder "
                "or --fresh"
            )
        with self._lock:
            self._cards[dataset_id] = found
        return found

    def texts(self, ids: Iterable[str]) -> dict[str, str]:
        """Each image's header WCS as FITS header text (the epoch stack's ``images``)."""
        return {i: fits.Header([(k, v) for k, v, _ in self.cards(i)]).tostring() for i in ids}
