"""Draw PNG charts from benchmark JSON results.

Online results (bench_serving.py / bench_simple.py `--json`): one line per label, x = request
rate, panels = output throughput, TTFT p50/p99, ITL p50/p99, E2E p50/p99.

    python benchmark/plot.py results/radix_*.json results/naive_*.json -o assets/online.png

Offline results (`benchmark/offline/bench.py --json > r.json`): a bar per file (median tok/s).
The label of a file is its `config.label`, else `--label` given in order, else the file stem.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [
    ("Output throughput (tok/s)", [("output_throughput", "")]),
    ("TTFT (ms)", [("p50_ttft_ms", "p50"), ("p99_ttft_ms", "p99")]),
    ("ITL (ms)", [("p50_itl_ms", "p50"), ("p99_itl_ms", "p99")]),
    ("E2E latency (ms)", [("p50_e2e_ms", "p50"), ("p99_e2e_ms", "p99")]),
]


def read_result(path: Path) -> dict[str, Any]:
    text = path.read_text().strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:  # offline bench output: the JSON object is the last line
        return json.loads(text.splitlines()[-1])


def label_of(res: dict[str, Any], path: Path, given: list[str], i: int) -> str:
    label = res.get("config", {}).get("label")
    if label:
        return str(label)
    return given[i] if i < len(given) else path.stem


def rate_of(res: dict[str, Any]) -> float:
    cfg = res.get("config", {})
    rate = cfg.get("offered_rate", cfg.get("rate"))
    if rate is None or not math.isfinite(float(rate)):
        return float("nan")
    return float(rate)


def plot_online(results: list[tuple[str, dict[str, Any]]], out: Path, title: str) -> None:
    series: dict[str, list[tuple[float, dict[str, Any]]]] = defaultdict(list)
    for label, res in results:
        series[label].append((rate_of(res), res["summary"]))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6))
    for ax, (ylabel, keys) in zip(axes, PANELS):
        for label, points in series.items():
            points.sort(key=lambda p: p[0])
            xs = [p[0] for p in points]
            for key, suffix in keys:
                style = "--" if suffix == "p99" else "-"
                name = f"{label} {suffix}".strip()
                ax.plot(xs, [p[1][key] for p in points], style, marker="o", label=name)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[-1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_offline(results: list[tuple[str, dict[str, Any]]], out: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(1.6 * len(results) + 2, 3.6))
    labels = [label for label, _ in results]
    values = [res["median_tok_s"] for _, res in results]
    bars = ax.bar(labels, values)
    ax.bar_label(bars, fmt="{:,.0f}")
    ax.set_ylabel("output tok/s (median)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("results", nargs="+", help="JSON result files")
    p.add_argument("-o", "--output", required=True, help="PNG path, e.g. assets/online.png")
    p.add_argument(
        "--label", action="append", default=[], help="labels for files without one, in order"
    )
    p.add_argument("--title", default="")
    args = p.parse_args(argv)

    paths = [Path(r) for r in args.results]
    loaded = [read_result(path) for path in paths]
    results = [
        (label_of(res, path, args.label, i), res)
        for i, (path, res) in enumerate(zip(paths, loaded))
    ]
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if all("summary" in res for _, res in results):
        plot_online(results, out, args.title or "Online serving benchmark")
    elif all("median_tok_s" in res for _, res in results):
        plot_offline(results, out, args.title or "Offline throughput")
    else:
        p.error("give either all online (bench_serving) or all offline (bench.py) results")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
