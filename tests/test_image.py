"""The container image, built for real with podman from the Dockerfile (scripts/build-image), then
run: --version, and the driver serving on a socket in a bind-mounted directory, answering the
test's gRPC client. hadolint checks the Dockerfile."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver import __version__
from csi_driver.csi import csi_pb2 as pb
from csi_driver.csi import csi_pb2_grpc as pb_grpc

from .harness import DRIVER_NAME, MiB, mount_cap

REPO = Path(__file__).resolve().parent.parent
TAG = "localhost/berth:test"
MAX_BYTES = 400 * 1000 * 1000  # the target, uncompressed
ENV = {**os.environ, "CONTAINERS_CONF": str(REPO / "scripts" / "podman-sandbox.conf")}


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV)


@pytest.fixture(scope="module")
def image() -> Iterator[int]:
    """The image's size in bytes, once built."""
    built = subprocess.run([str(REPO / "scripts" / "build-image"), TAG], capture_output=True,
                           text=True, timeout=900, env=ENV)
    assert built.returncode == 0, built.stderr[-4000:]
    size = int(built.stdout.split()[-1])
    print(f"\nimage {TAG}: {size / 1e6:.0f} MB uncompressed")
    yield size
    podman("rmi", "-f", TAG)


def test_image_size_and_labels(image: int) -> None:
    assert image <= MAX_BYTES, f"{image / 1e6:.0f} MB"
    labels = podman("image", "inspect", TAG, "--format",
                    "{{json .Labels}} {{.Config.User}} {{json .Config.Entrypoint}}").stdout
    assert f'"org.opencontainers.image.version":"{__version__}"' in labels
    assert " 10001 " in labels and '["csi-driver"]' in labels


def test_version(image: int) -> None:
    done = podman("run", "--rm", "--network=none", TAG, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"csi-driver {__version__}"


def test_no_compilers_or_caches(image: int) -> None:
    done = podman("run", "--rm", "--network=none", "--entrypoint", "sh", TAG, "-c",
                  "for t in gcc cc g++ make pip pip3; do command -v $t; done; "
                  "ls /var/lib/apt/lists /var/cache/apt; ls /opt/berth/bin")
    assert done.stdout.splitlines()[-1:] != [""]
    found = done.stdout.split()
    assert not {"gcc", "cc", "g++", "make"} & {Path(f).name for f in found}
    assert "/opt/berth/bin/pip" not in found and "pkgcache.bin" not in found
    assert "csi-driver" in found


@pytest.mark.parametrize("user, privileged", [("10001", False), ("0", True), ("0", False)],
                         ids=["non-root", "root-privileged", "root-unprivileged"])
def test_serves_on_a_bind_mounted_socket(image: int, tmp_path: Path, user: str,
                                         privileged: bool) -> None:
    """The driver in the image serves hostPath on a socket in a bind-mounted directory (as a
    node plugin's kubelet directory would be); the test's client creates and deletes a volume,
    and the volume's directory appears in the bind-mounted data directory. As root without
    privilege (no CAP_SYS_ADMIN for the trusted.* records) it says so, UNAVAILABLE."""
    sock_dir, data = tmp_path / "csi", tmp_path / "data"
    sock_dir.mkdir()
    data.mkdir()
    if user != "0":
        os.chown(sock_dir, int(user), int(user))
        os.chown(data, int(user), int(user))
    name = f"berth-test-{user}-{os.getpid()}"
    run = podman("run", "-d", "--name", name, "--network=none", "--user", user,
                 *(["--privileged"] if privileged else []),
                 "-v", f"{sock_dir}:/csi", "-v", f"{data}:/data", TAG,
                 "--endpoint", "unix:///csi/csi.sock", "--node-id", "image-node",
                 "--data-dir", "/data")
    assert run.returncode == 0, run.stderr
    try:
        sock = sock_dir / "csi.sock"
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert time.monotonic() < deadline, podman("logs", name).stderr
            time.sleep(0.1)
        with grpc.insecure_channel(f"unix://{sock}") as channel:
            identity = pb_grpc.IdentityStub(channel)
            info = identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=10)
            assert (info.name, info.vendor_version) == (DRIVER_NAME, __version__)
            controller = pb_grpc.ControllerStub(channel)
            request = pb.CreateVolumeRequest(
                name="image-test", capacity_range=pb.CapacityRange(required_bytes=MiB),
                volume_capabilities=[mount_cap()])
            if user == "0" and not privileged:
                with pytest.raises(grpc.RpcError) as refused:
                    controller.CreateVolume(request, timeout=10)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "CAP_SYS_ADMIN" in (refused.value.details() or "")
                return
            vol = controller.CreateVolume(request, timeout=10).volume
            assert vol.volume_id.startswith("local:")
            made = [p for p in data.rglob("*") if vol.volume_id.split(":")[1] in p.name]
            assert made, sorted(str(p) for p in data.rglob("*"))
            controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id), timeout=10)
        stopped = podman("stop", "-t", "20", name)
        assert stopped.returncode == 0
        assert podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip() == "0"
        assert not sock.exists()  # removed at SIGTERM
        assert "Traceback" not in podman("logs", name).stderr
    finally:
        podman("rm", "-f", name)


def test_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint") or str(REPO / ".venv" / "bin" / "hadolint")
    done = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
