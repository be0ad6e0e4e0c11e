"""The peer suite (transformers' own LLaVA model tests on patched models, docs/peer-suite.md) as a slow check: the
LLaVA-1.5 family (the one where keep < 1 reduces most; ~2 min per configuration alone on 2 cores) under pool
keep=1.0 and fourier keep=0.5, with no failure that tools/peer/expected_failures.json does not list as by design.
The nine families and fastv: ``make test-peer`` (about an hour per configuration on 2 shared cores).

Needs the test copy and runner of ../shared/peer (PEER_DIR to point elsewhere) and network-free pip access to
pytest plugins on the first run (the runner's side venv in .peer/)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# PEER_DIR, else ../shared/peer from the checkout (the Makefile's default), else from a worktree one level deeper
_CANDIDATES = [Path(os.environ["PEER_DIR"])] if os.environ.get("PEER_DIR") else [
    ROOT.parent / "shared" / "peer", ROOT.parent.parent / "shared" / "peer"]
PEER_DIR = next((p for p in _CANDIDATES if (p / "run.sh").exists()), _CANDIDATES[0])

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not (PEER_DIR / "run.sh").exists(),
                    reason=f"the peer suite's test copy and runner are not at {PEER_DIR} (set PEER_DIR)")
def test_llava_peer_suite_has_no_unexpected_failure(tmp_path):
    sys.path.insert(0, str(ROOT / "tools" / "peer"))
    import summary

    env = {**os.environ, "PEER_PYTHON": sys.executable, "PEER_FAMILIES": os.environ.get("PEER_FAMILIES", "llava"),
           "PEER_RESULTS": str(tmp_path), "PEER_JOBS": "1"}
    subprocess.run(["bash", str(PEER_DIR / "run.sh"), "pool1", "fourier05"], cwd=ROOT, env=env, check=True,
                   timeout=3600)
    rows, unexpected, reasons = summary.summarize(str(tmp_path), ["pool1", "fourier05"], summary.load_expected())
    totals = {cfg: c for cfg, fam, c, _ in rows if fam == "ALL"}
    assert set(totals) == {"pool1", "fourier05"}, rows
    assert totals["pool1"]["passed"] > 100 and totals["fourier05"]["passed"] > 100   # the tests ran
    assert not unexpected, unexpected
    # keep=1.0 changes nothing: its only expected failures are the ones that fail unpatched too
    assert {why for why, _ in reasons.get("pool1", {})} <= {"baseline"}
    assert totals["fourier05"]["by_design"] > 0   # the shape checks see the shortened prompt
