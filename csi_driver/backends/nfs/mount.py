"""Node side: kernel NFS mounts with a bounded wait.

mount(8) runs with -i (no mount.nfs helper) and the server's address in `addr=`, so the kernel's
own NFS option parser does the work on any node image; the mount runs in a child process so a
server that does not answer costs at most the timeout (NFS waits are killable), never a hang.
"""

from __future__ import annotations

import socket
import subprocess

from ... import errors


def resolve(host: str) -> str:
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise errors.InvalidArgument(f"NFS server {host!r} does not resolve: {exc}") from exc
    return str(infos[0][4][0])


def mount_nfs(server: str, path: str, target: str, version: str, options: list[str],
              read_only: bool, timeout: float) -> None:
    opts = [f"vers={version}", *options, f"addr={resolve(server)}"]
    if read_only:
        opts.append("ro")
    host = f"[{server}]" if ":" in server else server
    argv = ["mount", "-i", "-t", "nfs4" if version.startswith("4") else "nfs",
            "-o", ",".join(opts), f"{host}:{path}", target]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise errors.Unavailable(
            f"NFS server {server} did not answer the mount of {path} within {timeout:.0f}s"
        ) from exc
    if done.returncode == 0:
        return
    message = (done.stderr or done.stdout).strip()
    low = message.lower()
    if "permission denied" in low:
        raise errors.PermissionDenied(f"server {server} refused to mount {path}: {message}")
    if "no such file" in low or "does not exist" in low:
        raise errors.NotFound(f"server {server} has no {path}: {message}")
    if any(s in low for s in ("refused", "timed out", "unreachable", "no route")):
        raise errors.Unavailable(f"NFS server {server} is not reachable: {message}")
    if "invalid argument" in low or "bad option" in low:
        raise errors.InvalidArgument(f"mount options {','.join(opts)!r} were refused: {message}")
    raise errors.Internal(f"mount of {server}:{path} failed: {message}")
