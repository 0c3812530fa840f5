"""Turns an `ncu --metrics regex:smsp__average_warps_issue_stalled_...` report into one markdown
table: a column per profiled kernel launch, a row per stall reason (cycles per issued
instruction, largest first), plus the duration. Of the launches before the
first pit kernel only the last is kept (the matmul XLA chose after autotuning)."""
import re
import sys


def main(path):
    launches, current = [], None
    for line in open(path, errors="replace"):
        head = re.match(r"^  (\S.*?) \(\d+, \d+, \d+\)x\(\d+, \d+, \d+\)", line)
        if head:
            current = {"name": re.sub(r"\(const T1.*", "", head.group(1))[:60], "values": {}}
            launches.append(current)
            continue
        m = re.match(r"^\s+(\S+)\s+(\S+)?\s+([\d,.]+)\s*$", line)
        if current is not None and m:
            metric = m.group(1).replace("smsp__average_warps_issue_stalled_", "").replace("_per_issue_active.ratio", "")
            current["values"][metric] = float(m.group(3).replace(",", ""))
    if not launches:
        print("no launches parsed")
        return
    # XLA's autotuner launches several candidate kernels for a matmul before the chosen one runs:
    # keep the last launch before the first pit kernel (the executed matmul) and the pit kernels
    first_pit = next((i for i, l in enumerate(launches) if "pit" in l["name"]), len(launches))
    launches = launches[max(first_pit - 1, 0):]
    rows = sorted({k for l in launches for k in l["values"]},
                  key=lambda k: -max(l["values"].get(k, 0) for l in launches))
    print("| metric | " + " | ".join(l["name"] for l in launches) + " |")
    print("|---|" + "---|" * len(launches))
    for k in rows:
        vals = [l["values"].get(k) for l in launches]
        if max(v or 0 for v in vals) < 0.05:
            continue
        print(f"| {k} | " + " | ".join("" if v is None else f"{v:.2f}" for v in vals) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
