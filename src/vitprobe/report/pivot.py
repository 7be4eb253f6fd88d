"""The pivot table as data: runs down, read-outs (or datasets) across; written as CSV or a LaTeX tabular.

As CLIP_benchmark's `build` turns result files into one table, `vitprobe report --format csv` turns runs
into one row each: the run, its model and checkpoint, and for every read-out the test top-1 (%), its 95 %
Wilson interval and the health verdict (low-shot: also the std over seeds; a per-layer sweep: the block,
its last). `--pivot datasets --readout R` puts datasets across instead, one row per model (`--label`),
for transfer studies.
"""

from __future__ import annotations

import csv
import io

from vitprobe.report.collect import ReportError
from vitprobe.report.document import short_checkpoint
from vitprobe.report.model import Report, Score


def pivot(
    report: Report, *, by: str = "readouts", readout: str | None = None
) -> tuple[list[str], list[dict]]:
    """(columns, rows) of the pivot; every top-1 comes with its interval and verdict columns."""
    if by == "readouts":
        columns = report.readouts()
        extras = _extras(columns, [(col, r.score(col)) for r in report.runs for col in columns])
        rows = []
        for run in report.runs:
            row: dict = {
                "run": run.label,
                "model": run.provenance.model,
                "checkpoint": short_checkpoint(run),
                "dataset": run.dataset,
                "random_init": run.random_init,
            }
            for col in columns:
                row.update(_cells(col, run.score(col), extras[col]))
            rows.append(row)
        return columns, rows
    if by != "datasets":
        raise ReportError(f"unknown --pivot {by!r}", "use readouts or datasets")
    available = report.readouts()
    if readout is None or readout not in available:
        raise ReportError(
            f"--pivot datasets needs --readout, one of {', '.join(available)}"
            if readout is None
            else f"--readout {readout!r} is in none of the runs (they have {', '.join(available)})",
            "e.g. --pivot datasets --readout abmilp",
        )
    columns = report.datasets
    extras = _extras(columns, [(r.dataset, r.score(readout)) for r in report.runs])
    rows = []
    for group in dict.fromkeys(r.group for r in report.runs):
        mine = {r.dataset: r for r in report.runs if r.group == group}
        first = next(iter(mine.values()))
        row = {
            "run": group,
            "model": first.provenance.model,
            "checkpoint": short_checkpoint(first),
            "readout": readout,
            "random_init": any(r.random_init for r in mine.values()),
        }
        for col in columns:
            row.update(_cells(col, mine[col].score(readout) if col in mine else None, extras[col]))
        rows.append(row)
    return columns, rows


def _extras(columns: list[str], scores: list[tuple[str, Score | None]]) -> dict[str, tuple[str, ...]]:
    """Per column, the extra cells some of its scores have: `std` (low-shot), `block` (a sweep)."""
    out: dict[str, tuple[str, ...]] = {}
    for col in columns:
        mine = [s for c, s in scores if c == col and s is not None]
        out[col] = tuple(
            name
            for name, present in (("std", any(s.std is not None for s in mine)),
                                  ("block", any(s.block is not None for s in mine)))
            if present
        )  # fmt: skip
    return out


def _cells(column: str, score: Score | None, extras: tuple[str, ...] = ()) -> dict:
    cells = {column: None, f"{column} ci_low": None, f"{column} ci_high": None, f"{column} verdict": None}
    cells.update({f"{column} {name}": None for name in extras})
    if score is None:
        return cells
    cells.update({
        column: round(score.top1, 2),
        f"{column} ci_low": round(score.ci[0], 2),
        f"{column} ci_high": round(score.ci[1], 2),
        f"{column} verdict": score.verdict,
    })  # fmt: skip
    if "std" in extras:
        cells[f"{column} std"] = None if score.std is None else round(score.std, 2)
    if "block" in extras:
        cells[f"{column} block"] = score.block
    return cells


def to_csv(report: Report, *, by: str = "readouts", readout: str | None = None) -> str:
    _, rows = pivot(report, by=by, readout=readout)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["run"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(c, c) for c in str(text))


def to_latex(report: Report, *, by: str = "readouts", readout: str | None = None) -> str:
    """A booktabs tabular: the best clean top-1 per column in bold, flagged numbers marked †."""
    columns, rows = pivot(report, by=by, readout=readout)
    best = {}
    for col in columns:
        clean = [r[col] for r in rows if r[col] is not None and r[f"{col} verdict"] == "ok"]
        best[col] = max(clean) if clean else None
    lines = [
        "% vitprobe report --format latex (needs \\usepackage{booktabs})",
        "\\begin{tabular}{l" + "r" * len(columns) + "}",
        "\\toprule",
        " & ".join(["run", *(latex_escape(c) for c in columns)]) + " \\\\",
        "\\midrule",
    ]
    flagged = spread = swept = False
    for row in rows:
        cells = [latex_escape(row["run"]) + (" (random weights)" if row["random_init"] else "")]
        for col in columns:
            value = row[col]
            if value is None:
                cells.append("--")
                continue
            text = f"{value:.1f}"
            if value == best[col] and row[f"{col} verdict"] == "ok":
                text = f"\\textbf{{{text}}}"
            if row.get(f"{col} std") is not None:
                text += f"\\,$\\pm$\\,{row[f'{col} std']:.1f}"
                spread = True
            if row.get(f"{col} block") is not None:
                text += f"$_{{{row[f'{col} block']}}}$"
                swept = True
            if row[f"{col} verdict"] != "ok":
                text += "$^\\dagger$"
                flagged = True
            low, high = row[f"{col} ci_low"], row[f"{col} ci_high"]
            cells.append(f"{text}\\,{{\\scriptsize[{low:.1f}, {high:.1f}]}}")
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    what = f"{latex_escape(rows[0]['readout'])} " if by == "datasets" and rows else ""
    lines.append(
        f"% test top-1 {what}(%) [95 % Wilson interval]; bold: best clean value per column"
        + (
            "; $^\\dagger$: probe-health warning or optimistic selection, not a clean number"
            if flagged
            else ""
        )
        + ("; ± std over low-shot seeds" if spread else "")
        + ("; subscript: the block of a per-layer sweep (its last)" if swept else "")
    )
    return "\n".join(lines) + "\n"
