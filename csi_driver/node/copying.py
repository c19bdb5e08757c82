"""Copies that share blocks where the filesystem can (reflinks on xfs/btrfs) and keep holes,
ownership, modes, timestamps, xattrs and hard links everywhere else (cp -a)."""

from __future__ import annotations

from .commands import run


def copy_tree(source_dir: str, dest_dir: str) -> None:
    """Copy the contents of `source_dir` into the existing `dest_dir`."""
    run("cp", "-a", "--reflink=auto", "--sparse=always", "--no-target-directory",
        source_dir, dest_dir)


def copy_file(source: str, dest: str) -> None:
    run("cp", "--reflink=auto", "--sparse=always", "--preserve=all", source, dest)
