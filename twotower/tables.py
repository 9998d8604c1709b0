"""Result tables as Markdown (what the README and the commands print) and CSV (what scripts read)."""
from __future__ import annotations

import csv
import io
import math
from typing import Callable, Mapping, Sequence


def cell(value) -> str:
    """A table cell: '–' for nothing, floats to 4 decimals (1 from 10 on), '|' escaped."""
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str], headers: Sequence[str] | None = None,
                   fmt: Callable[[object], str] = cell) -> str:
    """One row per mapping, the `columns` of each (missing: '–'), under `headers` (default: the column names)."""
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|---" * len(headers) + "|"]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def csv_table(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    """CSV with a header row; floats as repr, so they read back equal."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def metrics_table(rows: Mapping[str, Mapping[str, float]], ks: Sequence[int]) -> str:
    """One row per system/split ({label: {"hr@10": x, ...}}), HR/NDCG/MRR at each cut-off."""
    names = [f"{m}@{k}" for k in ks for m in ("hr", "ndcg", "mrr")]
    return markdown_table([{"": label, **metrics} for label, metrics in rows.items()], ["", *names],
                          ["", *(n.upper() for n in names)], fmt=lambda v: v if isinstance(v, str) else f"{v:.4f}")
