"""Timing and reporting helpers shared by the benchmarks (public pit_jax API only)."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time

import argparse

import jax
import jax.numpy as jnp


def bench_parser(quick_help: str) -> argparse.ArgumentParser:
    """The arguments every benchmark takes: --out and --quick."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help=quick_help)
    return ap


def announce() -> dict:
    """Print and return the device, versions and date a result belongs to."""
    import pit_jax
    meta = device_description()
    print(meta, pit_jax.build_info(), flush=True)
    return meta


def tile_sparse_bf16(key, m, k, tile, sparsity, n, nonnegative=False):
    """n distinct bf16 [m, k] arrays whose micro-tiles are zero with probability `sparsity`
    (nonnegative: relu-like activations)."""
    tm, tk = tile
    out = []
    for i in range(n):
        k1, k2 = jax.random.split(jax.random.fold_in(key, i))
        keep = jax.random.uniform(k1, (-(-m // tm), -(-k // tk))) >= sparsity
        keep = jnp.repeat(jnp.repeat(keep, tm, 0), tk, 1)[:m, :k]
        vals = jax.random.normal(k2, (m, k), jnp.bfloat16)
        out.append(((jnp.abs(vals) if nonnegative else vals) * keep).astype(jnp.bfloat16))
    return out


def device_description() -> dict:
    d = jax.devices()[0]
    return {"device": getattr(d, "device_kind", str(d)), "platform": d.platform,
            "jax": jax.__version__, "date": datetime.date.today().isoformat(),
            "python": platform.python_version()}


def chain_calls(call, xs, *shared):
    """[call(x, *shared) for x in xs], each call ordered after the previous call's output by an
    optimization barrier (no copy, no kernel). Without it XLA's dot merger batches independent dots
    that share an operand (the same w) into one GEMM on concatenated inputs: on 4096³ the dense
    baseline then ran 0.5 GEMMs per call plus a concatenate and a copy, 209 µs per call against
    185 µs for one dot per step (H200, session 40), which flattered every ratio against it."""
    outs = []
    for x in xs:
        if outs:
            x, _ = jax.lax.optimization_barrier((x, outs[-1]))
        outs.append(call(x, *shared))
    return outs


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


def round_order(items: list, rnd: int) -> list:
    """A/B rounds: `items` as given in even rounds, reversed in odd ones, so no variant always runs
    first (session 16 saw a kernel no switch touched read 4-7% slower in the second slot)."""
    return items if rnd % 2 == 0 else items[::-1]


def parse_variants(specs: list[str]) -> tuple[list[str], set[str]]:
    """A/B variants from the command line: each a comma-separated NAME=VALUE list of environment
    variables the CUDA handlers read per launch ('default' = none). Returns the variants ("" for
    default) and every variable name any of them sets."""
    variants = ["" if v == "default" else v for v in specs]
    names = {item.split("=", 1)[0] for v in variants for item in filter(None, v.split(","))}
    return variants, names


def apply_variant(variant: str, names: set[str]) -> None:
    """Unset every variable any variant names, then set this variant's ("" = none: defaults)."""
    for name in names:
        os.environ.pop(name, None)
    for item in filter(None, variant.split(",")):
        name, value = item.split("=", 1)
        os.environ[name] = value


def enqueue_and_wall(fn, inputs, steps: int = 20) -> tuple[float, float]:
    """(host seconds to enqueue one jitted step, wall seconds per step until all finish) over
    `steps` steps launched back to back after a warm call."""
    jax.block_until_ready(fn(inputs))
    t0 = time.perf_counter()
    for _ in range(steps):
        out = fn(inputs)
    t1 = time.perf_counter()
    jax.block_until_ready(out)
    t2 = time.perf_counter()
    return (t1 - t0) / steps, (t2 - t0) / steps


def dispatch_fraction(fn, inputs, steps: int = 20) -> float:
    """Host time to enqueue `steps` jitted steps over the wall time until they finish (printed and
    returned): near 1 means the host, not the GPU, sets the pace of the timing loop, so a time
    per call measures dispatch as much as kernels."""
    enqueue, wall = enqueue_and_wall(fn, inputs, steps)
    print(f"dispatch {1e6 * enqueue:.0f} us per step, wall {1e6 * wall:.0f} us per step "
          f"(fraction {enqueue / wall:.2f})", flush=True)
    return enqueue / wall


def markdown_report(title: str, notes: str, header: list[str], cells: list[list[str]]) -> str:
    """A titled markdown table, one row of formatted cells per measured point."""
    lines = [f"# {title}", "", notes, "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def write_results(out_dir: str, name: str, rows: list[dict], markdown: str, meta: dict,
                  extra: dict | None = None) -> None:
    """`name`.json ({"meta", "rows"} plus the keys of `extra`, e.g. a second table) and `name`.md."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, **(extra or {})}, f, indent=1)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(markdown)


def print_and_save(text: str, out_dir: str | None, filename: str) -> None:
    """Print a report and, when out_dir is given, write it there as `filename`."""
    print(text)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, filename), "w") as f:
            f.write(text + "\n")


def grouped_bars(ax, groups: list[str], series: dict[str, list], ylabel: str, title: str) -> None:
    """One cluster of bars per group, one bar per series; a None value leaves a gap. Series i
    is always colour Ci, so a series with no values shifts no colours (and gets no legend)."""
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        shift = (i - (len(series) - 1) / 2) * width
        pts = [(g, v) for g, v in enumerate(values) if v is not None]
        if pts:
            ax.bar([g + shift for g, _ in pts], [v for _, v in pts], width, label=label, color=f"C{i}")
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
