"""Repertoire discovery (``/repertoire/discovery``) and the repository extension.

``GET /api/harvester/repository`` is **not an RSP service**: it gives the harvester
client the repository index (sky map and datasets with their polygons) so that a
run can plan without SIA. It needs a ``read:image`` token. Schema::

    {
      "format": "harvester-service-repository", "version": 1,
      "dataset": "dp1",
      "skymap": {<harvester.skymap.SkyMapConfig fields>},
      "datasets": [
        {"id": "<uuid>", "dataset_type": "deep_coadd", "tract": 5063, "patch": 14,
         "band": "r", "size": 123456, "compressed": false,
         "polygon": [[ra, dec], [ra, dec], [ra, dec], [ra, dec]],
         "obs_publisher_did": "ivo://org.rubinobs/usdac/lsst-dp1?repo=dp1&id=<uuid>",
         "access_url": "<base>/api/datalink/links?ID=ivo%3A..."}, ...
      ],
      "templates": [<as datasets, dataset_type "template_coadd">, ...],
      "epochs": [
        {<harvester.epochs.EpochRef fields but "path">, "obs_publisher_did": ...,
         "access_url": ...}, ...
      ]
    }

``datasets`` holds the ``deep_coadd`` files only (what a coadd harvest plans
with); ``templates`` and ``epochs`` are there when the repository has them (an
epoch's ``mjd_tai`` is TAI, unlike ObsCore's UTC ``t_min``/``t_max``).

Dependency rule: the service's leaf modules; no other route.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from aiohttp import web

from ..epochs._refs import EpochRef, epoch_json
from ..repo import DatasetRef
from ._ids import datalink_url, publisher_did
from ._state import STATE

__all__ = ["REPOSITORY_FORMAT", "discovery", "discovery_document", "repository_index"]

REPOSITORY_FORMAT = "harvester-service-repository"


def discovery_document(base: str, dataset: str, tap: bool = False) -> dict[str, Any]:
    """The Repertoire document (§1.2 of the protocol notes) for this server.

    ``tap``: list TAP (``datasets.<label>.services.tap``), only while it is up.
    """
    doc: dict[str, Any] = {
        "datasets": {
            dataset: {
                "services": {
                    "cutout": {
                        "url": f"{base}/api/cutout",
                        "versions": {
                            "soda-sync-1.0": {
                                "url": f"{base}/api/cutout/sync",
                                "ivoa_standard_id": "ivo://ivoa.net/std/SODA#sync-1.0",
                            }
                        },
                    },
                    "datalink": {
                        "url": f"{base}/api/datalink",
                        "versions": {"datalink-links-1.1": {"url": f"{base}/api/datalink/links"}},
                    },
                    "sia": {
                        "url": f"{base}/api/sia/{dataset}",
                        "versions": {"sia-query-2.0": {"url": f"{base}/api/sia/{dataset}/query"}},
                    },
                    "harvester": {
                        "url": f"{base}/api/harvester",
                        "versions": {"repository-1": {"url": f"{base}/api/harvester/repository"}},
                    },
                }
            }
        },
        "services": {"internal": {}, "ui": {}},
        "influxdb_databases": {},
    }
    if tap:
        doc["datasets"][dataset]["services"]["tap"] = {
            "url": f"{base}/api/tap",
            "versions": {"tables": {"url": f"{base}/api/tap/tables"}},
        }
    return doc


async def discovery(request: web.Request) -> web.StreamResponse:
    """``GET /repertoire/discovery`` (anonymous, CORS open)."""
    state = request.app[STATE]
    tap = state.tap is not None and state.tap.ready
    doc = discovery_document(state.base_url(request), state.settings.dataset, tap=tap)
    return web.json_response(doc, headers={"Access-Control-Allow-Origin": "*"})


def _coadd_entry(ref: DatasetRef, base: str, dataset: str) -> dict[str, Any]:
    return {
        "id": ref.id,
        "dataset_type": ref.dataset_type,
        "tract": ref.tract,
        "patch": ref.patch,
        "band": ref.band,
        "size": ref.size,
        "compressed": ref.compressed,
        "polygon": [list(p) for p in ref.polygon],
        "obs_publisher_did": publisher_did(dataset, ref.id),
        "access_url": datalink_url(base, dataset, ref.id),
    }


def _epoch_entry(ref: EpochRef, base: str, dataset: str) -> dict[str, Any]:
    entry = epoch_json(ref)
    del entry["path"]  # the server's own layout: clients go through DataLink
    return entry | {
        "obs_publisher_did": publisher_did(dataset, ref.id),
        "access_url": datalink_url(base, dataset, ref.id),
    }


async def repository_index(request: web.Request) -> web.StreamResponse:
    """``GET /api/harvester/repository`` (extension; ``read:image``)."""
    state = request.app[STATE]
    base = state.base_url(request)
    dataset = state.settings.dataset
    repo = state.repo
    doc: dict[str, Any] = {
        "format": REPOSITORY_FORMAT,
        "version": 1,
        "dataset": dataset,
        "skymap": asdict(repo.skymap.config),
        "datasets": [_coadd_entry(ref, base, dataset) for ref in repo],
    }
    if repo.templates:
        doc["templates"] = [
            _coadd_entry(repo.templates[k], base, dataset) for k in sorted(repo.templates)
        ]
    if repo.epochs:
        doc["epochs"] = [_epoch_entry(ref, base, dataset) for ref in repo.epochs]
    return web.Response(text=json.dumps(doc), content_type="application/json")
