"""Config validation: every error names the key that is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from csi_driver.config import ConfigError, load_settings, parse_settings
from csi_driver.quantity import parse_bytes

from .test_server import run_cli


def error_for(data: Any) -> str:
    with pytest.raises(ConfigError) as err:
        parse_settings(data, "c.yaml")
    return str(err.value)


def test_valid_config() -> None:
    s = parse_settings({"driverName": "x.example.com", "maxVolumesPerNode": 3, "backends": {
        "fast": {"type": "hostpath", "path": "/srv/v", "capacity": "2Gi",
                 "defaultVolumeSize": "100Mi"}}})
    assert s.driver_name == "x.example.com" and s.max_volumes_per_node == 3
    cfg = s.backends["fast"]
    assert cfg.capacity == 2 << 30 and cfg.defaultVolumeSize == 100 << 20  # type: ignore[attr-defined]


@pytest.mark.parametrize(("data", "needle"), [
    ({}, "backends"),
    ({"backends": {}}, "backends"),
    ({"backends": {"a": {"type": "hostpath"}}}, "backends.a.path"),
    ({"backends": {"a": {"type": "hostpath", "path": "rel"}}}, "backends.a.path"),
    ({"backends": {"a": {"type": "hostpath", "path": "/x", "pth": 1}}}, "backends.a.pth"),
    ({"backends": {"a": {"type": "hostpath", "path": "/x", "capacity": "lots"}}},
     "backends.a.capacity"),
    ({"backends": {"a": {"type": "warp", "path": "/x"}}}, "backends.a.type"),
    ({"backends": {"a": {"path": "/x"}}}, "backends.a.type"),
    ({"backends": {"Bad_Name": {"type": "hostpath", "path": "/x"}}}, "backends.Bad_Name"),
    ({"driverName": "-bad-", "backends": {"a": {"type": "hostpath", "path": "/x"}}},
     "driverName"),
    ({"maxVolumesPerNode": -1, "backends": {"a": {"type": "hostpath", "path": "/x"}}},
     "maxVolumesPerNode"),
    ({"backends": {"a": {"type": "hostpath", "path": "/x", "layout": "zfs"}}},
     "backends.a.layout"),
    ({"backends": {"a": {"type": "hostpath", "path": "/x", "fsType": "ntfs"}}},
     "backends.a.fsType"),
    ({"backends": {"a": {"type": "hostpath", "path": 5}}}, "backends.a.path"),
    ({"backends": {"a": {"type": "hostpath", "path": "/x", "capacity": True}}},
     "backends.a.capacity"),
    ({"backends": {"a": "hostpath"}}, "backends.a.type"),
    ({"backends": []}, "backends"),
    ({"backend": {}}, "backend"),
    ([1, 2], "mapping"),
])
def test_errors_name_the_key(data: Any, needle: str) -> None:
    message = error_for(data)
    assert message.startswith("c.yaml")
    assert needle in message


def test_unknown_type_lists_known_types() -> None:
    assert "hostpath" in error_for({"backends": {"a": {"type": "warp", "path": "/x"}}})


def test_yaml_syntax_error(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("backends: {a: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(str(bad), "/unused")


def test_cli_reports_config_error_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("backends:\n  a: {type: hostpath}\n")
    result = run_cli("--endpoint", f"unix://{tmp_path}/s.sock", "--config", str(bad))
    assert result.returncode == 2
    assert "backends.a.path" in result.stderr and "Traceback" not in result.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    result = run_cli("--config", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2 and "cannot read config file" in result.stderr


@pytest.mark.parametrize(("text", "value"), [("1Gi", 1 << 30), ("500M", 500 * 10**6),
                                             ("42", 42), (7, 7), ("2 Ki", 2048)])
def test_sizes(text: str | int, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["1GB", "-1", "one", "1.5Gi"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_backend_topology_and_node_limit_are_checked() -> None:
    ok = parse_settings({"backends": {"n": {"type": "nfs", "server": "s", "share": "/e",
                                             "topology": {"topology.kubernetes.io/zone": "a"},
                                             "maxVolumesPerNode": 3}}})
    assert ok.backends["n"].topology == {"topology.kubernetes.io/zone": "a"}
    assert ok.backends["n"].maxVolumesPerNode == 3
    for bad, words in (({"topology": {"not a key": "a"}}, "label keys"),
                       ({"topology": {"zone": "a b"}}, "label keys"),
                       ({"maxVolumesPerNode": -1}, "whole number"),
                       ({"maxVolumesPerNode": 2}, "does not attach")):
        with pytest.raises(ConfigError, match=words):
            parse_settings({"backends": {"l": {"type": "hostpath", "path": "/tmp/x", **bad}}})
