"""Evaluation results: one ``Row`` per evaluated setting, with the ``Provenance`` of its numbers,
written as a terminal table, results.csv / .md / .json, and a metric-vs-NFE plot."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import PixelDiffusionError
from .files import atomic_write, write_text_atomic

COLUMNS = ("digit_fid", "digit_fid_inf", "fid", "fid_inf", "is", "kid", "precision", "recall",
           "confidence", "class_entropy", "class_accuracy")


@dataclass
class Provenance:
    """How a number was made; printed with every table and saved with every file."""

    extractor: str
    n_samples: int
    reference: str
    reference_n: int
    resize: str
    warnings: list[str] = field(default_factory=list)


@dataclass
class Row:
    """One evaluated setting: what was varied, the NFE spent per image, the metrics, the seconds
    it took (sampling and scoring) and how the numbers were made."""

    setting: dict[str, Any]
    nfe: int
    results: dict[str, float]
    seconds: float
    provenance: Provenance


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """Header and cells: the setting columns, nfe, every metric present, seconds."""
    setting_keys = list(dict.fromkeys(k for r in rows for k in r.setting))
    metric_keys = [c for c in COLUMNS if any(c in r.results for r in rows)]
    header = [*setting_keys, "nfe", *metric_keys, "seconds"]
    cells = [[_fmt(r.setting.get(k, "")) for k in setting_keys] + [str(r.nfe)]
             + [_fmt(r.results.get(k, "")) for k in metric_keys] + [f"{r.seconds:.1f}"]
             for r in rows]
    return header, cells


def describe(p: Provenance) -> str:
    """The provenance as a few lines of text."""
    text = (f"Extractor: {p.extractor}. Samples: {p.n_samples:,} per row. Reference: "
            f"{p.reference} ({p.reference_n:,} images). Resize: {p.resize}.")
    return "\n".join([text, *(f"Warning: {w}" for w in p.warnings)])


def markdown(rows: list[Row]) -> str:
    """A Markdown table followed by how the numbers were made."""
    header, cells = table(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    lines += ["", describe(rows[0].provenance)]
    return "\n".join(lines) + "\n"


def plain_table(rows: list[Row]) -> str:
    """Columns aligned for a terminal."""
    header, cells = table(rows)
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    return "\n".join(lines)


def write_results(rows: list[Row], out_dir: str | Path) -> list[Path]:
    """results.csv, results.md and results.json (with provenance) in ``out_dir``, each written
    atomically."""
    out_dir = Path(out_dir)
    header, cells = table(rows)
    with atomic_write(out_dir / "results.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(cells)
    write_text_atomic(out_dir / "results.md", markdown(rows))
    write_text_atomic(out_dir / "results.json", json.dumps([asdict(r) for r in rows], indent=1))
    return [out_dir / n for n in ("results.csv", "results.md", "results.json")]


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or a PixelDiffusionError saying what to
    install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PixelDiffusionError("--plot needs matplotlib; pip install matplotlib") from None
    return plt


def check_plot_path(path: str | Path) -> str:
    """The image format of a plot path (its suffix, e.g. "png"), or a PixelDiffusionError when
    matplotlib cannot write it; called before the work so a typo costs nothing."""
    path = Path(path)
    kind = path.suffix.lstrip(".").lower()
    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    supported = FigureCanvasBase.get_supported_filetypes()
    if kind not in supported:
        raise PixelDiffusionError(f"cannot write a plot to '{path}'; end its name in one of "
                                  f"{', '.join('.' + k for k in sorted(supported))}")
    return kind


def plot_vs_nfe(rows: list[Row], path: str | Path, metric: str | None = None) -> Path:
    """``metric`` (default: the first of COLUMNS present) against NFE, one line per sampler, as
    an image file (matplotlib, optional)."""
    kind = check_plot_path(path)
    plt = _pyplot()
    metric = metric or next(c for c in COLUMNS if c in rows[0].results)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for sampler in dict.fromkeys(r.setting.get("sampler") for r in rows):
        mine = sorted((r.nfe, r.results[metric]) for r in rows
                      if r.setting.get("sampler") == sampler and metric in r.results)
        ax.plot([m[0] for m in mine], [m[1] for m in mine], marker="o", label=str(sampler))
    ax.set_xscale("log")
    ticks = sorted({r.nfe for r in rows})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("NFE (model calls per image)")
    ax.set_ylabel(metric.replace("_", "-"))
    p = rows[0].provenance
    ax.set_title(f"{metric.replace('_', '-')} vs NFE ({p.n_samples:,} samples, ref "
                 f"{p.reference})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, format=kind)
    plt.close(fig)
    return Path(path)
