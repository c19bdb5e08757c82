"""Start the real driver as a subprocess on a unix socket and talk to it over real gRPC."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import yaml

from csi_driver.csi import csi_pb2 as pb
from csi_driver.csi import csi_pb2_grpc as pb_grpc

NODE_ID = "test-node"
DRIVER_NAME = "berth.csi.dev"
TOPOLOGY_KEY = f"topology.{DRIVER_NAME}/node"
GiB = 1 << 30
MiB = 1 << 20


@dataclass
class Driver:
    """A running csi-driver process and stubs for every service."""

    proc: subprocess.Popen[bytes]
    socket: Path
    log_path: Path
    channel: grpc.Channel
    identity: pb_grpc.IdentityStub = field(init=False)
    controller: pb_grpc.ControllerStub = field(init=False)
    node: pb_grpc.NodeStub = field(init=False)
    metadata: pb_grpc.SnapshotMetadataStub = field(init=False)

    def __post_init__(self) -> None:
        self.identity = pb_grpc.IdentityStub(self.channel)  # type: ignore[no-untyped-call]
        self.controller = pb_grpc.ControllerStub(self.channel)  # type: ignore[no-untyped-call]
        self.node = pb_grpc.NodeStub(self.channel)  # type: ignore[no-untyped-call]
        self.metadata = pb_grpc.SnapshotMetadataStub(  # type: ignore[no-untyped-call]
            self.channel)

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # Its stacks (faulthandler answers SIGABRT) say where it hung.
            self.proc.send_signal(signal.SIGABRT)
            self.proc.wait(10)
            raise AssertionError(f"the driver did not stop within {timeout}s; its log ends:\n"
                                 + self.log()[-6000:]) from None


def write_config(path: Path, backends: dict[str, Any], **extra: Any) -> Path:
    path.write_text(yaml.safe_dump({"backends": backends, **extra}))
    return path


def start_driver(tmp: Path, config: Path | None = None, *args: str,
                 data_dir: Path | None = None, wait: bool = True,
                 env: dict[str, str] | None = None, prefix: list[str] | None = None) -> Driver:
    sock = tmp / "csi.sock"
    log_path = tmp / "driver.log"
    # `prefix` runs the driver under another command (e.g. `ip netns exec NS`).
    cmd = [*(prefix or []), sys.executable, "-m", "csi_driver", "--endpoint", f"unix://{sock}",
           "--node-id", NODE_ID, *args]
    if config is not None:
        cmd += ["--config", str(config)]
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    log.close()
    channel = grpc.insecure_channel(f"unix://{sock}")
    driver = Driver(proc, sock, log_path, channel)
    if wait:
        wait_ready(driver)
    return driver


def wait_ready(driver: Driver, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if driver.proc.poll() is not None:
            raise RuntimeError(f"driver exited with {driver.proc.returncode}:\n{driver.log()}")
        try:
            driver.identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=1)
            return
        except grpc.RpcError:
            time.sleep(0.02)
    raise RuntimeError(f"driver did not answer within {timeout}s:\n{driver.log()}")


def _mode(mode: int) -> pb.VolumeCapability.AccessMode.Mode:
    return cast("pb.VolumeCapability.AccessMode.Mode", mode)  # the stubs' enum is an int


def mount_cap(mode: int = pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER,
              flags: tuple[str, ...] = (), fs_type: str = "") -> pb.VolumeCapability:
    return pb.VolumeCapability(
        mount=pb.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
        access_mode=pb.VolumeCapability.AccessMode(mode=_mode(mode)),
    )


def block_cap(mode: int = pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
              ) -> pb.VolumeCapability:
    return pb.VolumeCapability(
        block=pb.VolumeCapability.BlockVolume(),
        access_mode=pb.VolumeCapability.AccessMode(mode=_mode(mode)),
    )


def mounted_at(path: str | Path) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == real for line in f)


def loops_of(image: Path) -> list[str]:
    """Loop devices backed by `image`, read from sysfs like the driver does."""
    from csi_driver.node.loop import attached

    return attached(str(image))


def mount_filesystem(tmp: Path, fs_type: str, size: str = "4G") -> Path:
    """A fresh `fs_type` filesystem on a loop-mounted sparse image (xfs with reflinks), so a
    backend can be put on a filesystem of the test's choosing. Unmounting frees the loop."""
    image, mnt = tmp / f"{fs_type}.img", tmp / f"{fs_type}-mnt"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    mkfs = {"xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"], "ext4": ["mkfs.ext4", "-q"],
            "btrfs": ["mkfs.btrfs", "-q"]}[fs_type]
    subprocess.run([*mkfs, str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    return mnt


def unmount_filesystem(mnt: Path) -> None:
    subprocess.run(["umount", str(mnt)], check=True)
