"""The before/after table of a compression, as the terminal shows it."""

from __future__ import annotations

from host_tools.compress.evaluate import ModelReport


def compression_table(before: ModelReport, after: ModelReport, title: str = "compression"):
    from rich.table import Table

    table = Table(title=title, header_style="bold",
                  caption=f"p50: median of {before.latency_runs} single-sample runs on this host's CPU; "
                          f"accuracy and agreement over {len(before.predictions)} held-out samples")
    for header in ("model", "KiB", "× size", "p50 ms", "× p50", "accuracy", "agreement"):
        table.add_column(header, justify="left" if header == "model" else "right", no_wrap=True)
    agreement = float((after.predictions == before.predictions).mean())
    acc = lambda r: "n/a" if r.accuracy is None else f"{r.accuracy * 100:.2f}%"  # noqa: E731
    table.add_row(before.path.name, f"{before.size_bytes / 1024:.1f}", "1.00",
                  f"{before.latency_p50_ms:.3f}", "1.00", acc(before), "—")
    table.add_row(after.path.name, f"{after.size_bytes / 1024:.1f}",
                  f"{after.size_bytes / before.size_bytes:.2f}", f"{after.latency_p50_ms:.3f}",
                  f"{after.latency_p50_ms / before.latency_p50_ms:.2f}", acc(after), f"{agreement * 100:.2f}%")
    return table
