"""The speed benchmark's logic on CPU with a tiny model (timings here mean nothing; the GPU run is the benchmark)."""
from tiny import tiny_llava, tiny_llava_next
from vltok.eval import speed


def test_bench_rows_on_cpu_llava():
    m = tiny_llava()
    rows = speed.bench_model("tiny-llava", ["fourier", "random"], [1.0, 0.25], [1, 2], n_new=3, reps=1, fast=True,
                             model=m, family="llava", device="cpu")
    methods = [(r["method"], r["keep"], r["batch"]) for r in rows]
    assert ("none", 1.0, 1) in methods and ("IDEAL", 0.25, 2) in methods and ("fourier+fast", 0.25, 1) in methods
    four = next(r for r in rows if r["method"] == "fourier" and r["keep"] == 0.25 and r["batch"] == 2)
    assert four["visual_tokens"] == 16 and four["vltok_ms"] > 0 and four["decode_tok_s"] > 0
    ideal = next(r for r in rows if r["method"] == "IDEAL" and r["keep"] == 0.25 and r["batch"] == 2)
    assert ideal["visual_tokens"] == 16
    md = speed.markdown(rows, "# t")
    assert md.count("\n") == len(rows) + 3 and "IDEAL" in md


def test_ideal_slicing_feeds_the_unpatched_model_k_tokens():
    m = tiny_llava_next()
    rows = speed.bench_model("tiny-next", ["pool"], [0.25], [1], n_new=2, reps=1, fast=False, model=m,
                             family="llava_next", device="cpu")
    ideal = next(r for r in rows if r["method"] == "IDEAL")
    pool = next(r for r in rows if r["method"] == "pool")
    assert ideal["visual_tokens"] == pool["visual_tokens"] < next(r for r in rows if r["method"] == "none")["ttft_ms"] * 1e9


def test_qwen_rows_and_optimistic_ideal(monkeypatch):
    from tiny_families import tiny_qwen

    monkeypatch.setattr(speed, "QWEN_GRID", (1, 8, 12))
    m = tiny_qwen("2")
    rows = speed.bench_model("tiny-qwen", ["fourier"], [0.25], [1], n_new=2, reps=1, fast=False, model=m,
                             family="qwen2_vl", device="cpu")
    four = next(r for r in rows if r["method"] == "fourier")
    ideal = next(r for r in rows if r["method"] == "IDEAL")
    assert ideal["visual_tokens"] == four["visual_tokens"]


def test_blip2_rows_reduce_the_vit_grid_and_have_no_ideal_row(monkeypatch):
    from tiny_families import tiny_blip2

    monkeypatch.setattr(speed, "TEXT_BEFORE", 5)   # the tiny OPT has few positions
    monkeypatch.setattr(speed, "TEXT_AFTER", 6)
    m = tiny_blip2()
    rows = speed.bench_model("tiny-blip2", ["pool", "fastv"], [0.25], [2], n_new=2, reps=1, fast=False, model=m,
                             family="blip2", device="cpu")
    pool = next(r for r in rows if r["method"] == "pool")
    assert "error" not in pool and pool["vltok_ms"] > 0
    vc = m.config.vision_config
    assert pool["visual_tokens"] < (vc.image_size // vc.patch_size) ** 2   # the ViT grid before the Q-Former
    assert not any(r["method"] == "IDEAL" for r in rows)
    assert not any(r["method"] == "fastv" for r in rows)   # refused by the support matrix: skipped, not a row
