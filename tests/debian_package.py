"""Debian packages the tests drive (redis-server, chromium): found on PATH, or
installed with apt-get when missing, as launch/setup.sh does, so the tests run
rather than skip on a fresh machine."""

from __future__ import annotations

import os
import shutil
import subprocess


def _apt(*args: str) -> subprocess.CompletedProcess:
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    return subprocess.run([*sudo, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get", *args],
                          capture_output=True, text=True)


def installed_binary(command: str, package: str) -> str:
    """The path of `command`; installs `package` if needed (root, or passwordless
    sudo), after `apt-get update` if the first try fails."""
    found = shutil.which(command)
    if found:
        return found
    if os.geteuid() != 0 and shutil.which("sudo") is None:
        raise RuntimeError(f"{command} is missing and this user cannot install it: "
                           f"run `apt-get install -y {package}` as root")
    done = _apt("install", "-y", "-q", package)
    if done.returncode != 0:
        _apt("update", "-q")
        done = _apt("install", "-y", "-q", package)
    found = shutil.which(command)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"could not install {package} (apt-get exit {done.returncode}): "
                           f"{done.stderr.strip()[-2000:]}")
    return found
