"""report.html in a real headless browser: loads offline without errors, and the controls change the drawing.

Needs Debian's chromium (/usr/bin/chromium) and the playwright package; skipped without them unless
LH_REQUIRE_BROWSER=1 (CI), where a missing browser is a failure.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from latentharmonize.composition import composition_table, composition_to_json
from latentharmonize.render import display_volumes
from latentharmonize.report import build_report

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
NAMES = {1: "normal", 2: "dense", 3: "emphysema-like </script>"}
COLORS = {1: (0.0, 0.45, 0.7), 2: (0.9, 0.6, 0.0), 3: (0.8, 0.47, 0.65)}


def _browser_or_skip():
    required = os.environ.get("LH_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            pytest.fail("LH_REQUIRE_BROWSER=1 but the playwright package is not installed")
        pytest.skip("playwright is not installed")
    if not shutil.which(CHROMIUM):
        if required:
            pytest.fail(f"LH_REQUIRE_BROWSER=1 but {CHROMIUM} is missing (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is missing")
    return sync_playwright


def _scan():
    zz, yy, xx = np.mgrid[:24, :40, :48]
    lungs = np.zeros(zz.shape, np.uint8)
    lungs[((xx - 13) / 10.0) ** 2 + ((yy - 20) / 15.0) ** 2 + ((zz - 12) / 10.0) ** 2 < 1] = 1
    lungs[((xx - 35) / 10.0) ** 2 + ((yy - 20) / 15.0) ** 2 + ((zz - 12) / 10.0) ** 2 < 1] = 2
    labels = np.where(lungs > 0, 1 + (zz // 5 + xx // 12) % 3, 0).astype(np.uint8)
    hu = np.where(lungs > 0, -850 + 40 * (xx % 5), 40).astype(np.int16)
    confidence = np.where(lungs > 0, (yy / 40.0), 0).astype(np.float32)

    def img(a):
        i = sitk.GetImageFromArray(a)
        i.SetSpacing((2.0, 2.0, 4.0))
        return i
    return img(hu), img(labels), img(confidence), img(lungs)


@pytest.fixture(scope="module")
def report_file(tmp_path_factory):
    ct, labels, confidence, lungs = _scan()
    table = composition_table(labels, ct, lungs, NAMES)
    composition = json.loads(composition_to_json(table, NAMES, COLORS, model_id="test-model"))
    dv = display_volumes(ct, labels, confidence, lungs, max_size=48)
    png = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4"
           b"\x89\x00\x00\x00\rIDATx\x9cc\xf8\xcf\xc0\xf0\x1f\x00\x05\x00\x01\xff\x89\x99=\x1d\x00\x00\x00\x00IEND\xaeB`\x82")
    text = build_report(dv, composition, "scan <1>", {"model": "test-model"}, {"3D view": png})
    path = tmp_path_factory.mktemp("report") / "report.html"
    path.write_text(text, encoding="utf-8")
    return path


def test_report_is_self_contained(report_file):
    text = report_file.read_text(encoding="utf-8")
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:|//)", text), "the report must not load anything from outside"
    assert "http://" not in text.replace("http://teem", "") and "https://" not in text
    assert text.count("</script>") == 2  # names are escaped inside the embedded data
    assert "scan &lt;1&gt;" in text and "emphysema-like &lt;/script&gt;" in text


def test_controls_change_the_canvas(report_file):
    sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            problems = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            requests = []
            page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("file:", "data:")) else None)
            page.goto(report_file.as_uri())
            page.wait_for_selector("body[data-ready='1']", timeout=20000)

            def pixels():
                return page.evaluate("""() => { const c = document.getElementById('view');
                    return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data).join(','); }""")

            start = pixels()
            assert len(set(start.split(","))) > 3, "the first slice should show the CT and overlay"
            page.eval_on_selector("#slice", "e => { e.value = Number(e.value) + 3; e.dispatchEvent(new Event('input')); }")
            moved = pixels()
            assert moved != start
            page.uncheck(".cluster-toggle[data-label='1']")
            toggled = pixels()
            assert toggled != moved
            page.eval_on_selector("#opacity", "e => { e.value = 90; e.dispatchEvent(new Event('input')); }")
            opaque = pixels()
            assert opaque != toggled
            page.check("#confidence")
            assert pixels() != opaque
            page.select_option("#orientation", "coronal")
            size = page.evaluate("() => [document.getElementById('view').width, document.getElementById('view').height]")
            assert size[1] != size[0] or pixels() != opaque
            rows = page.eval_on_selector_all("#composition tbody tr", "rows => rows.length")
            assert rows == 3
            assert problems == [], problems
            assert requests == [], requests
        finally:
            browser.close()
