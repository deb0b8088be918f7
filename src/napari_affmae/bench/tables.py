"""Plain-text tables for the terminal output of the ``affmae bench`` commands, and their ``--out`` check."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded with spaces: the first left-aligned, the others right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells: Sequence[Any]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def stat_text(stat: dict[str, Any], digits: int = 3) -> str:
    """``mean ± std`` of an `em_protocol.summarise` result (the mean alone for one value, "–" for none)."""
    if stat["mean"] is None:
        return "–"
    return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["n"] > 1 else "")


def refuse_markdown_out(out: Path | None) -> bool:
    """True, after an ``error:`` line on stderr, when ``--out`` names a Markdown page: the benchmarks
    write their results as JSON."""
    if out is not None and out.suffix.lower() == ".md":
        sys.stderr.write(f"error: --out writes the results as JSON, not a Markdown page ({out}); name a .json file\n")
        return True
    return False
