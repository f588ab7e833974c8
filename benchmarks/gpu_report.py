"""The report of benchmarks/gpu_check.sh: its stages' outputs in one JSON file, BENCHMARKS.md's table rows, and the
targets met or missed.

    python benchmarks/gpu_report.py --work DIR --results benchmarks/results

DIR holds what the stages wrote: stages.jsonl, env.log, pytest.xml (or pytest-gpu.log), benchmark.json, load.json,
load-int8.json; any of them may be missing (a stage that failed or ran out of time), and the report says so.
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

TARGETS = [  # (what, config, set, mode, key, limit): BENCHMARKS.md's targets, one H100 / H200, batch 16
    ("image set, paper decoding, model s", "fast", "images", "paper", "seconds", 10.0),
    ("video set, paper decoding, model s", "fast", "videos", "paper", "seconds", 8.0),
    ("a 16 x 5-beam step, ms", "fast", "images", "paper", "decode_ms_per_step", 8.0),
    ("peak GiB, bfloat16", "fast", "images", "paper", "peak_gib", 20.0),
    ("peak GiB, int8", "fast-int8", "images", "paper", "peak_gib", 12.0),
    ("peak GiB, int4", "fast-int4", "images", "paper", "peak_gib", 8.0),
]


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pytest_summary(work: Path) -> dict:
    """Counts and the names of failed tests from pytest's junit XML; else the log's last line."""
    try:
        suite = ElementTree.parse(work / "pytest.xml").getroot()
    except (OSError, ElementTree.ParseError):
        log = work / "pytest-gpu.log"
        lines = log.read_text().splitlines() if log.exists() else []
        counts = [line for line in lines if re.search(r"\d+ (passed|failed|error|tests? collected)", line)]
        if counts:
            return {"summary": counts[-1].strip("= ")}
        results = re.findall(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)", "\n".join(lines), re.M)
        failed = [name for name, outcome in results if outcome in ("FAILED", "ERROR")]
        return {"failed": failed, "summary": f"stopped before the end: {len(results)} tests reported, "
                                             f"{len(failed)} failed (see pytest-gpu.log)"}
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed, skipped = [], []
    for case in suite.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif case.find("skipped") is not None:
            skipped.append(f"{name}: {case.find('skipped').get('message', '')}")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {**counts, "failed": failed, "skipped_tests": skipped,
            "summary": f"{counts['tests'] - counts['failures'] - counts['errors'] - counts['skipped']} passed, "
                       f"{counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"}


def num(value, digits=2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def rows_of(bench: dict | None) -> list[dict]:
    return (bench or {}).get("results", [])


def find(rows: list[dict], config: str, set_name: str, mode: str) -> dict | None:
    return next((r for r in rows if (r["config"], r["set"], r["mode"]) == (config, set_name, mode)), None)


def speed_rows(bench: dict, card: str, date: str, commit: str) -> list[str]:
    """BENCHMARKS.md's Results table: the fast path against the baseline."""
    rows = rows_of(bench)
    out = []
    for r in (r for r in rows if r["config"] == "fast"):
        base = find(rows, "baseline", r["set"], r["mode"])
        base_s = ("~" if base and base["estimated"] else "") + num(base and base["seconds"])
        speedup = f"{base['seconds'] / r['seconds']:.1f}×" if base else "—"
        out.append(f"| {card} | {date} | {commit} | {r['set']} | {r['mode']} | {num(r['seconds'])} | "
                   f"{base_s if base else '—'} | {speedup} | {num(r['decode_ms_per_step'], 1)} | "
                   f"{num(r['peak_gib'], 1)} |")
    return out


def quantized_rows(bench: dict, card: str, date: str) -> list[str]:
    """BENCHMARKS.md's quantized table: per weight format, the paper decoding and the greedy agreement."""
    rows = rows_of(bench)
    agreement = bench.get("agreement", {})
    out = []
    for config, weights in (("fast", bench.get("fast_dtype", "bfloat16")), ("fast-int8", "int8"),
                            ("fast-int4", "int4")):
        for r in (r for r in rows if r["config"] == config and r["mode"] == "paper"):
            agree = agreement.get(f"{config} / fast greedy", {}).get(r["set"])
            same = f"{agree['equal']}/{agree['records']}" if agree else ("—" if config != "fast" else "reference")
            out.append(f"| {card} | {date} | {weights} | {r['set']} | {num(r['seconds'])} | "
                       f"{num(r['decode_ms_per_step'], 1)} | {num(r['peak_gib'], 1)} | {same} |")
    return out


def load_rows(loads: list[dict], card: str, date: str) -> list[str]:
    return [f"| {card} | {date} | {r.get('device', '?')} | {r.get('quantize')} | {r.get('cache', '?')} | "
            f"{r.get('load_s', 'error')} | "
            f"{num(r.get('peak_rss_gb'))} | {num(r.get('peak_gpu_gb'))} |" for r in loads]


def targets(bench: dict, loads: list[dict]) -> list[str]:
    rows = rows_of(bench)
    lines = []
    for what, config, set_name, mode, key, limit in TARGETS:
        r = find(rows, config, set_name, mode)
        value = r and r.get(key)
        lines.append(f"{what}: {num(value)} (target <= {limit}): "
                     f"{'not measured' if value is None else 'met' if value <= limit else 'missed'}")
    bf16, int8 = find(rows, "fast", "images", "paper"), find(rows, "fast-int8", "images", "paper")
    if bf16 and int8:
        ratio = int8["decode_ms_per_step"] / bf16["decode_ms_per_step"]
        lines.append(f"int8 step / bfloat16 step: {ratio:.2f} (target <= 0.75): {'met' if ratio <= 0.75 else 'missed'}")
    for r in loads:
        if r.get("quantize") == "none" and "peak_rss_gb" in r and str(r.get("device")).startswith("cuda"):
            rss = r["peak_rss_gb"]
            lines.append(f"peak host RSS loading to the GPU, GB: {rss:.2f} (target <= 4): "
                         f"{'met' if rss <= 4 else 'missed'}")
    return lines


def agreement_lines(bench: dict) -> list[str]:
    lines = []
    labels = [("fidelity", f"{bench.get('fast_dtype', 'bfloat16')} vs float32")]
    labels += [(name, name.replace(" / fast greedy", f" vs {bench.get('fast_dtype', 'bfloat16')}"))
               for name in bench.get("agreement", {})]
    for key, label in labels:
        per_set = bench.get(key) if key == "fidelity" else bench["agreement"][key]
        for set_name, f in (per_set or {}).items():
            lines.append(f"greedy answers, {label}, {set_name}: {f['equal']}/{f['records']} equal "
                         f"(first token {f['first_token_equal']}/{f['records']})")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--results", required=True, type=Path)
    p.add_argument("--elapsed", type=int, default=None, help="seconds the check took so far")
    args = p.parse_args(argv)
    work = args.work
    stages = [json.loads(line) for line in (work / "stages.jsonl").read_text().splitlines() if line.strip()] \
        if (work / "stages.jsonl").exists() else []
    bench = read_json(work / "benchmark.json") or {}
    loads = [run for name in ("load.json", "load-int8.json") for run in (read_json(work / name) or {}).get("runs", [])]
    env = bench.get("environment", {})
    card = env.get("card") or "unknown card"
    date = (env.get("date") or datetime.datetime.now().isoformat())[:10]
    commit = env.get("commit", "?") + ("+" if env.get("dirty") else "")
    report = {"card": card, "date": date, "commit": commit, "elapsed_s": args.elapsed, "stages": stages,
              "pytest_gpu": pytest_summary(work), "benchmark": bench, "load": loads,
              "targets": targets(bench, loads) if card != "CPU" else ["a GPU's targets: not applicable to a CPU run"],
              "note": "random weights: answer agreement is a weak proxy for "
              "answer quality (the trained model's answers may differ more or less)"}
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{slug}-{date}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    if path.parent.resolve() != work.resolve():
        shutil.copy(path, work / path.name)

    print(f"\nLynx GPU check on {card}, {date}, commit {commit}: {args.elapsed} s; results in {path}")
    print("stages: " + ", ".join(f"{s['stage']} {s['status']}" for s in stages))
    print(f"pytest -m gpu: {report['pytest_gpu']['summary']}")
    for name in report["pytest_gpu"].get("failed", []):
        print(f"  failed: {name}")
    print("\nBENCHMARKS.md, Results (card | date | commit | set | mode | model s | baseline s | speed-up | "
          "decode ms/step | peak GiB):")
    print("\n".join(speed_rows(bench, card, date, commit)) or "(no benchmark rows)")
    print("\nBENCHMARKS.md, Quantized weights (card | date | weights | set | paper s | decode ms/step | peak GiB | "
          "greedy = bf16):")
    print("\n".join(quantized_rows(bench, card, date)) or "(no quantized rows)")
    print("\nBENCHMARKS.md, Loading (card | date | device | quantize | page cache | load s | peak host RSS GB | "
          "peak GPU GB):")
    print("\n".join(load_rows(loads, card, date)) or "(no load rows)")
    print()
    print("\n".join(agreement_lines(bench)))
    print("\ntargets:\n  " + "\n  ".join(report["targets"]))
    for failure in bench.get("failures", []):
        print(f"benchmark configuration {failure['config']} failed: {failure['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
