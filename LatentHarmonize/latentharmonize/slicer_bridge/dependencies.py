"""What the analysis lacks in Slicer's Python, read from package metadata only: nothing is imported, so opening the
module never loads PyTorch."""
from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Optional

from packaging.requirements import Requirement


def read_requirements(path) -> list:
    """Requirement strings of a requirements.txt (comments and blank lines dropped)."""
    reqs = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            reqs.append(line)
    return reqs


def missing_requirements(requirements: Iterable[str], version_of: Optional[Callable[[str], str]] = None) -> list:
    """The requirements not satisfied by what is installed (``version_of(name)`` raises if absent)."""
    version_of = version_of or metadata.version
    missing = []
    for text in requirements:
        req = Requirement(text)
        try:
            installed = version_of(req.name)
        except metadata.PackageNotFoundError:
            missing.append(text)
            continue
        if req.specifier and not req.specifier.contains(installed, prereleases=True):
            missing.append(text)
    return missing


@dataclass(frozen=True)
class DependencyStatus:
    """What the analysis lacks in Slicer's Python, read from package metadata only (nothing is imported, so
    opening the module never loads PyTorch): ``torch`` is None when a good enough PyTorch is installed, else why not;
    ``packages`` are the unmet requirements of requirements.txt."""

    torch: Optional[str]
    packages: tuple

    @property
    def complete(self) -> bool:
        return self.torch is None and not self.packages

    def question(self) -> str:
        """The one install dialog's text: everything that will be installed, PyTorch first."""
        lines = ["LatentHarmonize needs to install into Slicer's Python:"]
        if self.torch is not None:
            lines.append(f"- PyTorch ({self.torch}), through the PyTorch extension")
        lines += [f"- {p}" for p in self.packages]
        lines.append("This happens once and can take several minutes. Install now?")
        return "\n".join(lines)


def dependency_status(requirements: Iterable[str], torch_requirement: str,
                      version_of: Optional[Callable[[str], str]] = None) -> DependencyStatus:
    """PyTorch's state (absent, or older than ``torch_requirement``) and the unmet ``requirements``."""
    version_of = version_of or metadata.version
    wanted = Requirement(f"torch{torch_requirement}")
    try:
        installed = version_of("torch")
    except metadata.PackageNotFoundError:
        torch = f"not installed; {wanted} is needed"
    else:
        torch = None if wanted.specifier.contains(installed, prereleases=True) else \
            f"{installed} is installed; {wanted} is needed"
    return DependencyStatus(torch, tuple(missing_requirements(requirements, version_of)))


def installed_versions(names: Iterable[str], version_of: Optional[Callable[[str], str]] = None) -> list:
    """``[(name, version or 'not installed')]`` from package metadata (the backend panel)."""
    version_of = version_of or metadata.version
    versions = []
    for name in names:
        try:
            versions.append((name, version_of(name)))
        except metadata.PackageNotFoundError:
            versions.append((name, "not installed"))
    return versions
