"""Renderers: the document model → a self-contained HTML page, Markdown, or a GitHub job summary."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping

from vitprobe.report.document import (
    Alarm,
    Cell,
    Document,
    FigureBlock,
    Glossary,
    Heading,
    Items,
    Table,
    Text,
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1150px;
color:#1b1f24;padding:0 1rem}
h1{font-size:1.6rem}h2{margin-top:2rem;border-bottom:1px solid #d0d7de;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
caption{caption-side:bottom;text-align:left;font-size:.8rem;color:#57606a;padding-top:.3rem}
th,td{border:1px solid #d0d7de;padding:.3rem .5rem;text-align:left;vertical-align:top;overflow-wrap:anywhere}
.scroll{overflow-x:auto;max-width:100%}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.flag{background:#fff1e5}td small{display:block;color:#57606a;font-size:.75rem}
.warn{background:#fff1e5;border:2px solid #d1242f;color:#8c1d18;padding:.8rem 1rem;font-weight:600;
margin:1rem 0}
figure{margin:.8rem 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85rem;color:#57606a}.note{color:#57606a;font-size:.9rem}
dl{font-size:.85rem}dt{font-family:monospace;font-weight:600}dd{margin:0 0 .4rem 1.5rem}
"""


def render_html(doc: Document) -> str:
    """One self-contained page: figures embedded as data: URIs, every text escaped, no script."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(doc.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(doc.title)}</h1>",
    ]
    for block in doc.blocks:
        if isinstance(block, Heading):
            anchor = f' id="{e(block.id)}"' if block.id else ""
            parts.append(f"<h{block.level}{anchor}>{e(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            parts.append(f'<p class="note">{e(block.text)}</p>' if block.note else f"<p>{e(block.text)}</p>")
        elif isinstance(block, Alarm):
            anchor = f' id="{e(block.id)}"' if block.id else ""
            parts.append(f'<div class="warn"{anchor}>{e(block.text)}</div>')
        elif isinstance(block, Table):
            parts.append(_html_table(block))
        elif isinstance(block, FigureBlock):
            f = block.figure
            data = base64.b64encode(f.data).decode("ascii")
            parts.append(
                f'<figure><img src="data:{f.mime};base64,{data}" alt="{e(f.title)}">'
                f"<figcaption>{e(f.title)}</figcaption></figure>"
            )
        elif isinstance(block, Items):
            anchor = f' id="{e(block.id)}"' if block.id else ""
            parts.append(f"<ul{anchor}>" + "".join(f"<li>{e(i)}</li>" for i in block.items) + "</ul>")
        elif isinstance(block, Glossary):
            parts.append(
                "<dl>" + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in block.items) + "</dl>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_table(t: Table) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in t.header)

    def cell(c: Cell) -> str:
        classes = " ".join(x for x, on in (("num", c.numeric), ("flag", c.flag)) if on)
        css = f' class="{classes}"' if classes else ""
        sub = f"<small>{e(c.sub)}</small>" if c.sub else ""
        return f"<td{css}>{e(c.text)}{sub}</td>"

    body = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in t.rows)
    return (
        f'<div class="scroll"><table id="{e(t.id)}"><caption>{e(t.caption)}</caption><thead><tr>{head}</tr>'
        f"</thead><tbody>{body}</tbody></table></div>"
    )


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> str:
    def cell(c: Cell) -> str:
        return _md(c.text) + (f"<br><sub>{_md(c.sub)}</sub>" if c.sub else "")

    lines = ["| " + " | ".join(_md(h) for h in t.header) + " |"]
    lines.append("|" + "|".join("---" for _ in t.header) + "|")
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines) + f"\n\n*{_md(t.caption)}*"


def render_markdown(
    doc: Document, figure_paths: Mapping[str, str] | None = None, *, github: bool = False
) -> str:
    """Markdown; figures referenced by relative path (`figure_paths`: figure name → path), captioned.

    With `github`, the compact job-summary flavour: warnings as GitHub alert blocks, a smaller title.
    """
    paths = figure_paths or {}
    out = [f"{'###' if github else '#'} {doc.title}", ""]
    for block in doc.blocks:
        if isinstance(block, Heading):
            level = block.level + (2 if github else 0)
            out += ["#" * level + " " + block.text, ""]
        elif isinstance(block, Text):
            out += [f"<sub>{block.text}</sub>" if github and block.note else block.text, ""]
        elif isinstance(block, Alarm):
            out += ([f"> [!WARNING]\n> {block.text}"] if github else [f"> **{block.text}**"]) + [""]
        elif isinstance(block, Table):
            out += [_md_table(block), ""]
        elif isinstance(block, FigureBlock):
            f = block.figure
            if f.name in paths:
                out += [f"![{_md(f.title)}]({paths[f.name]})", "", f"*{_md(f.title)}*", ""]
        elif isinstance(block, Items):
            out += [f"- {i}" for i in block.items] + [""]
        elif isinstance(block, Glossary):
            out += [f"- `{k}`: {v}" for k, v in block.items] + [""]
    return "\n".join(out).rstrip() + "\n"
