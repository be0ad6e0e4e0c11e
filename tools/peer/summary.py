"""Counts of the peer suite (transformers' own model tests on patched models, docs/peer-suite.md) with every failure
classified: by design (tools/peer/expected_failures.json: the entry's test, configuration, family and message all
match) or unexpected.

    python -P tools/peer/summary.py RESULTS [--config C ...] [--md-dir eval/results] [--times TIMES]

RESULTS holds ../shared/peer/run.sh's ``<config>.xml`` / ``<config>.log`` files, directly or one folder per family
(``RESULTS/<config>/<family>/<config>.xml``, PEER_RESULTS per family). A failure counts as 'new' only when it is
not by design; where a ``baseline.xml`` is present, a test that fails unpatched too is 'baseline' whatever the list
says. Prints one table row per configuration x family (passed / failed / by design / unexpected / skipped / wall
time), the unexpected failures with their message, and writes ``<md-dir>/peer-<config>.md`` when asked. Exit
status 1 when any configuration has an unexpected failure.
"""
from __future__ import annotations

import argparse
import collections
import fnmatch
import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
EXPECTED = os.path.join(HERE, "expected_failures.json")
FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "blip", "blip_2", "video_llava",
            "llava_next_video")
CONFIGS = {"baseline": "nothing patched", "pool1": "pool, keep=1.0", "fourier05": "fourier, keep=0.5",
           "fastv05": "fastv, keep=0.5, K=1, keep_mode=final", "fastv1": "fastv, keep=1.0, K=1"}


def load_expected(path: str = EXPECTED) -> dict:
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    for e in data["expected"]:
        if e["reason"] not in data["reasons"]:
            raise ValueError(f"{path}: entry {e['test']!r} names the unknown reason {e['reason']!r}")
        e["_rx"] = re.compile(e.get("message", "."), re.S)
    return data


def classify(expected: dict, config: str, family: str, test: str, message: str) -> str | None:
    """The reason a failure is expected, or None (unexpected)."""
    for e in expected["expected"]:
        if not fnmatch.fnmatchcase(test, e["test"]):
            continue
        if "*" not in e.get("configs", ["*"]) and config not in e["configs"]:
            continue
        if "*" not in e.get("families", ["*"]) and family not in e["families"]:
            continue
        if e["_rx"].search(message):
            return e["reason"]
    return None


def load_xml(path: str) -> dict:
    """test id -> (family, test function name, outcome, one-line message)."""
    out = {}
    for tc in ET.parse(path).getroot().iter("testcase"):
        cls, name = tc.get("classname", ""), tc.get("name", "")
        parts = cls.split(".")
        fam = parts[2] if len(parts) > 2 and parts[:2] == ["tests", "models"] else cls
        outcome, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "failed", "skipped": "skipped"}[tag]
                lines = (el.get("message") or (el.text or "")).strip().splitlines()
                msg = " ".join(lines)[:600]
                break
        tid = f"{cls}::{name}"
        prev = out.get(tid)   # a test failing in call and erroring in teardown appears twice: keep the worst
        if prev is None or prev[2] in ("passed", "skipped"):
            out[tid] = (fam, name, outcome, msg)
    return out


def wall_seconds(log: str) -> float | None:
    """pytest's own 'in 123.45s' from run.sh's log (the last summary line)."""
    if not os.path.exists(log):
        return None
    m = None
    with open(log, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            m = re.search(r" in ([0-9.]+)s", line) or m
    return float(m.group(1)) if m else None


def find_runs(results: str, config: str) -> list[tuple[str, str]]:
    """(xml, log) of a configuration: RESULTS/<config>.xml or RESULTS/<config>/<family>/<config>.xml."""
    runs = []
    flat = os.path.join(results, f"{config}.xml")
    if os.path.exists(flat):
        runs.append((flat, flat[:-4] + ".log"))
    for x in sorted(glob.glob(os.path.join(results, config, "*", f"{config}.xml"))):
        runs.append((x, x[:-4] + ".log"))
    return runs


def summarize(results: str, configs: list[str], expected: dict):
    base = {}
    for x, _ in find_runs(results, "baseline"):
        base.update(load_xml(x))
    rows, unexpected, reasons = [], {}, {}
    for config in configs:
        runs = find_runs(results, config)
        if not runs:
            continue
        tests, per_fam_wall = {}, collections.Counter()
        for x, log in runs:
            t = load_xml(x)
            tests.update(t)
            fams = {v[0] for v in t.values()}
            w = wall_seconds(log)
            if w is not None:
                for f in fams if len(fams) == 1 else ["ALL"]:
                    per_fam_wall[f] += w
        counts = collections.defaultdict(collections.Counter)
        for tid, (fam, name, outcome, msg) in sorted(tests.items()):
            c = counts[fam]
            if outcome != "failed":
                c[outcome] += 1
                continue
            c["failed"] += 1
            why = None
            if config != "baseline" and base.get(tid, (None, None, "passed"))[2] == "failed":
                why = "baseline"
            why = why or classify(expected, config, fam, name, msg)
            if why is None:
                c["unexpected"] += 1
                unexpected.setdefault(config, []).append((tid, msg))
            else:
                c["by_design"] += 1
                reasons.setdefault(config, collections.Counter())[(why, name)] += 1
        for fam in [f for f in FAMILIES if f in counts] + sorted(set(counts) - set(FAMILIES)):
            rows.append((config, fam, counts[fam], per_fam_wall.get(fam)))
        total = collections.Counter()
        for c in counts.values():
            total.update(c)
        wall = sum(per_fam_wall.values()) if per_fam_wall else None
        rows.append((config, "ALL", total, wall))
    return rows, unexpected, reasons


def table(rows, config=None) -> list[str]:
    out = ["| config | family | passed | failed | by design | unexpected | skipped | wall (s) |",
           "|---|---|---|---|---|---|---|---|"]
    for cfg, fam, c, wall in rows:
        if config is not None and cfg != config:
            continue
        w = f"{wall:.0f}" if wall is not None else "-"
        name = f"**{fam}**" if fam == "ALL" else fam
        out.append(f"| {cfg} | {name} | {c['passed']} | {c['failed']} | {c['by_design']} | {c['unexpected']} | "
                   f"{c['skipped']} | {w} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="run.sh's results folder (.peer/results)")
    ap.add_argument("--config", nargs="*", default=None, help="configurations (default: every one found)")
    ap.add_argument("--md-dir", default=None, help="write peer-<config>.md here (e.g. eval/results)")
    ap.add_argument("--expected", default=EXPECTED)
    ap.add_argument("--note", default="", help="a line for the markdown files (versions, machine)")
    a = ap.parse_args(argv)
    expected = load_expected(a.expected)
    configs = a.config
    if not configs:
        found = {os.path.basename(p)[:-4] for p in glob.glob(os.path.join(a.results, "*.xml"))}
        found |= {os.path.basename(os.path.dirname(os.path.dirname(p)))
                  for p in glob.glob(os.path.join(a.results, "*", "*", "*.xml"))}
        configs = sorted(found, key=lambda c: (c != "baseline", c != "pool1", c))
    rows, unexpected, reasons = summarize(a.results, configs, expected)
    print("\n".join(table(rows)))
    for config, items in unexpected.items():
        print(f"\n{config}: {len(items)} unexpected failure(s)")
        for tid, msg in items:
            print(f"  {tid}\n      {msg[:300]}")
    if a.md_dir:
        os.makedirs(a.md_dir, exist_ok=True)
        for config in configs:
            if not any(r[0] == config for r in rows):
                continue
            lines = [f"# Peer suite: {config} ({CONFIGS.get(config, config)})", "",
                     "transformers' own model tests of the nine supported families (`-m \"not slow\"`) with every "
                     "supported model they build patched (docs/peer-suite.md; `make test-peer PEER_CONFIG=" +
                     config + "`). Written by tools/peer/summary.py.", ""]
            if a.note:
                lines += [a.note, ""]
            lines += table(rows, config)
            if config in reasons:
                lines += ["", "By design (tools/peer/expected_failures.json):", "",
                          "| reason | test | count |", "|---|---|---|"]
                for (why, name), n in sorted(reasons[config].items()):
                    lines.append(f"| {why} | `{name}` | {n} |")
                lines += ["", "Reasons:", ""]
                for why in sorted({w for w, _ in reasons[config]}):
                    lines.append(f"- **{why}**: {expected['reasons'][why]}")
            items = unexpected.get(config, [])
            lines += ["", f"Unexpected failures: {len(items)}"]
            for tid, msg in items:
                lines.append(f"- `{tid}`: {msg[:300]}")
            with open(os.path.join(a.md_dir, f"peer-{config}.md"), "w", encoding="utf-8") as fh:
                fh.write("\n".join(lines) + "\n")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
