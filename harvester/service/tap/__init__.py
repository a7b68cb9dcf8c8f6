"""TAP for ``harvester serve --tap``: ADQL on PostgreSQL + pg_sphere, as the RSP serves it.

Routes under ``/api/tap`` (``tap`` needs a token with ``read:tap``; ``vosi`` is
anonymous):

* ``GET|POST sync`` (tap): ``LANG=ADQL``, ``QUERY``, ``MAXREC``, ``RESPONSEFORMAT``;
* ``GET|POST async``, ``async/<id>`` (``WAIT=``, ``DELETE``), ``async/<id>/phase``,
  ``executionduration``, ``destruction``, ``quote``, ``owner``, ``parameters``,
  ``results``, ``results/result``, ``error`` (tap): UWS 1.1;
* ``GET tables``, ``tables/<schema.table>`` (tap): VOSI tables;
* ``GET capabilities``, ``availability``, ``examples`` (vosi).

Tables: ``dp1.Object`` (the synthetic catalogue of what the images paint),
``ivoa.ObsCore`` (the rows SIA serves), ``TAP_SCHEMA`` (:mod:`._schema`).

Modules, one seam each: :mod:`._postgres` (a throwaway cluster),
:mod:`._schema` (the one description of the tables), :mod:`._load` (DDL, COPY,
the ADQL helper functions, the read-only role), :mod:`._adql` (queryparser,
cached), :mod:`._query` (one query: READ ONLY, statement timeout, MAXREC, column
names and types), :mod:`._engine` (connections and worker threads),
:mod:`._votable` (results and errors), :mod:`._uws` and :mod:`._jobs` (async
jobs), :mod:`._params`, :mod:`._vosi`, :mod:`._routes`, :mod:`._service` (the
life cycle in the application).

Nothing here imports psycopg or queryparser until TAP starts: the ``tap``
extra is optional.
"""

from ._postgres import PgInstall, PostgresCluster, TapUnavailable, find_postgres

__all__ = ["PgInstall", "PostgresCluster", "TapUnavailable", "find_postgres"]
