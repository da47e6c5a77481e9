"""`mgr bench --plot`: output tokens/s and TTFT p50 against concurrency, a line per server, model and API.
SVG and a self-contained HTML page (the SVG inline, and the table) are written here with the stdlib;
PNG goes through matplotlib, when it is installed."""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from typing import Any

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
PANELS = (("output_throughput", "output tokens/s"), ("ttft_p50", "TTFT p50 (ms)"))
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 460, 300, 70, 20, 36, 44


def series(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    lines: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        lines.setdefault(f"{row['server']} {row['model']} {row['api']}", []).append(row)
    for points in lines.values():
        points.sort(key=lambda r: r["concurrency"])
    return lines


def _value(row: dict[str, Any], key: str) -> float:
    return float(row["ttft_ms"]["p50"] if key == "ttft_p50" else row[key])


def _nice_top(value: float) -> float:
    if value <= 0:
        return 1.0
    step = 10 ** math.floor(math.log10(value))
    return float(next(m * step for m in (1, 2, 2.5, 5, 10) if m * step >= value))


def _panel(rows: Sequence[dict[str, Any]], key: str, title: str, x0: int) -> list[str]:
    lines = series(rows)
    levels = sorted({int(r["concurrency"]) for r in rows})
    top = _nice_top(max((_value(r, key) for r in rows), default=1.0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(level: int) -> float:  # evenly spaced sweep levels (they are usually powers of 2 or 4)
        return x0 + LEFT + (plot_w * levels.index(level) / (len(levels) - 1) if len(levels) > 1 else plot_w / 2)

    def y(value: float) -> float:
        return TOP + plot_h * (1 - value / top)

    out = [f'<text x="{x0 + WIDTH / 2}" y="20" text-anchor="middle" font-weight="bold">{html.escape(title)}</text>',
           f'<line x1="{x0 + LEFT}" y1="{TOP + plot_h}" x2="{x0 + LEFT + plot_w}" y2="{TOP + plot_h}" stroke="#333"/>',
           f'<line x1="{x0 + LEFT}" y1="{TOP}" x2="{x0 + LEFT}" y2="{TOP + plot_h}" stroke="#333"/>']
    for i in range(5):
        value = top * i / 4
        out.append(f'<line x1="{x0 + LEFT}" y1="{y(value):.1f}" x2="{x0 + LEFT + plot_w}" y2="{y(value):.1f}" '
                   f'stroke="#ddd"/><text x="{x0 + LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end">'
                   f'{value:,.0f}</text>')
    for level in levels:
        out.append(f'<text x="{x(level):.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{level}</text>')
    out.append(f'<text x="{x0 + LEFT + plot_w / 2}" y="{HEIGHT - 8}" text-anchor="middle">concurrency</text>')
    for i, (_, points) in enumerate(lines.items()):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{x(int(p['concurrency'])):.1f},{y(_value(p, key)):.1f}" for p in points)
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        out += [f'<circle cx="{x(int(p["concurrency"])):.1f}" cy="{y(_value(p, key)):.1f}" r="3" fill="{colour}">'
                f'<title>{_value(p, key):,.1f}</title></circle>' for p in points]
    return out


def svg(rows: Sequence[dict[str, Any]]) -> str:
    names = list(series(rows))
    legend_h = 18 * len(names) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * WIDTH}" height="{HEIGHT + legend_h}" '
             f'font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>']
    for index, (key, title) in enumerate(PANELS):
        parts += _panel(rows, key, title, index * WIDTH)
    for i, name in enumerate(names):
        y = HEIGHT + 14 + 18 * i
        parts.append(f'<rect x="{LEFT}" y="{y - 9}" width="14" height="4" fill="{COLOURS[i % len(COLOURS)]}"/>'
                     f'<text x="{LEFT + 20}" y="{y}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def html_page(rows: Sequence[dict[str, Any]]) -> str:
    from .bench import HEADERS, table_row

    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADERS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in table_row(r)) + "</tr>" for r in rows)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>mgr bench</title><style>"
            f"body{{font-family:sans-serif}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;"
            f"padding:2px 6px;text-align:right}}</style></head><body><h1>mgr bench</h1>\n{svg(rows)}\n"
            f"<p>TTFT, ITL and E2E in ms.</p><table><tr>{head}</tr>{body}</table></body></html>\n")


def png(rows: Sequence[dict[str, Any]], path: str) -> None:
    import matplotlib  # type: ignore[import-not-found,unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, points in series(rows).items():
        for axis, (key, _) in zip(axes, PANELS, strict=True):
            axis.plot([p["concurrency"] for p in points], [_value(p, key) for p in points], marker="o", label=name)
    for axis, (_, title) in zip(axes, PANELS, strict=True):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrency")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_plot(path: str, rows: Sequence[dict[str, Any]]) -> None:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".png":
        png(rows, path)
        return
    with open(path, "w", encoding="utf-8") as file:
        file.write(svg(rows) if ext == ".svg" else html_page(rows))
