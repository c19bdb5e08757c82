"""Identity service: plugin info, capabilities, probe."""

from __future__ import annotations

import re
from pathlib import Path

from csi_driver import __version__
from csi_driver.csi import csi_pb2 as pb

from .harness import DRIVER_NAME, Driver, start_driver, write_config

Service = pb.PluginCapability.Service


def test_plugin_info(driver: Driver) -> None:
    info = driver.identity.GetPluginInfo(pb.GetPluginInfoRequest())
    assert info.name == DRIVER_NAME
    assert re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?", info.name)
    assert info.vendor_version == __version__


def test_plugin_capabilities(driver: Driver) -> None:
    caps = driver.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
    services = {c.service.type for c in caps if c.HasField("service")}
    assert services == {Service.CONTROLLER_SERVICE, Service.VOLUME_ACCESSIBILITY_CONSTRAINTS,
                        Service.GROUP_CONTROLLER_SERVICE, Service.SNAPSHOT_METADATA_SERVICE}
    expansion = [c.volume_expansion.type for c in caps if c.HasField("volume_expansion")]
    assert expansion == [pb.PluginCapability.VolumeExpansion.ONLINE]


def test_probe_ready(driver: Driver) -> None:
    assert driver.identity.Probe(pb.ProbeRequest()).ready.value is True


def test_probe_not_ready_when_backend_unusable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = write_config(tmp_path / "c.yaml",
                          {"broken": {"type": "hostpath", "path": str(blocker / "sub")}},
                          driverName="probe.example.com")
    d = start_driver(tmp_path, config)
    try:
        assert d.identity.Probe(pb.ProbeRequest()).ready.value is False
        assert d.identity.GetPluginInfo(pb.GetPluginInfoRequest()).name == "probe.example.com"
        assert "broken" in d.log()
    finally:
        assert d.stop() == 0
