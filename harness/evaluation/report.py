"""A self-contained evaluation report: tables, figures, text and metrics in one folder.

``Report(root, title)`` collects content by section (sections appear in the order first used) and ``write()``
produces, under ``root``:

- ``index.html``: one HTML file with inline CSS and relative links to the PNG/GIF files, openable offline;
- ``results.md`` and ``results.json``: the same tables and metrics for reading and for machines;
- ``tables/<name>.csv|.json|.md`` for every table (written as soon as it is added).

Metrics that could not be computed (e.g. LPIPS or FID without their backbone weights) are listed in a visible
note rather than silently left out. A banner (``add_banner``, e.g. "Model not ready: ..." from the model folder's
readiness verdict) stands in red at the top of every page and in ``results.json``. ``check_report`` re-parses
the HTML and lists referenced files that are missing. Every file is written atomically (temporary file in the
same folder, then ``os.replace``).
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; } th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-weight: bold; padding-bottom: 4px; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; vertical-align: top; max-width: 100%; }
figure img { max-width: 100%; border: 1px solid #ddd; } figcaption { font-size: 0.85em; color: #444; }
.note { background: #fff6e0; border-left: 4px solid #e0a000; padding: 0.5em 1em; margin: 1em 0; }
.banner { background: #fde8e8; border: 2px solid #c00000; color: #900000; font-weight: bold; padding: 0.6em 1em; }
code { background: #f4f4f4; padding: 0 3px; } .meta { color: #666; font-size: 0.85em; }
"""


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _plain(value: Any) -> Any:
    """JSON-safe copy: numpy / torch scalars and arrays to Python numbers and lists, NaN/inf to None."""
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def format_value(value: Any) -> str:
    """Numbers for humans: integers as they are, floats to 4 significant digits, missing as 'n/a'."""
    value = _plain(value)
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e6:
            return str(int(value))
        return f"{value:.4g}"
    if isinstance(value, list) and value and all(v is None or isinstance(v, (int, float)) for v in value):
        return "[" + ", ".join(format_value(v) for v in value) + "]"  # e.g. an interval (low, high)
    return str(value)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    """Union of the rows' keys in order of first appearance."""
    return list(dict.fromkeys(key for row in rows for key in row))


def _markdown_table(rows: list[dict[str, Any]], caption: str = "") -> str:
    cols = _columns(rows)
    lines = [f"**{caption}**", ""] if caption else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(format_value(row.get(c)).replace("|", "\\|") for c in cols) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _html_table(rows: list[dict[str, Any]], caption: str) -> str:
    cols = _columns(rows)
    out = ["<table>", f"<caption>{html.escape(caption)}</caption>" if caption else "",
           "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"]
    for row in rows:
        cells = []
        for c in cols:
            value = _plain(row.get(c))
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            opening = '<td class="num">' if numeric else "<td>"
            cells.append(f"{opening}{html.escape(format_value(value))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _inline_markdown(text: str) -> str:
    """Escape, then render `code`, **bold** and *italic* spans."""
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"(?<!\*)\*([^*]+)\*(?!\*)", r"<em>\1</em>", text)


_BULLET = re.compile(r"^\s*[-*] ")


def markdown_to_html(text: str) -> str:
    """The small subset of Markdown the report's prose uses: headings, bullet lists, paragraphs, inline spans."""
    blocks = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = block.splitlines()
        if all(_BULLET.match(line) for line in lines):
            texts = [_inline_markdown(_BULLET.sub("", line)) for line in lines]
            items = "".join(f"<li>{item}</li>" for item in texts)
            blocks.append(f"<ul>{items}</ul>")
        elif len(lines) == 1 and (heading := re.match(r"(#{1,4})\s+(.*)", lines[0])):
            level = min(6, len(heading.group(1)) + 2)  # under the section's own <h2>
            blocks.append(f"<h{level}>{_inline_markdown(heading.group(2))}</h{level}>")
        elif block.strip():
            blocks.append(f"<p>{_inline_markdown(' '.join(line.strip() for line in lines))}</p>")
    return "\n".join(blocks)


@dataclass
class _Block:
    kind: str  # "text" | "figure" | "table"
    payload: dict[str, Any] = field(default_factory=dict)


class Report:
    """Collects the evaluation's tables, figures, text and metrics, and writes them as HTML, Markdown and JSON."""

    def __init__(self, root: str | Path, title: str) -> None:
        self.root = Path(root)
        self.title = title
        self.root.mkdir(parents=True, exist_ok=True)
        self.sections: dict[str, list[_Block]] = {}
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self.metrics: dict[str, Any] = {}
        self.not_computed: dict[str, str] = {}
        self.banners: list[str] = []

    def _section(self, name: str) -> list[_Block]:
        return self.sections.setdefault(name, [])

    def add_text(self, section: str, text: str) -> None:
        """A paragraph (Markdown subset: headings, bullets, `code`, **bold**) in ``section``."""
        self._section(section).append(_Block("text", {"text": text}))

    def add_table(self, name: str, rows: list[dict[str, Any]], caption: str = "", section: str = "Results") -> Path:
        """A table of rows (dicts; columns = union of keys); writes ``tables/<name>.csv|.json|.md`` now."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"table name {name!r} must be a plain file name (letters, digits, _ . -)")
        if name in self.tables:
            raise ValueError(f"table {name!r} was already added to this report")
        rows = [_plain(dict(row)) for row in rows]
        folder = self.root / "tables"
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=_columns(rows), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        _atomic_write_text(folder / f"{name}.csv", buffer.getvalue())
        _atomic_write_text(folder / f"{name}.json", json.dumps(rows, indent=2))
        _atomic_write_text(folder / f"{name}.md", _markdown_table(rows, caption))
        self.tables[name] = rows
        self._section(section).append(_Block("table", {"name": name, "caption": caption}))
        return folder / f"{name}.csv"

    def add_figure(self, path: str | Path, caption: str = "", section: str = "Figures") -> Path:
        """A PNG/GIF figure; a file outside the report folder is copied into ``figures/`` so links stay relative."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"report figure {path} does not exist")
        root = self.root.resolve()
        if not path.resolve().is_relative_to(root):
            target = self.root / "figures" / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".tmp-{target.name}")
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
            path = target
        relative = path.resolve().relative_to(root).as_posix()
        self._section(section).append(_Block("figure", {"path": relative, "caption": caption}))
        return path

    def add_metrics(self, metrics: dict[str, Any], prefix: str = "") -> None:
        """Scalar metrics (shown in a 'Metrics' table and saved in results.json); ``prefix`` namespaces them."""
        self.metrics.update({f"{prefix}{key}": _plain(value) for key, value in metrics.items()})

    def add_banner(self, text: str) -> None:
        """A warning that stands above everything else (e.g. ``Model not ready: <what is missing>``)."""
        self.banners.append(text)

    def add_not_computed(self, metric: str, reason: str) -> None:
        """Record that ``metric`` was not computed and why (e.g. its backbone weights are absent)."""
        self.not_computed[metric] = reason

    # -- output ----------------------------------------------------------------------------------------------

    def _render_block(self, block: _Block) -> str:
        if block.kind == "text":
            return markdown_to_html(block.payload["text"])
        if block.kind == "table":
            return _html_table(self.tables[block.payload["name"]], block.payload["caption"])
        src, caption = block.payload["path"], block.payload["caption"]
        return (f'<figure><a href="{html.escape(src)}"><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
                f"</a><figcaption>{html.escape(caption)}</figcaption></figure>")

    def _not_computed_note(self) -> str:
        items = "".join(f"<li><strong>{html.escape(m)}</strong>: {html.escape(r)}</li>"
                        for m, r in self.not_computed.items())
        return f'<div class="note"><strong>Metrics not computed</strong><ul>{items}</ul></div>'

    def render_html(self) -> str:
        """The full ``index.html`` text."""
        created = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
                 f"<title>{html.escape(self.title)}</title><style>{_STYLE}</style></head><body>",
                 f"<h1>{html.escape(self.title)}</h1>", f'<p class="meta">written {created}</p>']
        parts += [f'<div class="banner" role="alert">{html.escape(text)}</div>' for text in self.banners]
        if self.not_computed:
            parts.append(self._not_computed_note())
        if self.metrics:
            parts += ["<h2>Metrics</h2>", _html_table([{"metric": k, "value": v} for k, v in self.metrics.items()], "")]
        for section, blocks in self.sections.items():
            parts.append(f"<h2>{html.escape(section)}</h2>")
            parts += [self._render_block(block) for block in blocks]
        parts.append("</body></html>")
        return "\n".join(parts)

    def render_markdown(self) -> str:
        """``results.md``: metrics, notes and tables (figures as links)."""
        lines = [f"# {self.title}", ""]
        lines += [line for text in self.banners for line in (f"> **{text}**", "")]
        if self.not_computed:
            lines += ["**Metrics not computed:**", ""]
            lines += [f"- {m}: {r}" for m, r in self.not_computed.items()] + [""]
        if self.metrics:
            lines += ["## Metrics", "", _markdown_table([{"metric": k, "value": v} for k, v in self.metrics.items()])]
        for section, blocks in self.sections.items():
            lines += [f"## {section}", ""]
            for block in blocks:
                if block.kind == "text":
                    lines += [block.payload["text"], ""]
                elif block.kind == "table":
                    lines += [_markdown_table(self.tables[block.payload["name"]], block.payload["caption"])]
                else:
                    lines += [f"![{block.payload['caption']}]({block.payload['path']})", ""]
        return "\n".join(lines)

    def write(self) -> Path:
        """Write ``index.html``, ``results.md`` and ``results.json``; returns the path of ``index.html``."""
        figures = [dict(block.payload, section=section) for section, blocks in self.sections.items()
                   for block in blocks if block.kind == "figure"]
        results = {"title": self.title, "banners": self.banners, "metrics": self.metrics,
                   "not_computed": self.not_computed,
                   "tables": self.tables, "figures": figures}
        _atomic_write_text(self.root / "results.json", json.dumps(_plain(results), indent=2))
        _atomic_write_text(self.root / "results.md", self.render_markdown())
        index = self.root / "index.html"
        _atomic_write_text(index, self.render_html())
        return index


class _LinkCollector(HTMLParser):
    """Collects the local files an HTML page refers to (src / href of img, a, link, script, source)."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                parts = urlsplit(value)
                if not parts.scheme and not parts.netloc and parts.path:  # skip http:, data:, mailto:, #anchors
                    self.links.append(unquote(parts.path))


def check_report(index_html: str | Path) -> list[str]:
    """Referenced local files of ``index_html`` that do not exist (relative to its folder); [] when complete."""
    index_html = Path(index_html)
    if not index_html.is_file():
        raise FileNotFoundError(f"report page {index_html} does not exist")
    collector = _LinkCollector()
    collector.feed(index_html.read_text(encoding="utf-8"))
    collector.close()
    missing = [link for link in dict.fromkeys(collector.links) if not (index_html.parent / link).is_file()]
    return missing
