"""Join video quality runs into one table: parts over the same questions add rows, parts over disjoint questions add
questions (e.g. a CPU run split into parts); optionally an earlier table's rows on the joined questions are added
(e.g. a GPU table's rows, to compare on the same questions).

    python -m vltok.eval.quality_video_join A/quality-video.json B/quality-video.json --out DIR \\
        [--add-from eval/results/quality-video-h100.json --min-agreement 0.95]

Parts over the same questions are merged first (``merge_docs``: their full-model runs must agree); the groups over
disjoint questions must then have the same rows (labels) and no question twice (``join``). ``--add-from``: that
table's method and trade-off rows, scored again on the joined questions only, are added through ``merge_docs``
(refused unless both full-model runs answer at least ``--min-agreement`` of the questions alike; the table records
the agreement). Writes ``quality-video.json``, ``.md`` and ``.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vltok.eval import quality_video as Q


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="+", type=Path, help="quality-video.json files (same or disjoint questions)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--add-from", type=Path, default=None, help="an earlier quality-video.json with every question")
    ap.add_argument("--min-agreement", type=float, default=0.99)
    args = ap.parse_args(argv)
    docs = []
    for p in [*args.parts, *([args.add_from] if args.add_from else [])]:
        try:
            docs.append(json.loads(p.read_text()))
        except (OSError, ValueError) as e:
            ap.error(f"{p}: cannot read it as a quality-video.json ({e})")
    try:
        doc = Q.combine(docs[:len(args.parts)], args.min_agreement)
        if args.add_from:
            doc = Q.merge_docs(doc, Q.restrict(docs[-1], Q.question_ids(doc)), min_agreement=args.min_agreement)
    except (ValueError, KeyError, IndexError) as e:
        print(f"quality_video_join: error: {e}", file=sys.stderr)
        return 2
    Q.write(doc, args.out)
    print(Q.markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
