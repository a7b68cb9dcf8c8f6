"""Run configuration: shipped configs read back, every key read, every key type-checked
with a message naming the section.key, the value and the type wanted; overrides."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest

from harvester.config import (
    OVERRIDES,
    BadValue,
    ButlerConfig,
    DaskConfig,
    FetchConfig,
    GridConfig,
    RunConfig,
    ServiceConfig,
    TapConfig,
    TimeWindow,
    apply_override,
    load_config,
)
from harvester.errors import ConfigError
from harvester.targets import ColumnNames, Size

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.toml"))


def _section(config: RunConfig, name: str) -> Any:
    """The value object of a TOML section."""
    return {"run": config, "targets": config.columns}.get(name) or getattr(config, name)


def _expected(section: str, key: str, value: Any) -> Any:
    """What a TOML value reads back as, worked out here (not by harvester's readers)."""
    if isinstance(value, list):
        return tuple(value)
    if section == "run" and key in ("repo", "output"):
        return Path(value)
    if section == "run" and key == "size":
        assert isinstance(value, str) and value.isdigit(), "shipped sizes are pixel counts"
        return Size(float(value), None)
    return value


def test_shipped_configs_exist() -> None:
    assert [p.name for p in SHIPPED] == ["ecdfs_agn.toml", "ecdfs_tap.toml", "large_synthetic.toml"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    """Every key of every shipped config reads back as the TOML file says."""
    doc = tomllib.loads(path.read_text())
    config = load_config(path)
    checked = 0
    for section, table in doc.items():
        for key, value in table.items():
            if (section, key) == ("targets", "query"):  # an ADQL target list: run.targets
                assert config.targets == "adql:" + value.strip(), path.name
                checked += 1
                continue
            got = getattr(_section(config, section), key)
            assert got == _expected(section, key, value), f"{path.name}: {section}.{key}"
            checked += 1
    assert checked == sum(len(t) for t in doc.values()) >= 10
    # A key the file does not set keeps its default.
    assert config.max_size == RunConfig().max_size


#: A valid value for every key of every section, different from its default (so a
#: key that loading ignores reads back as the default and fails), and what it reads as.
EVERY_KEY: dict[str, dict[str, tuple[str, Any]]] = {
    "run": {
        "repo": ('"data/other"', Path("data/other")),
        "targets": ('"random:7"', "random:7"),
        "output": ('"out/other"', Path("out/other")),
        "bands": ('"g,r,i"', ("g", "r", "i")),
        "size": ('"10arcsec"', Size(10.0, "arcsec")),
        "planes": ('["image", "mask"]', ("image", "mask")),
        "formats": ('["stack"]', ("stack",)),
        "on_error": ('"raise"', "raise"),
        "max_size": ("100", 100),
        "seed": ("-3", -3),
        "source": ('"soda"', "soda"),
        "engine": ('"dask"', "dask"),
        "images": ('"visit_image,difference_image"', ("visit_image", "difference_image")),
        "time": ('["2024-11-05", 60700.5]', TimeWindow(60619.0, 60700.5)),
        "align": ('"tract"', "tract"),
    },
    "targets": {
        name: (f'"my_{name}"', f"my_{name}") for name in ("id", "ra", "dec", "size", "bands")
    },
    "fetch": {
        "concurrency": ("7", 7),
        "rate": ("2", 2.0),
        "batch_size": ("99", 99),
        "retries": ("0", 0),
    },
    "grid": {
        "stretch": ('"asinh"', "asinh"),
        "per_page": ("9", 9),
        "columns": ("3", 3),
        "band": ('"r"', "r"),
        "rgb": ('["i", "r", "g"]', ("i", "r", "g")),
        "max_stamps": ("0", 0),
    },
    "service": {
        "url": ('"http://127.0.0.1:8080/"', "http://127.0.0.1:8080"),
        "dataset": ('"dp2"', "dp2"),
        "token": ('"t0ken"', "t0ken"),
        "lookup": ('"obscore"', "obscore"),
        "cutout_per_minute": ("0", 0.0),
        "sia_per_minute": ("1.5", 1.5),
        "quota_burst": ("false", False),
        "connections_per_host": ("2", 2),
        "multirange": ("true", "on"),
        "timeout_connect": ("1", 1.0),
        "timeout_read": ("2.5", 2.5),
        "cutouts_per_image": ("0", 0),
        "request_cost": ("65536", 65536),
        "max_overread": ("0", 0.0),
        "cache_mb": ("16", 16),
        "outage_failures": ("0", 0),
        "outage_seconds": ("3", 3.0),
    },
    "butler": {
        "repo": ('"dp1"', "dp1"),
        "collections": ('"a/b,c"', ("a/b", "c")),
        "dataset_type": ('"calexp"', "calexp"),
        "skymap": ('"ops_rings_v1"', "ops_rings_v1"),
        "url_lifetime": ("60", 60.0),
    },
    "tap": {
        "url": ('"http://127.0.0.1:8080/api/tap/"', "http://127.0.0.1:8080/api/tap"),
        "mode": ('"sync"', "sync"),
        "maxrec": ("500", 500),
        "page_size": ("100", 100),
        "allow_truncated": ("true", True),
        "wait": ("10", 10.0),
    },
    "dask": {
        "scheduler": ('"tcp://10.0.0.5:8786"', "tcp://10.0.0.5:8786"),
        "scheduler_file": ('"sched.json"', "sched.json"),
        "workers": ("4", 4),
        "threads_per_worker": ("3", 3),
        "processes": ("false", False),
        "dashboard": ('":19100"', ":19100"),
        "shard_size": ("500", 500),
        "window": ("5", 5),
    },
}


def test_every_key_has_a_case() -> None:
    fields = {
        "run": {f.name for f in dataclasses.fields(RunConfig)}
        - {"columns", "fetch", "grid", "service", "butler", "tap", "dask"},
        "targets": {f.name for f in dataclasses.fields(ColumnNames)},
        "fetch": {f.name for f in dataclasses.fields(FetchConfig)},
        "grid": {f.name for f in dataclasses.fields(GridConfig)},
        "service": {f.name for f in dataclasses.fields(ServiceConfig)},
        "butler": {f.name for f in dataclasses.fields(ButlerConfig)},
        "tap": {f.name for f in dataclasses.fields(TapConfig)},
        "dask": {f.name for f in dataclasses.fields(DaskConfig)},
    }
    assert {s: set(keys) for s, keys in EVERY_KEY.items()} == fields
    assert {s: set(keys) for s, keys in WRONG_TYPES.items()} == fields


@pytest.mark.parametrize(
    ("section", "key"), [(s, k) for s, keys in EVERY_KEY.items() for k in keys]
)
def test_every_key_is_read(tmp_path: Path, section: str, key: str) -> None:
    text, want = EVERY_KEY[section][key]
    path = tmp_path / "c.toml"
    extra = '[run]\nbands = ["g", "r", "i"]\n' if section == "grid" else ""
    if section == "run" and key in ("time", "align"):  # keys of single-epoch runs
        text += '\nimages = ["visit_image"]'
    path.write_text(f"{extra}[{section}]\n{key} = {text}\n")
    config = load_config(path)
    got = getattr(_section(config, section), key)
    assert got == want and type(got) is type(want)
    default = getattr(_section(RunConfig(), section), key)
    assert got != default


#: For every key, values of wrong types (or, for strings, of no allowed form): the
#: TOML text and a fragment of the type the message must say is wanted.
WRONG_TYPES: dict[str, dict[str, list[tuple[str, str]]]] = {
    "run": {
        "repo": [("5", "a folder path"), ('""', "a folder path"), ("[]", "a folder path")],
        "targets": [("3", "a target file path, 'random:N', 'adql:SELECT"), ("true", "a target")],
        "output": [("true", "a folder path"), ("1.5", "a folder path")],
        "bands": [("5", "distinct bands"), ("[1, 2]", "distinct bands"), ('"q"', "distinct")],
        "size": [("[1, 2]", "a side: pixels (50 or '50') or an angle"), ("true", "a side")],
        "planes": [("1", "distinct planes"), ('["mask"]', "distinct"), ("{a = 1}", "distinct")],
        "formats": [("1", "any of fits, stack, grid"), ('["png"]', "any of fits")],
        "on_error": [("1", "one of 'skip', 'raise'"), ('["skip"]', "one of 'skip'")],
        "max_size": [("10.0", "an integer from 1 to 100000"), ("true", "an integer")],
        "seed": [('"1"', "an integer"), ("false", "an integer"), ("1.0", "an integer")],
        "source": [("1", "one of 'local', 'http', 'soda', 'auto', 'butler'"), ('"x"', "one of")],
        "engine": [("1", "one of 'local', 'dask'"), ('"ray"', "one of 'local', 'dask'")],
        "images": [
            ("5", "distinct image types of deep_coadd, template_coadd"),
            ('["calexp"]', "distinct image types"),
            ('["visit_image", "visit_image"]', "distinct image types"),
            ('["deep_coadd", "visit_image"]', "coadd types or single-epoch types, not both"),
        ],
        "time": [
            ("5", "a time window 'START..END'"),
            ('"60600"', "a time window"),
            ('"60700..60600"', "a time window"),
            ('"2024-11-05T00:00:00Z..60700"', "a time window"),
            ('"2460600.5.."', "a time window"),
            ("true", "a time window"),
        ],
        "align": [("1", "one of 'none', 'tract'"), ('"sky"', "one of 'none', 'tract'")],
    },
    "targets": {
        name: [("3", "a column name (a non-empty string)"), ('""', "a column name")]
        for name in ("id", "ra", "dec", "size", "bands")
    },
    "fetch": {
        "concurrency": [('"x"', "an integer from 1 to 256"), ("true", "an integer from 1")],
        "rate": [('"fast"', "a number >= 0"), ("true", "a number >= 0"), ("nan", "a number")],
        "batch_size": [("2.0", "an integer from 1 to 100000"), ("[1]", "an integer")],
        "retries": [("[1]", "an integer from 0 to 20"), ("false", "an integer from 0")],
    },
    "grid": {
        "stretch": [("1", "one of 'zscale', 'asinh'"), ("true", "one of")],
        "per_page": [('"25"', "an integer from 1 to 400"), ("true", "an integer")],
        "columns": [("5.0", "an integer from 1 to 40"), ("false", "an integer")],
        "band": [("1", "a band name"), ('["z"]', "a band name")],
        "rgb": [("5", "three band names"), ('"ir"', "three band names"), ("[1, 2, 3]", "three")],
        "max_stamps": [("false", "an integer >= 0"), ("1.5", "an integer >= 0")],
    },
    "service": {
        "url": [("5", "an http:// or https:// URL"), ('"ftp://x"', "an http://")],
        "dataset": [("[]", "a non-empty string"), ("1", "a non-empty string")],
        "token": [("5", "a non-empty string"), ('""', "a non-empty string")],
        "lookup": [("1", "one of 'auto', 'index', 'sia'")],
        "cutout_per_minute": [('"35"', "a number >= 0"), ("true", "a number >= 0")],
        "sia_per_minute": [("[70]", "a number >= 0")],
        "quota_burst": [('"no"', "true or false"), ("0", "true or false")],
        "connections_per_host": [("8.5", "an integer >= 1"), ("true", "an integer >= 1")],
        "multirange": [("1", "one of 'auto', 'on', 'off'"), ('"yes"', "one of 'auto'")],
        "timeout_connect": [('"10"', "a number > 0"), ("false", "a number > 0")],
        "timeout_read": [("true", "a number > 0"), ("inf", "a number > 0")],
        "cutouts_per_image": [("true", "an integer >= 0"), ("3.0", "an integer >= 0")],
        "request_cost": [("1.5", "an integer >= 0"), ('"256k"', "an integer >= 0")],
        "max_overread": [('"x"', "0 or a number >= 1"), ("true", "0 or a number >= 1")],
        "cache_mb": [('"1G"', "an integer >= 1"), ("false", "an integer >= 1")],
        "outage_failures": [("2.0", "an integer >= 0"), ("true", "an integer >= 0")],
        "outage_seconds": [('"15s"', "a number >= 0"), ("false", "a number >= 0")],
    },
    "butler": {
        "repo": [("5", "a path, URI or label"), ("[]", "a path, URI or label")],
        "collections": [("[]", "collection names"), ("5", "collection names")],
        "dataset_type": [('""', "a non-empty string"), ("1", "a non-empty string")],
        "skymap": [("1", "a sky map name"), ("true", "a sky map name")],
        "url_lifetime": [("0", "a number > 0"), ('"1h"', "a number > 0")],
    },
    "tap": {
        "url": [("5", "an http:// or https:// URL, or ''"), ('"tap.example"', "an http://")],
        "mode": [('"fast"', "one of 'async', 'sync'"), ("true", "one of")],
        "maxrec": [("0", "an integer >= 1"), ("1.5", "an integer >= 1")],
        "page_size": [("-1", "an integer >= 0"), ('"1k"', "an integer >= 0")],
        "allow_truncated": [('"yes"', "true or false"), ("1", "true or false")],
        "wait": [("0", "a number > 0"), ('"1h"', "a number > 0")],
    },
    "dask": {
        "scheduler": [("8786", "a scheduler address"), ('"somewhere"', "a scheduler address")],
        "scheduler_file": [("1", "a file path"), ("true", "a file path")],
        "workers": [("0", "an integer from 1 to 1024"), ("2.0", "an integer from 1")],
        "threads_per_worker": [("true", "an integer from 1 to 256"), ('"2"', "an integer")],
        "processes": [("1", "true or false"), ('"yes"', "true or false")],
        "dashboard": [("8787", "an address such as ':8787'"), ("false", "an address")],
        "shard_size": [("0", "an integer from 1 to 10000000"), ("1e3", "an integer from 1")],
        "window": [("0", "an integer from 1 to 100"), ("[2]", "an integer from 1")],
    },
}


@pytest.mark.parametrize(
    ("section", "key", "text", "wanted"),
    [
        (s, k, text, wanted)
        for s, keys in WRONG_TYPES.items()
        for k, cases in keys.items()
        for text, wanted in cases
    ],
)
def test_wrong_type_names_key_value_and_type(
    tmp_path: Path, section: str, key: str, text: str, wanted: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[{section}]\n{key} = {text}\n")
    value = tomllib.loads(path.read_text())[section][key]
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: bad value for {section}.{key}")
    assert f"(wanted {wanted}" in message
    if section == "service" and key == "token":  # a token is never shown
        assert message == f"{path}: bad value for service.token (wanted a non-empty string)"
    else:
        assert f"{section}.{key}: {value!r} (wanted " in message
    assert "not supported between" not in message


def test_direct_construction_is_checked_too() -> None:
    with pytest.raises(BadValue, match=r"fetch\.concurrency: True \(wanted an integer from 1"):
        FetchConfig(concurrency=True)
    with pytest.raises(BadValue, match=r"grid\.per_page: 2\.0 \(wanted an integer"):
        GridConfig(per_page=2.0)  # type: ignore[arg-type]
    with pytest.raises(BadValue, match=r"run\.bands: 'gz' \(wanted distinct bands"):
        RunConfig(bands="gz")  # type: ignore[arg-type]
    with pytest.raises(BadValue, match=r"grid\.band: 'g' \(wanted a band of run\.bands"):
        RunConfig(bands=("z",), grid=GridConfig(band="g"))
    with pytest.raises(BadValue, match=r"run\.columns: 3 \(wanted a ColumnNames"):
        RunConfig(columns=3)  # type: ignore[arg-type]


def test_token_never_in_a_message(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, token="   ")
    assert str(info.value) == "token=...: bad value for service.token (wanted a non-empty string)"
    path = tmp_path / "c.toml"
    path.write_text('[service]\ntoken = "s3cr3t"\n[fetch]\nconcurrency = 0\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "s3cr3t" not in str(info.value)


def test_section_must_be_a_table(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("fetch = 3\n")
    with pytest.raises(ConfigError, match=r"\[fetch\] must be a table of keys, got 3"):
        load_config(path)
    path.write_text("[run]\nfetch = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key run\.fetch \(use the \[fetch\] section\)"):
        load_config(path)


def test_output_that_is_a_file(tmp_path: Path) -> None:
    afile = tmp_path / "f"
    afile.write_text("")
    path = tmp_path / "c.toml"
    path.write_text(f'[run]\noutput = "{afile}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: bad value for run.output: '{afile}' (exists and is not a folder)"
    )
    with pytest.raises(BadValue, match="exists and is not a folder"):
        RunConfig(output=afile / "x")
    assert RunConfig(output=tmp_path / "new" / "deeper").output == tmp_path / "new" / "deeper"


def test_overrides_name_themselves() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, bands="q")
    assert str(info.value).startswith("bands='q': bad value for run.bands: 'q' (wanted distinct")
    with pytest.raises(ConfigError, match=r"^concurrency=0: bad value for fetch\.concurrency"):
        load_config(None, concurrency=0)
    with pytest.raises(ConfigError, match=r"^nope=1: unknown override 'nope'"):
        load_config(None, nope=1)


def test_overrides_apply_in_order_and_read_like_toml(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[run]\nbands = ["g", "r", "i"]\n[grid]\nrgb = ["i", "r", "g"]\n')
    config = load_config(path, bands="gri", size="12", concurrency=4, service_url="https://x/")
    assert config.bands == ("g", "r", "i") and config.size == Size(12.0)
    assert config.fetch.concurrency == 4 and config.service.url == "https://x"
    with pytest.raises(BadValue) as info:
        apply_override(config, "bands", "g,z")
    assert info.value.key == "grid.rgb"  # the clash is named by the key it breaks
    assert set(OVERRIDES) >= {"bands", "output", "concurrency", "token", "service_url"}


def test_a_query_in_the_targets_section(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[targets]\nid = "oid"\nquery = """\nSELECT oid, ra, dec FROM t\n"""\n')
    config = load_config(path)
    assert config.targets == "adql:SELECT oid, ra, dec FROM t"
    assert config.columns.id == "oid"
    path.write_text('[run]\ntargets = "a.csv"\n[targets]\nquery = "SELECT 1 FROM t"\n')
    with pytest.raises(ConfigError, match="give run.targets or targets.query, not both"):
        load_config(path)
    path.write_text("[targets]\nquery = 3\n")
    with pytest.raises(ConfigError, match=r"targets\.query: 3 \(wanted an ADQL query"):
        load_config(path)
