"""Timing and reporting helpers shared by the benchmarks (public pit_jax API only)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time

import jax


def device_description() -> dict:
    d = jax.devices()[0]
    return {"device": getattr(d, "device_kind", str(d)), "platform": d.platform,
            "jax": jax.__version__, "date": datetime.date.today().isoformat(),
            "python": platform.python_version()}


def time_per_call(fn, inputs, calls_per_step: int, steps: int = 10, reps: int = 5,
                  warmup: int = 2) -> float:
    """Median seconds per call. `fn(inputs)` runs `calls_per_step` independent calls inside one
    jitted step (distinct buffers, so nothing is cached or CSE'd and L2 is rotated); `steps`
    steps are launched back to back before one synchronisation, so host dispatch overlaps
    device work instead of adding to it (a sync per call adds tens of microseconds)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(inputs))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(steps):
            out = fn(inputs)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / steps)
        del out
    return statistics.median(times) / calls_per_step


def markdown_report(title: str, notes: str, header: list[str], cells: list[list[str]]) -> str:
    """A titled markdown table, one row of formatted cells per measured point."""
    lines = [f"# {title}", "", notes, "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def write_results(out_dir: str, name: str, rows: list[dict], markdown: str, meta: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(markdown)
