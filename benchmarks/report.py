"""What a benchmark run leaves behind: a JSON record (machine, package versions, the full command, results), a
markdown table, and PNG plots written next to the JSON; and the command-line options both benchmarks share."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("leapserve", "torch", "transformers", "triton", "httpx", "openai", "vllm")


def positive_int_list(text: str) -> list[int]:
    """argparse type: a comma-separated list of positive integers, e.g. '1,4,16'."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 1,4,16, got {text!r}")
    return values


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--output-json", type=Path, help="write the run's record here, and its plot next to it (.png)")
    g.add_argument("--output-md", type=Path, help="also write the markdown table here")


def _cpu_model() -> str:
    """The CPU's marketing name where /proc/cpuinfo has it (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        info["memory_GiB"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str]:
    """Installed versions of those of `names` that are installed."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def run_record(kind: str, args: argparse.Namespace, results: Any, **extra: Any) -> dict[str, Any]:
    """One run: when, where, with what, the command as typed and every option's resolved value, the results."""
    options = {k: v for k, v in vars(args).items() if not callable(v)}
    return {
        "kind": kind,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["leapserve", *sys.argv[1:]]),
        "options": json.loads(json.dumps(options, default=_jsonable)),
        "machine": machine_info(),
        "versions": package_versions(),
        **extra,
        "results": results,
    }


def _jsonable(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: floats rounded, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_outputs(record: dict, table: str, output_json: Path | None, output_md: Path | None) -> None:
    """Print the table; write the record and the table where asked."""
    print(table)
    if output_json is not None:
        output_json.parent.mkdir(parents=True, exist_ok=True)
        output_json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {output_json}")
    if output_md is not None:
        output_md.parent.mkdir(parents=True, exist_ok=True)
        output_md.write_text(f"`{record['command']}`\n\n{table}\n")
        print(f"wrote {output_md}")


def _figure(nrows: int, ncols: int):
    """pyplot (headless), a figure and its axes as a flat list."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.2 * nrows), squeeze=False)
    return plt, fig, [ax for row in axes for ax in row]


def _log2_ticks(ax, values: list[int]) -> None:
    """A log2 x axis with a plain tick at each measured value."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(values, [str(v) for v in values])
    ax.minorticks_off()


def _concurrency_axis(ax, levels: list[int]) -> None:
    """The serve plots' x axis (log2, a tick per level), a grid and the legend."""
    _log2_ticks(ax, levels)
    ax.set_xlabel("concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def _save(plt, fig, path: Path, title: str) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_offline(rows: Sequence[dict], path: Path, title: str, batch_label: str = "batch size") -> None:
    """Output tokens/s and speedup over autoregressive against batch size, one line per decoder."""
    plt, fig, axes = _figure(1, 2)
    for key, ax, label in (
        ("tokens_per_s", axes[0], "output tokens/s"),
        ("speedup", axes[1], "speedup over autoregressive"),
    ):
        for decoder in dict.fromkeys(r["decoder"] for r in rows):
            points = [(r["batch_size"], r[key]) for r in rows if r["decoder"] == decoder and r[key] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=decoder)
        _log2_ticks(ax, sorted({r["batch_size"] for r in rows}))
        ax.set_xlabel(batch_label)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[1].axhline(1.0, color="gray", linewidth=0.8)
    axes[0].legend(fontsize="small")
    _save(plt, fig, path, title)


def plot_serve(levels: Sequence[dict], path: Path, title: str) -> None:
    """TTFT, TPOT, ITL and end-to-end latency (mean, median, p99) against concurrency."""
    metrics = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "end-to-end latency"))
    plt, fig, axes = _figure(2, 2)
    for (key, name), ax in zip(metrics, axes):
        for stat in ("mean", "median", "p99"):
            points = [(lv["concurrency"], lv[key][stat]) for lv in levels if lv[key][stat] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=stat)
        ax.set_ylabel(f"{name} (ms)")
        _concurrency_axis(ax, sorted({lv["concurrency"] for lv in levels}))
    _save(plt, fig, path, title)


def plot_paired_serve(pairs: Sequence[dict], path: Path, title: str) -> None:
    """Servers measured in turn: each one's output tok/s per round, and base / each other server per round with the
    median, against concurrency; a server keeps its colour in both panels."""
    plt, fig, (speed, ratio) = _figure(1, 2)
    levels = list(dict.fromkeys(p["concurrency"] for p in pairs))
    others = {p["against"]: p["against_url"].removeprefix("http://") for p in pairs}
    base = {p["concurrency"]: p["base_tokens_per_s"] for p in pairs}
    points = [(c, v) for c, values in base.items() for v in values]
    speed.scatter(*zip(*points), marker="o", color="C0", label="base", alpha=0.7)
    for i, ((name, url), marker) in enumerate(zip(others.items(), "s^vD<>px"), start=1):
        mine, colour = [p for p in pairs if p["against"] == name], f"C{i}"
        points = [(p["concurrency"], v) for p in mine for v in p["against_tokens_per_s"]]
        speed.scatter(*zip(*points), marker=marker, color=colour, label=f"{name} ({url})", alpha=0.7)
        points = [(p["concurrency"], r) for p in mine for r in p["ratios"] if r is not None]
        if points:
            ratio.scatter(*zip(*points), marker=marker, color=colour, alpha=0.5)
        medians = [(p["concurrency"], p["median_ratio"]) for p in mine if p["median_ratio"] is not None]
        if medians:
            ratio.plot(*zip(*medians), marker=marker, color=colour, label=f"base / {name}, median")
    speed.set_ylabel("output tok/s (each round)")
    ratio.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ratio.set_ylabel("base / against (each round, median)")
    for ax in (speed, ratio):
        _concurrency_axis(ax, levels)
    _save(plt, fig, path, title)
