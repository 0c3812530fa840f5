"""Per-kernel device time of one MoE layer training step (forward + backward) and of the dense
same-FLOP step, from JAX's profiler (CUPTI, real clocks, kernels as they run back to back; no
Nsight Systems on the device). Answers: where does pit's step spend the time the dense step
does not?

    python benchmarks/profile_layer_kernels.py [--case "Mixtral up T=4096"] [--steps 5] [--out DIR]

Prints, per step kind, a markdown table of kernels grouped by name (calls per step, µs per
step, % of the step's kernel time) and writes it to DIR/layer_kernels.md.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import zlib

import jax
import jax.numpy as jnp

from bench_moe import CASES, GRAD_ARGS, dense_layer, expert_ids, fwd_bwd, layer_inputs, pit_layer


def trace_events(trace_dir):
    """(the latest trace's events under trace_dir, the pids of its GPU processes)."""
    path = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz")))[-1]
    events = json.load(gzip.open(path))["traceEvents"]
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and str(e["args"].get("name", "")).startswith("/device:GPU")}
    return events, gpu_pids


def kernel_events(trace_dir, with_start=False):
    """[(kernel name, µs)] of the GPU stream tracks in the latest trace under trace_dir
    ([(name, start µs, µs)] sorted by start with with_start)."""
    events, gpu_pids = trace_events(trace_dir)
    # one GPU process has several tracks: streams (kernels) and XLA op/module summaries; keep streams
    stream_tids = {(e["pid"], e["tid"]) for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
                   and e["pid"] in gpu_pids and "stream" in str(e["args"].get("name", "")).lower()}
    if gpu_pids and not stream_tids:  # say what the tracks are called, so the filter can be fixed
        print("GPU tracks:", sorted({str(e["args"].get("name")) for e in events if e.get("ph") == "M"
                                     and e.get("name") == "thread_name" and e["pid"] in gpu_pids}))
    kernels = [e for e in events if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in stream_tids and "dur" in e]
    if with_start:
        return sorted(((e["name"], float(e["ts"]), float(e["dur"])) for e in kernels), key=lambda r: r[1])
    return [(e["name"], float(e["dur"])) for e in kernels]


def host_events(trace_dir):
    """[(thread name, event name, µs)] of the latest trace's host (non-GPU) processes."""
    events, gpu_pids = trace_events(trace_dir)
    threads = {(e["pid"], e.get("tid")): str(e["args"].get("name", "")) for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    return [(threads.get((e["pid"], e.get("tid")), "?"), e["name"], float(e["dur"])) for e in events
            if e.get("ph") == "X" and "dur" in e and e["pid"] not in gpu_pids]


def short(name):
    """A readable kernel name; a mangled one (CUTLASS's instantiations differ only deep in their
    template arguments) keeps its prefix and gets a hash of the whole name."""
    if name.startswith("_Z"):
        return f"{name[:40]}…#{zlib.crc32(name.encode()) & 0xffff:04x}"
    ours = re.search(r"pit_\w+", name)  # pit's kernels live in an anonymous namespace: cut at '(' they
    if ours:                             # would all read "void pit::"
        return ours.group(0)
    name = re.sub(r"<.*", "", name)  # template arguments
    name = re.sub(r"\(.*", "", name)
    return name[:70]


def profile(step, args, steps, with_start=False, read=None):
    """kernel_events of `steps` calls of step(*args) in one trace, after two warm calls (or
    read(trace_dir), e.g. to take host events as well)."""
    jax.block_until_ready(step(*args))  # compile and warm up outside the trace
    jax.block_until_ready(step(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(steps):
                out = step(*args)
            jax.block_until_ready(out)
        return read(d) if read else kernel_events(d, with_start=with_start)


def table(label, events, steps):
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for name, us in events:
        by_name[short(name)][0] += 1
        by_name[short(name)][1] += us
    total = sum(us for _, us in by_name.values()) / steps
    lines = [f"### {label}: {total:.0f} µs of kernels per step ({len(events) // max(steps, 1)} launches)", "",
             "| kernel | calls / step | µs / step | % |", "|---|---|---|---|"]
    for name, (n, us) in sorted(by_name.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"| `{name}` | {n / steps:g} | {us / steps:.0f} | {100 * us / steps / total:.1f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="Mixtral up T=4096", choices=sorted(CASES))
    ap.add_argument("--routing", default="uniform")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    t, e, k, d, f = shape = CASES[a.case]
    key = jax.random.PRNGKey(0)
    x, ws, dense_rows = layer_inputs(key, shape)
    ids = expert_ids(key, t, e, k, a.routing)
    cw = jnp.full((t, k), 1.0 / k, jnp.float32)
    report = [f"# Kernels of one layer step, {a.case} ({a.routing}), {jax.devices()[0].device_kind}, "
              f"jax {jax.__version__}", "", f"grad w.r.t. arguments {GRAD_ARGS}; {a.steps} steps traced", ""]
    for label, step, args in (("pit", fwd_bwd(pit_layer), (x, ids, cw, *ws)),
                              ("dense same-FLOP", fwd_bwd(dense_layer), (dense_rows, None, cw, *(w[0] for w in ws)))):
        events = profile(step, args, a.steps)
        if not events:
            report.append(f"### {label}: no GPU kernel events in the trace (no GPU, or no stream tracks)\n")
            continue
        report.append(table(label, events, a.steps))
    text = "\n".join(report)
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "layer_kernels.md"), "w") as fp:
            fp.write(text)


if __name__ == "__main__":
    main()
