"""Self-contained interactive ``report.html``: opens offline from disk, no server, no external URL.

The page embeds the display volumes (CT in the lung window, cluster labels, confidence; uint8 arrays, zlib-compressed
and base64-encoded) and a small plain-JavaScript canvas renderer: axial/coronal slice scroller, overlay on/off per
cluster, opacity, confidence view. The composition table and bar chart are static HTML/SVG written here; the QC
pictures are embedded as base64 PNG. Browsers decompress the volumes with the standard ``DecompressionStream``
(Chrome 80+, Firefox 113+, Safari 16.4+).
"""
from __future__ import annotations

import base64
import html
import json
import re
import zlib

import numpy as np

from . import pages
from .render import DisplayVolumes

REGION_ORDER = ("whole", "right", "left", "upper", "middle", "lower")


def _pack(array: np.ndarray) -> str:
    """uint8 array -> base64 of its zlib-compressed C-order bytes."""
    return base64.b64encode(zlib.compress(np.ascontiguousarray(array, dtype=np.uint8).tobytes(), 1)).decode("ascii")


def _hex(rgb) -> str:
    return "#" + "".join(f"{int(round(float(c) * 255)):02x}" for c in rgb)


def _fmt(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _regions(composition: dict) -> list:
    """Regions of a composition document: the built-in ones in order, then the mask's segments (lobes)."""
    return ([r for r in REGION_ORDER if r in composition["regions"]]
            + [r for r in composition["regions"] if r not in REGION_ORDER])


def composition_table_html(composition: dict) -> str:
    """HTML table: one row per cluster, fraction (%) per region, then whole-lung volume and HU."""
    regions = _regions(composition)
    by_region = {r: {e["label"]: e for e in composition["regions"][r]} for r in regions}
    head = "".join(f"<th>{r} %</th>" for r in regions) + "<th>volume mL</th><th>mean HU</th><th>SD HU</th>"
    rows = []
    labels = sorted({lab for r in regions for lab in by_region[r]})
    for label in labels:
        whole = by_region.get("whole", {}).get(label, {})
        name = next(by_region[r][label]["name"] for r in regions if label in by_region[r])
        cells = "".join(f"<td>{_fmt(100 * by_region[r][label]['fraction']) if label in by_region[r] else '–'}</td>"
                        for r in regions)
        rows.append(f"<tr><td>{label}</td><td>{html.escape(name)}</td>{cells}<td>{_fmt(whole.get('volume_ml'))}</td>"
                    f"<td>{_fmt(whole.get('mean_hu'), 0)}</td><td>{_fmt(whole.get('sd_hu'), 0)}</td></tr>")
    return (f"<table id='composition'><thead><tr><th>label</th><th>cluster</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def composition_bars_svg(composition: dict, width: int = 520, bar_h: int = 22) -> str:
    """SVG stacked bars: one bar per region, segments coloured by cluster, widths = fractions."""
    colours = {c["label"]: _hex(c["color"]) if c.get("color") else "#888888" for c in composition["clusters"]}
    regions = _regions(composition)
    label_w, gap = 70, 6
    parts = []
    for i, region in enumerate(regions):
        y = i * (bar_h + gap)
        parts.append(f"<text x='0' y='{y + bar_h - 6}' class='bar-label'>{region}</text>")
        x = float(label_w)
        for entry in composition["regions"][region]:
            w = entry["fraction"] * (width - label_w)
            if w <= 0:
                continue
            title = html.escape(f"{entry['name']}: {100 * entry['fraction']:.1f} %")
            parts.append(f"<rect x='{x:.2f}' y='{y}' width='{w:.2f}' height='{bar_h}' "
                         f"fill='{colours.get(entry['label'], '#444444')}'><title>{title}</title></rect>")
            x += w
    height = len(regions) * (bar_h + gap)
    return f"<svg id='bars' width='{width}' height='{height}' viewBox='0 0 {width} {height}'>{''.join(parts)}</svg>"


def densitometry_table_html(composition: dict) -> str:
    """HTML table of the densitometry rows of a composition document (empty when it has none)."""
    rows = "".join(
        f"<tr><td>{html.escape(d['region'])}</td><td>{_fmt(d['laa950_pct'])}</td><td>{_fmt(d['haa700_250_pct'])}</td>"
        f"<td>{_fmt(d['mld_hu'], 0)}</td><td>{_fmt(d['perc15_hu'], 0)}</td>"
        f"<td>{_fmt(d.get('laa950_matched_pct'))}</td><td>{_fmt(d.get('perc15_matched_hu'), 0)}</td>"
        f"<td>{_fmt(d['volume_ml'])}</td></tr>"
        for d in composition.get("densitometry", []))
    if not rows:
        return ""
    return ("<h3>Densitometry (CT voxels in the lung mask; noise-matched: as the model reads the scan)</h3>"
            "<table id='densitometry'><thead><tr><th>region</th><th>LAA−950 %</th><th>HAA −700…−250 %</th>"
            "<th>mean HU</th><th>15th percentile HU</th><th>LAA−950 %, noise-matched</th>"
            f"<th>15th percentile HU, noise-matched</th><th>volume mL</th></tr></thead><tbody>{rows}</tbody></table>")


def _payload(dv: DisplayVolumes, clusters: list) -> str:
    data = {
        "shape": [int(n) for n in dv.gray.shape],
        "spacing": float(dv.spacing),
        "clusters": clusters,
        "gray": _pack(dv.gray),
        "labels": _pack(dv.labels),
        "confidence": _pack(dv.confidence),
    }
    return json.dumps(data, sort_keys=True).replace("</", "<\\/")


def build_report(dv: DisplayVolumes, composition: dict, title: str, details: dict | None = None,
                 pictures: dict | None = None, warnings: list | None = None) -> str:
    """The report page as HTML text.

    ``composition``: the parsed ``composition.json`` document (clusters with names and colours, regions);
    ``details``: short facts shown in the header (model id, lung volumes...); ``pictures``: ``{caption: png
    bytes}`` embedded at the end (3D view, patch gallery); ``warnings``: ``analysis.json``'s warnings
    (``{code, message}``), shown in a box above everything else.
    """
    clusters = [{"label": c["label"], "name": c["name"], "color": _hex(c["color"]) if c.get("color") else "#888888"}
                for c in composition["clusters"]]
    toggles = "".join(
        f"<label class='toggle'><input type='checkbox' class='cluster-toggle' data-label='{c['label']}' checked>"
        f"<span class='swatch' style='background:{c['color']}'></span>{html.escape(c['name'])}</label>"
        for c in clusters)
    facts = "".join(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>" for k, v in (details or {}).items())
    figures = "".join(
        f"<figure><img alt='{html.escape(caption)}' src='{pages.png_uri(png)}'>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>" for caption, png in (pictures or {}).items())
    notes = "".join(f"<li><b>{html.escape(w['code'])}</b>: {html.escape(w['message'])}</li>" for w in warnings or [])
    parts = {"TITLE": html.escape(title), "FACTS": facts, "TOGGLES": toggles, "FIGURES": figures,
             "WARNINGS": f"<div class='warnings'><b>Check before use</b><ul>{notes}</ul></div>" if notes else "",
             "TABLE": composition_table_html(composition), "BARS": composition_bars_svg(composition),
             "DENSITOMETRY": densitometry_table_html(composition),
             "DATA": _payload(dv, clusters)}
    # one pass, so text inserted for one placeholder is never scanned for another
    body = re.sub(r"%([A-Z]+)%", lambda m: parts[m.group(1)], _BODY)
    return pages.page(f"LatentHarmonize – {parts['TITLE']}", _STYLE, body, head=_HEAD)


_HEAD = """
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
"""

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1em 2em;background:#fafafa;color:#222}
h1{font-size:1.3em} dl{display:grid;grid-template-columns:max-content auto;gap:0 1em} dt{font-weight:600}
.viewer{display:flex;gap:2em;flex-wrap:wrap;align-items:flex-start}
#view{width:520px;height:auto;image-rendering:pixelated;background:#000;border:1px solid #999}
.controls{display:flex;flex-direction:column;gap:.6em;min-width:260px}
.toggle{display:flex;align-items:center;gap:.4em} .swatch{width:14px;height:14px;display:inline-block;border:1px solid #555}
table{border-collapse:collapse;margin:1em 0} td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
td:nth-child(2){text-align:left} #densitometry td:first-child{text-align:left}
#densitometry td:nth-child(2){text-align:right} .bar-label{font-size:12px}
.tables{display:flex;gap:2em;flex-wrap:wrap;align-items:flex-start} h3{font-size:1em;margin:1em 0 0}
figure{display:inline-block;margin:1em 1em 0 0} figure img{max-width:520px}
#status{color:#a00}
.warnings{border:2px solid #c60;background:#fff4e5;padding:.5em 1em;margin:1em 0;max-width:60em}
"""

_BODY = """
<h1>LatentHarmonize – %TITLE%</h1>
%WARNINGS%<dl>%FACTS%</dl>
<div class="viewer">
 <canvas id="view" width="1" height="1"></canvas>
 <div class="controls">
  <label>View <select id="orientation"><option value="axial">axial</option><option value="coronal">coronal</option></select></label>
  <label>Slice <input type="range" id="slice" min="0" max="0" value="0"> <span id="slice-number"></span></label>
  <label>Overlay opacity <input type="range" id="opacity" min="0" max="100" value="50"></label>
  <label class="toggle"><input type="checkbox" id="confidence"> show confidence instead of clusters</label>
  <fieldset><legend>Clusters</legend>%TOGGLES%</fieldset>
  <div id="status">Loading…</div>
 </div>
</div>
<h2>Composition (% of each region's lung)</h2>
<div class="tables">
<div>%TABLE%
%BARS%</div>
<div>%DENSITOMETRY%</div>
</div>
<h2>Quality control</h2>
%FIGURES%
<script type="application/json" id="lh-data">%DATA%</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("lh-data").textContent);
const [NZ, NY, NX] = DATA.shape;
const state = {orientation: "axial", index: {axial: 0, coronal: 0}, opacity: 0.5, confidence: false, visible: {}};
const lut = new Uint8Array(256 * 3);
for (const c of DATA.clusters) {
  state.visible[c.label] = true;
  for (let k = 0; k < 3; k++) lut[3 * c.label + k] = parseInt(c.color.substr(1 + 2 * k, 2), 16);
}
let gray, labels, confidence;

async function inflate(b64) {
  const bytes = Uint8Array.from(atob(b64), ch => ch.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

function heat(v) {  // confidence 0..255 -> dark blue .. yellow
  const t = v / 255;
  return [Math.round(255 * Math.min(1, Math.max(0, 1.8 * t - 0.5))), Math.round(255 * t), Math.round(255 * (1 - t) * 0.8)];
}

function sliceSize() { return state.orientation === "axial" ? [NX, NY] : [NX, NZ]; }

function voxel(col, row) {  // flat index for canvas pixel (col, row) of the current slice
  const i = state.index[state.orientation];
  if (state.orientation === "axial") return (i * NY + row) * NX + col;
  return ((NZ - 1 - row) * NY + i) * NX + col;  // coronal: superior at the top
}

function draw() {
  const canvas = document.getElementById("view");
  const [w, h] = sliceSize();
  if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(w, h);
  const a = state.opacity;
  for (let row = 0; row < h; row++) {
    for (let col = 0; col < w; col++) {
      const v = voxel(col, row), g = gray[v], lab = labels[v], p = 4 * (row * w + col);
      let r = g, gg = g, b = g;
      if (lab > 0 && state.visible[lab]) {
        const c = state.confidence ? heat(confidence[v]) : [lut[3 * lab], lut[3 * lab + 1], lut[3 * lab + 2]];
        r = (1 - a) * g + a * c[0]; gg = (1 - a) * g + a * c[1]; b = (1 - a) * g + a * c[2];
      }
      img.data[p] = r; img.data[p + 1] = gg; img.data[p + 2] = b; img.data[p + 3] = 255;
    }
  }
  ctx.putImageData(img, 0, 0);
  document.getElementById("slice-number").textContent = (state.index[state.orientation] + 1) + " / " + sliceCount();
}

function sliceCount() { return state.orientation === "axial" ? NZ : NY; }

function syncSlider() {
  const slider = document.getElementById("slice");
  slider.max = String(sliceCount() - 1);
  slider.value = String(state.index[state.orientation]);
}

function middleOfLabels(axis) {  // slice with the most labelled voxels, to open on something useful
  const counts = new Array(axis === "axial" ? NZ : NY).fill(0);
  for (let z = 0; z < NZ; z++) for (let y = 0; y < NY; y++) for (let x = 0; x < NX; x++)
    if (labels[(z * NY + y) * NX + x]) counts[axis === "axial" ? z : y]++;
  return counts.indexOf(Math.max(...counts));
}

async function main() {
  if (typeof DecompressionStream === "undefined") {
    document.getElementById("status").textContent = "This browser is too old to show the slices (no DecompressionStream).";
    return;
  }
  [gray, labels, confidence] = await Promise.all([inflate(DATA.gray), inflate(DATA.labels), inflate(DATA.confidence)]);
  state.index.axial = middleOfLabels("axial");
  state.index.coronal = middleOfLabels("coronal");
  document.getElementById("orientation").addEventListener("change", e => { state.orientation = e.target.value; syncSlider(); draw(); });
  document.getElementById("slice").addEventListener("input", e => { state.index[state.orientation] = Number(e.target.value); draw(); });
  document.getElementById("opacity").addEventListener("input", e => { state.opacity = Number(e.target.value) / 100; draw(); });
  document.getElementById("confidence").addEventListener("change", e => { state.confidence = e.target.checked; draw(); });
  for (const box of document.querySelectorAll(".cluster-toggle"))
    box.addEventListener("change", e => { state.visible[Number(e.target.dataset.label)] = e.target.checked; draw(); });
  syncSlider();
  draw();
  document.getElementById("status").textContent = "";
  document.body.dataset.ready = "1";
}
main().catch(err => { document.getElementById("status").textContent = "Could not show the slices: " + err; throw err; });
</script>
"""
