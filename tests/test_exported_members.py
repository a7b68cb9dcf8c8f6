"""The public API is exactly what __all__ lists, and each member is documented."""

import harvester


def test_all_members_exist_and_are_documented() -> None:
    for name in harvester.__all__:
        member = getattr(harvester, name)
        if callable(member):
            assert member.__doc__, f"{name} has no docstring"
    public = {n for n in dir(harvester) if not n.startswith("_")}
    submodules = {
        "cli",
        "config",
        "cutout",
        "engine",
        "errors",
        "ledger",
        "limits",
        "masks",
        "plan",
        "progress",
        "repo",
        "report",
        "sinks",
        "skymap",
        "sources",
        "targets",
        "wcsheader",
        "epochs",
        "synth",
        "service",
        "butler",
        "dask",
    }
    assert public - submodules == set(harvester.__all__) - {"__version__"}
