"""The one builder of the HTML report pages (``analyze``, ``evaluate``, ``survival``): a self-contained page with
its own style, plain tables and PNG pictures embedded as data URIs, so a report opens offline from disk."""
from __future__ import annotations

import base64
import html
from typing import List


def page(title: str, style: str, body: str, head: str = "") -> str:
    """A whole HTML document; ``title`` is HTML already (escape user text first), ``head`` extra head elements."""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{head}<title>{title}</title>\n'
            f"<style>{style}</style></head>\n<body>{body}</body></html>\n")


def table(rows: List[List[str]], head: List[str]) -> str:
    """A plain table: ``head`` is text (escaped here), the cells of ``rows`` are HTML."""
    cells = "".join(f"<th>{html.escape(x)}</th>" for x in head)
    body = "".join("<tr>" + "".join(f"<td>{x}</td>" for x in r) + "</tr>" for r in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def png_uri(png: bytes) -> str:
    """A PNG as a data URI for ``<img src>``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
