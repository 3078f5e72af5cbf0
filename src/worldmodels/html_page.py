"""The report as one HTML file to mail or attach: its markdown, images embedded as base64.

Only the subset the report writes is converted, so the page needs no markdown library.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path


def _data_uri(path: Path) -> str:
    mime = "image/gif" if path.suffix == ".gif" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def markdown_to_html(markdown: str, root: Path) -> str:
    """A tiny converter for the subset the report writes: headings, tables, images (embedded,
    read from `root`), paragraphs with **bold** and `code`."""
    body, table = [], []

    def flush_table() -> None:
        if table:
            rows = [r.strip("|").split("|") for r in table if not set(r) <= set("|-")]
            cells = lambda r, tag: "".join(f"<{tag}>{_inline(c.strip())}</{tag}>" for c in r)  # noqa: E731
            body.append("<table><tr>" + cells(rows[0], "th") + "</tr>")
            body.extend("<tr>" + cells(r, "td") + "</tr>" for r in rows[1:])
            body.append("</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](")
            body.append(f'<img alt="{html.escape(alt)}" src="{_data_uri(root / src.rstrip(")"))}">')
        elif line:
            body.append(f"<p>{_inline(line)}</p>")
    flush_table()
    style = "body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}img{max-width:100%}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>World Models report</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"


def _inline(text: str) -> str:
    escaped = html.escape(text)
    parts = escaped.split("**")
    escaped = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = escaped.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
