"""Markdown tables from a benchmark JSON, and the generated blocks of ``docs/performance.md``.

    python -m flatsophia.bench.report docs/results/bench/cpu.json            # print the tables
    python -m flatsophia.bench.report docs/results/bench/cpu.json --update docs/performance.md

``--update`` rewrites the text between ``<!-- bench: <file name> -->`` and ``<!-- /bench -->`` in the
document with the tables of that JSON, so every figure in the document comes from a committed JSON.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

__all__ = ["markdown", "update_document", "main"]

#: A run is flagged as shared when the 1-minute load average exceeds its thread count by more than
#: this (the benchmark's own threads hold the load near the thread count).
LOAD_MARGIN = 0.5


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _ratio(row: dict, coverages: set) -> str:
    """``paired [lo, hi]`` (the median of the per-round ratios and its interval), or the ratio of medians."""
    if row.get("paired") is None:
        return "-" if row.get("ratio") is None else f"{row['ratio']:.3f} (medians)"
    text = f"**{row['paired']:.3f}**"
    if row.get("ci"):
        lo, hi, cov = row["ci"]
        text += f" [{lo:.3f}, {hi:.3f}]"
        coverages.add(round(100 * cov, 1))
    return text


def _status(row: dict) -> str | None:
    if row.get("status", "ok") == "ok":
        return None
    return f"{row['status']}: {row.get('note', '')}"


def _coverage_line(coverages: set, rounds: int) -> str:
    if not coverages:
        return f"No intervals: {rounds} rounds are too few for a 95 % interval of the median (6 at least)."
    cov = ", ".join(f"{c:g} %" for c in sorted(coverages))
    return (
        f"Brackets: distribution-free confidence interval of the median of the {rounds} per-round ratios "
        f"(order statistics; coverage {cov})."
    )


def _table(header: list[str], align: str, lines: list[list[str]]) -> list[str]:
    """A Markdown table; ``align`` has one ``l`` or ``r`` per column."""
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return ["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(cells) + " |" for cells in lines)]


def _block(title: str, header: list[str], align: str, lines: list[list[str]], cov=None, rounds=0) -> list[str]:
    """A section: its title line and table, then the CI coverage line where ``cov`` is given."""
    out = ["", title, "", *_table(header, align, lines)]
    return out if cov is None else [*out, "", _coverage_line(cov, rounds)]


def _hvp(row: dict) -> str:
    hvp = row.get("hvp") or "-"
    return hvp if row.get("batch_fraction") is None else f"{hvp}, f={row['batch_fraction']:g}"


def _iteration(sec: dict, rounds: int) -> list[str]:
    cov: set = set()
    lines = []
    for row in sec["rows"].values():
        bad = _status(row)
        cells = ["-", "-", bad] if bad else [_ms(row["median_ms"]), _ratio(row, cov), row.get("note", "")]
        lines.append([row["optimizer"], _hvp(row), *cells])
    title = (
        f"**Training iteration**, one Hessian refresh per {sec['k']} iterations (median ms per iteration; "
        "ratio to fused AdamW paired round by round):"
    )
    header = ["optimizer", "hvp", "ms / iteration", "x fused AdamW", "refresh"]
    return _block(title, header, "llrll", lines, cov, rounds)


def _refresh(sec: dict, rounds: int) -> list[str]:
    k, cov, lines = sec["k"], set(), []
    for row in sec["rows"].values():
        bad = _status(row)
        if bad:
            lines.append([row["optimizer"], _hvp(row), "-", "-", "-", "-", "-", bad])
            continue
        lines.append(
            [
                row["optimizer"],
                _hvp(row),
                _ms(row["median_ms"]),
                _ratio(row, cov),
                f"{row['gflop']:.4g}",
                f"{row['flop_ratio']:.2f}",
                f"{row['iteration_floor']:.3f}",
                row.get("note", ""),
            ]
        )
    header = ["optimizer", "hvp", "ms", "x forward+backward", "GFLOP", "FLOPs x fwd+bwd", "iteration floor", "how"]
    title = (
        "**Refresh step**: the training gradient, the estimate and `update_hessian` as the loop runs them on a "
        "refresh step (no optimizer step), against a plain forward+backward; FLOPs counted with `FlopCounterMode`; "
        f"floor: the iteration ratio these FLOPs allow at k = {k}, 1 + (FLOP ratio - 1) / {k}."
    )
    return _block(title, header, "llrlrrrl", lines, cov, rounds)


def _step(res: dict, rounds: int) -> list[str]:
    sec, cov, lines = res["step"], set(), []
    for row in sec["rows"].values():
        bad = _status(row)
        compile_s = f"{row['compile_s']:.1f}" if row.get("compile_s") is not None else "-"
        if bad:
            cells = ["-", "-", "-", bad]
        else:
            cells = [_ms(row["median_ms"]), _ratio(row, cov), compile_s, row.get("note", "")]
        lines.append([row["optimizer"], row["kernel"], *cells])
    title = "**Optimizer step** alone on fixed gradients (median ms per step; ratio to fused AdamW's step):"
    header = ["optimizer", "kernel", "ms / step", "x fused AdamW", "compile s", "note"]
    out = _block(title, header, "llrlrl", lines, cov, rounds)
    it = res.get("iteration", {}).get("rows", {}).get(sec["reference"], {})
    st = sec["rows"].get(sec["reference"], {})
    if it.get("median_ms") and st.get("median_ms"):
        out.append(f"Fused AdamW's step is {100 * st['median_ms'] / it['median_ms']:.1f} % of its training iteration.")
    return out


def _state(sec: dict) -> list[str]:
    lines = []
    for row in sec["rows"].values():
        bad = _status(row)
        cells = ["-", bad] if bad else [f"{row['bytes_per_param']:.4f}", f"{row['bytes_per_param_with_counters']:.6f}"]
        lines.append([row["optimizer"], *cells])
    header = ["optimizer", "bytes / parameter", "with the 0-d step counters"]
    return _block("**Optimizer state** (exact; bytes per parameter):", header, "lrr", lines)


def _memory(sec: dict) -> list[str]:
    lines = []
    for row in sec["rows"].values():
        bad = _status(row)
        cells = ["-", bad] if bad else [f"{row['peak_mib']:.1f}", f"{row['ratio']:.2f}"]
        lines.append([row["optimizer"], _hvp(row), *cells])
    header = ["optimizer", "hvp", "peak MiB", "x forward+backward"]
    return _block(f"**Peak memory of a refresh step** ({sec['method']}):", header, "llrr", lines)


def markdown(res: dict) -> str:
    """The tables of a benchmark result (the dict the benchmark returns or writes as JSON)."""
    m = res["meta"]
    commit = (m.get("git_commit") or "unknown")[:10] + (" (uncommitted changes)" if m.get("git_dirty") else "")
    out = [
        f"Workload: {m['workload']}, {m['n_params']:,} parameters in {m['n_tensors']} tensors. "
        f"Machine: {m['machine']}; device {m['device']}; torch {m['torch']}, {m['threads']} thread(s). "
        f"{m['rounds']} interleaved rounds; {m['date']}; commit {commit}; load average {m.get('loadavg_start')} "
        f"at the start, {m.get('loadavg_end')} at the end; wall time {m.get('wall_s')} s"
        + ("" if res.get("complete", True) else " (incomplete run)")
        + ".",
        "",
        f"Command: `{m['command']}`",
    ]
    loads = [x[0] for x in (m.get("loadavg_start"), m.get("loadavg_end")) if x]
    if loads and max(loads) > m["threads"] + LOAD_MARGIN:
        out += [
            "",
            f"**Other work shared the CPUs**: the 1-minute load average reached {max(loads):.1f} against "
            f"{m['threads']} benchmark thread(s), so these figures are noisier than a quiet machine's.",
        ]
    if "iteration" in res:
        out += _iteration(res["iteration"], m["rounds"])
    if "refresh" in res:
        out += _refresh(res["refresh"], m["rounds"])
    if "step" in res:
        out += _step(res, m["rounds"])
    if "state" in res:
        out += _state(res["state"])
    if "memory" in res:
        out += _memory(res["memory"])
    return "\n".join(out) + "\n"


BLOCK = re.compile(r"(<!-- bench: (?P<name>[^ ]+) -->\n)(?P<body>.*?)(<!-- /bench -->)", re.S)


def update_document(doc: str, name: str, tables: str) -> str:
    """``doc`` with the block ``<!-- bench: name -->`` ... ``<!-- /bench -->`` replaced by ``tables``."""
    found = False

    def replace(match: re.Match) -> str:
        nonlocal found
        if match["name"] != name:
            return match[0]
        found = True
        return match[1] + tables + match[4]

    new = BLOCK.sub(replace, doc)
    if not found:
        raise ValueError(f"no block <!-- bench: {name} --> ... <!-- /bench --> in the document")
    return new


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m flatsophia.bench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("json", help="a JSON written by python -m flatsophia.bench --json")
    p.add_argument("--update", metavar="DOC", help="rewrite this document's block for the JSON instead of printing")
    a = p.parse_args(argv)
    tables = markdown(json.loads(Path(a.json).read_text()))
    if a.update:
        doc = Path(a.update)
        doc.write_text(update_document(doc.read_text(), Path(a.json).name, tables))
    else:
        print(tables, end="")


if __name__ == "__main__":
    main()
