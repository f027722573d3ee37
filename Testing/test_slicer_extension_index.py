"""The Extensions Index checks, applied to this repository as far as they can run without network access.

The checks are those of ``scripts/check_description_files.py`` in Slicer/ExtensionsIndex at commit
07f1d1b2781c7dd9f6e2a9f5521b3ed43631724c (2026-08-07): the catalog entry ``<Extension>.json`` (schema reference,
category, scm_url, LF line endings, build dependencies), the top-level ``CMakeLists.txt`` (``project()`` name equal
to the extension name, ``EXTENSION_ICONURL`` and ``EXTENSION_SCREENSHOTURLS`` with the checker's own regular
expressions, each an http(s) URL of a .png/.jpg/.gif) and a licence file in the repository root. The checker also
downloads the URLs and the schema and asks GitHub for the repository's topics; those steps need the public
repository, which does not exist yet. Here each URL must instead name a picture that is in this repository.
"""
from __future__ import annotations

import json
import re
import urllib.parse as urlparse
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTENSION = "LatentHarmonize"
CATALOG = ROOT / f"{EXTENSION}.json"
CMAKE = ROOT / "CMakeLists.txt"
# check_description_files.py: LICENSE_FILE names, ACCEPTED_EXTENSION_CATEGORIES (the subset near this extension),
# the repository-name prefixes and the two URL patterns, copied verbatim
LICENSE_FILE_NAMES = ["LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt"]
ACCEPTED_CATEGORIES = {"Analysis", "Quantification", "Segmentation", "Chest Imaging Platform", "Utilities"}
REPOSITORY_PREFIXES = ["Slicer", "Slicer-", "Slicer_", "SlicerExtension-", "SlicerExtension_"]
ICON_URL_PATTERN = r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)'
SCREENSHOT_URLS_PATTERN = r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)'
PROJECT_PATTERN = r'project\s*\(\s*([^\s\)\n\r]+)'
# Catalog entry schema v1.0.1/v1.0.2 (Slicer's Schemas/slicer-extension-catalog-entry-schema-v1.0.*.json)
CATALOG_REQUIRED = {"$schema", "category", "scm_url"}
CATALOG_ALLOWED = CATALOG_REQUIRED | {"scm_revision", "scm_type", "build_dependencies", "build_subdirectory",
                                      "enabled", "tier"}
RAW_URL = re.compile(r"^https://raw\.githubusercontent\.com/([\w.-]+)/([\w.-]+)/([\w.-]+)/(.+)$")


def _cmake() -> str:
    return CMAKE.read_text(encoding="utf-8")


def _cmake_value(name: str) -> str:
    m = re.search(rf'set\({name}\s+"([^"]*)"\)', _cmake())
    assert m, f"{name} is not set in CMakeLists.txt"
    return m.group(1)


def _catalog() -> dict:
    return json.loads(CATALOG.read_text(encoding="utf-8"))


def test_catalog_entry_is_valid():
    assert b"\r" not in CATALOG.read_bytes(), "the index requires LF line endings"
    entry = _catalog()
    assert CATALOG_REQUIRED <= set(entry) <= CATALOG_ALLOWED
    assert re.fullmatch(r"https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/"
                        r"slicer-extension-catalog-entry-schema-v1\.0\.[12]\.json#?", entry["$schema"])
    assert entry["category"] in ACCEPTED_CATEGORIES and entry["category"] == _cmake_value("EXTENSION_CATEGORY")
    url = urlparse.urlsplit(entry["scm_url"])
    assert url.scheme in ("git", "https") and url.netloc == "github.com"
    repo = url.path.strip("/").split("/")[-1]
    assert any(repo.startswith(p) for p in REPOSITORY_PREFIXES), "the repository name must start with 'Slicer'"
    assert not EXTENSION.lower().startswith("slicer"), "the extension name must not start with 'Slicer'"
    assert isinstance(entry.get("tier", 1), int) and 1 <= entry.get("tier", 1) <= 5


def test_catalog_build_dependencies_repeat_the_extension_depends():
    """The index builds dependencies from the catalog entry, Slicer from CMakeLists.txt: both must list PyTorch."""
    assert _catalog()["build_dependencies"] == _cmake_value("EXTENSION_DEPENDS").split() == ["PyTorch"]
    assert _catalog()["build_subdirectory"] == "."


def test_cmakelists_passes_the_index_content_check():
    text = _cmake()
    assert re.findall(PROJECT_PATTERN, text, re.I | re.M)[0].strip("\"'") == EXTENSION
    icons = re.findall(ICON_URL_PATTERN, text, re.I | re.M)
    screenshots = re.findall(SCREENSHOT_URLS_PATTERN, text, re.I | re.M)
    assert len(icons) == 1 and len(screenshots) == 1, "the index reads these with exactly these patterns"
    for url in [icons[0].strip()] + screenshots[0].split():
        assert url.startswith("http") and url.lower().endswith((".png", ".jpg", ".jpeg", ".gif"))


def test_every_url_names_one_repository_and_a_picture_the_product_made():
    """Icon and screenshot are raw URLs of files in this repository, all of one owner/repository (the placeholder
    owner is replaced in one go on submission); the screenshot is analyze's QC montage kept in Resources/."""
    repo_url = _catalog()["scm_url"].rstrip("/")
    owner_repo = urlparse.urlsplit(repo_url).path.strip("/")
    assert _cmake_value("EXTENSION_HOMEPAGE").startswith(repo_url)
    screenshots = _cmake_value("EXTENSION_SCREENSHOTURLS").split()
    assert screenshots, "EXTENSION_SCREENSHOTURLS is empty"
    for url in [_cmake_value("EXTENSION_ICONURL")] + screenshots:
        m = RAW_URL.match(url)
        assert m and f"{m.group(1)}/{m.group(2)}" == owner_repo and m.group(3) == _catalog()["scm_revision"], url
        picture = ROOT / m.group(4)
        assert picture.is_file(), f"{url} names {m.group(4)}, which is not in the repository"
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [RAW_URL.match(u).group(4) for u in screenshots] == ["Resources/analysis_overlay.png"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "Resources/analysis_overlay.png" in readme and "qc_montage.png" in readme  # documented as analyze output


def test_license_file_is_the_projects_apache_license():
    found = [n for n in LICENSE_FILE_NAMES if (ROOT / n).is_file()]
    assert found, "the index requires a licence file in the repository root"
    text = (ROOT / found[0]).read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")


CONTRIBUTOR = re.compile(r"^[A-Z][\w'-]+(?: [A-Z][\w'-]+)+ \([^()]+\)$")


def _module_contributors() -> list:
    source = (ROOT / "LatentHarmonize" / "LatentHarmonize.py").read_text(encoding="utf-8")
    return json.loads(re.search(r"self\.parent\.contributors = (\[.*?\])", source).group(1))


@pytest.mark.parametrize("where", ["cmake", "module"])
def test_contributors_are_firstname_lastname_org(where):
    names = (_cmake_value("EXTENSION_CONTRIBUTORS").split(", ") if where == "cmake" else _module_contributors())
    assert names and all(CONTRIBUTOR.match(n) for n in names), names
    assert set(names) == set(_module_contributors())


def test_description_is_one_line():
    description = _cmake_value("EXTENSION_DESCRIPTION")
    assert "\n" not in description and len(description) <= 120 and description.endswith(".")
