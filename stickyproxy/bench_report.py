"""The bench's reports: a text table, and an HTML page with inline SVG charts.

The page needs no script and no network: the charts are drawn here as SVG, and the
template (``static/bench_report.html``) carries its own style.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from importlib.resources import files
from string import Template

from stickyproxy.bench_results import OptionResult

GOOD = "#2f9e44"
BAD = "#d9480f"
NEUTRAL = "#4c6ef5"
LATENCY_COLOURS = {"p50": "#74c0fc", "p90": "#4c6ef5", "p99": "#364fc7"}

#: width of the horizontal charts, and of the label column on their left
WIDTH = 880
LABEL = 110

Column = tuple[str, Callable[[OptionResult], str]]


def _columns(results: Sequence[OptionResult]) -> list[Column]:
    columns: list[Column] = [
        ("option", lambda r: r.option),
        ("sessions", lambda r: str(r.sessions)),
        ("drift", lambda r: str(r.drift_sessions)),
        ("401", lambda r: str(r.unauthorized_after_login)),
        ("ghosts", lambda r: str(r.ghost_files)),
        ("requests", lambda r: str(r.requests)),
        ("errors", lambda r: str(r.errors)),
        ("rps", lambda r: f"{r.rps:.0f}"),
        ("p50 ms", lambda r: f"{r.p50_ms:.1f}"),
        ("p99 ms", lambda r: f"{r.p99_ms:.1f}"),
        ("max/mean", lambda r: f"{r.max_over_mean:.2f}"),
    ]
    if any(result.killed is not None for result in results):
        columns += [
            ("killed", lambda r: r.killed or "-"),
            ("failover errors", lambda r: str(r.failover_errors)),
            ("re-pinned", lambda r: str(r.repinned_sessions)),
        ]
    return columns


def render_table(results: Sequence[OptionResult]) -> str:
    """Return the results as an aligned text table, one row per option."""
    columns = _columns(results)
    rows = [[name for name, _ in columns]]
    rows += [[cell(result) for _, cell in columns] for result in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]

    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [
            text.rjust(width) for text, width in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _html_table(results: Sequence[OptionResult]) -> str:
    columns = _columns(results)
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _ in columns)
    body = []
    for result in results:
        cells = []
        for name, cell in columns:
            text = cell(result)
            css = ""
            if name in ("drift", "401", "ghosts", "errors"):
                css = ' class="bad"' if text != "0" else ' class="good"'
            cells.append(f"<td{css}>{html.escape(text)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>\n" + "\n".join(body) + "\n</table>"


def _text(x: float, y: float, text: str, anchor: str = "start", css: str = "") -> str:
    klass = f' class="{css}"' if css else ""
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{klass}>'
        f"{html.escape(text)}</text>"
    )


def _svg(width: float, height: float, body: list[str], title: str) -> str:
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" '
        f'width="{width:.0f}" height="{height:.0f}" role="img" '
        f'aria-label="{html.escape(title)}">' + "".join(body) + "</svg>"
    )


def drift_chart(results: Sequence[OptionResult]) -> str:
    """Return horizontal bars: the share of sessions that drifted, per option."""
    row, bar = 30, 18
    span = WIDTH - LABEL - 320
    body = []
    for index, result in enumerate(results):
        y = 10 + index * row
        share = result.drift_sessions / result.sessions if result.sessions else 0.0
        colour = BAD if result.drift_sessions else GOOD
        body.append(_text(LABEL - 8, y + 13, result.option, "end"))
        body.append(
            f'<rect x="{LABEL}" y="{y}" width="{max(share * span, 2):.1f}" '
            f'height="{bar}" fill="{colour}"/>'
        )
        label = (
            f"{share:.0%} ({result.drift_sessions} of {result.sessions}) · "
            f"401: {result.unauthorized_after_login} · ghosts: {result.ghost_files}"
        )
        body.append(_text(LABEL + max(share * span, 2) + 6, y + 13, label, css="muted"))
    return _svg(WIDTH, 20 + len(results) * row, body, "drifted sessions per option")


def distribution_chart(result: OptionResult) -> str:
    """Return one option's requests per instance as vertical bars with the mean."""
    width, height, top, bottom = 280, 170, 28, 36
    counts = result.per_instance
    peak = max(counts.values(), default=0) or 1
    plot = height - top - bottom
    slot = (width - 20) / max(len(counts), 1)
    body = [_text(10, 16, f"{result.option}: max/mean {result.max_over_mean:.2f}")]
    for index, (instance, count) in enumerate(sorted(counts.items())):
        tall = count / peak * plot
        x = 10 + index * slot + slot * 0.15
        colour = BAD if instance == result.killed else NEUTRAL
        body.append(
            f'<rect x="{x:.1f}" y="{top + plot - tall:.1f}" width="{slot * 0.7:.1f}" '
            f'height="{max(tall, 1):.1f}" fill="{colour}"/>'
        )
        centre = x + slot * 0.35
        body.append(_text(centre, height - bottom + 14, instance, "middle", "muted"))
        body.append(_text(centre, height - bottom + 28, str(count), "middle", "muted"))
    if counts:
        mean = sum(counts.values()) / len(counts)
        y = top + plot - mean / peak * plot
        body.append(
            f'<line x1="10" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" '
            'stroke="#1d2430" stroke-dasharray="4 3"/>'
        )
    return _svg(width, height, body, f"requests per instance, {result.option}")


def latency_chart(results: Sequence[OptionResult]) -> str:
    """Return grouped horizontal bars of the p50, p90 and p99 latency per option."""
    bar, gap = 11, 12
    group = bar * len(LATENCY_COLOURS) + gap
    span = WIDTH - LABEL - 90
    peak = max((r.latency_ms.get("p99", 0.0) for r in results), default=0.0) or 1.0
    body = []
    for index, result in enumerate(results):
        y0 = 24 + index * group
        body.append(_text(LABEL - 8, y0 + bar * 2, result.option, "end"))
        for offset, (name, colour) in enumerate(LATENCY_COLOURS.items()):
            value = result.latency_ms.get(name, 0.0)
            y = y0 + offset * bar
            length = max(value / peak * span, 1)
            body.append(
                f'<rect x="{LABEL}" y="{y}" width="{length:.1f}" height="{bar - 2}" '
                f'fill="{colour}"/>'
            )
            text = f"{name} {value:.1f} ms"
            body.append(_text(LABEL + length + 5, y + bar - 3, text, css="muted"))
    legend = [
        f'<rect x="{LABEL + i * 90}" y="4" width="10" height="10" fill="{colour}"/>'
        + _text(LABEL + i * 90 + 14, 13, name)
        for i, (name, colour) in enumerate(LATENCY_COLOURS.items())
    ]
    height = 30 + len(results) * group
    return _svg(WIDTH, height, legend + body, "latency percentiles per option")


def failover_chart(results: Sequence[OptionResult]) -> str:
    """Return bars of re-pinned sessions and failover errors per option."""
    row, bar = 40, 15
    span = WIDTH - LABEL - 220
    peak = (
        max(max(r.repinned_sessions or 0, r.failover_errors or 0) for r in results) or 1
    )
    body = []
    for index, result in enumerate(results):
        y = 10 + index * row
        body.append(_text(LABEL - 8, y + 18, result.option, "end"))
        for offset, (name, value, colour) in enumerate(
            (
                ("re-pinned", result.repinned_sessions or 0, NEUTRAL),
                ("failover errors", result.failover_errors or 0, BAD),
            )
        ):
            length = max(value / peak * span, 1)
            top = y + offset * (bar + 2)
            body.append(
                f'<rect x="{LABEL}" y="{top}" width="{length:.1f}" height="{bar}" '
                f'fill="{colour}"/>'
            )
            text = f"{value} {name}"
            body.append(_text(LABEL + length + 5, top + bar - 3, text, css="muted"))
    return _svg(WIDTH, 20 + len(results) * row, body, "failover per option")


def render_html(results: Sequence[OptionResult], settings: str) -> str:
    """Return the whole report page."""
    template = Template(
        files("stickyproxy").joinpath("static/bench_report.html").read_text("utf-8")
    )
    failover = ""
    if any(result.killed is not None for result in results):
        caption = (
            "One instance (the busiest) was killed mid-run and kept down for a while; "
            "sessions it served moved to another instance (re-pinned), and requests "
            "in flight, or sent before the proxy noticed, failed."
        )
        failover = (
            f"<h2>Failover</h2>\n<figure>\n{failover_chart(results)}\n"
            f"<figcaption>{caption}</figcaption>\n</figure>"
        )
    return template.substitute(
        settings=html.escape(settings),
        table=_html_table(results),
        drift_chart=drift_chart(results),
        distribution_charts="\n".join(distribution_chart(r) for r in results),
        latency_chart=latency_chart(results),
        failover_section=failover,
    )
