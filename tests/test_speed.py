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


def test_decode_bench_interleaves_rows_and_measures_vltok_host_time(monkeypatch):
    """vltok bench --decode on CPU with a tiny LLaVA: per-step timing (synced perf_counter without CUDA) of the
    unpatched model, IDEAL and pre-LLM / in-LLM methods, rows interleaved round by round, vltok's host time per
    decode step from an instrumented run that leaves nothing behind."""
    import time as _time

    import vltok
    from tiny_families import deep_llava
    from vltok.adapters import base

    m = deep_llava(layers=4)
    calls, real = [], speed.generate_steps

    def logged(model, inputs, n_new):
        h = vltok.get_handle(model)
        calls.append(h.method.name if h else ("IDEAL" if "get_image_features" in model.model.__dict__
                                               else "unpatched"))
        return real(model, inputs, n_new)

    real(m, speed.make_inputs(m, "llava", 1, "cpu"), 2)   # transformers installs its own capture hooks once
    monkeypatch.setattr(speed, "generate_steps", logged)
    hooks_before = speed._module_hooks(m)
    prepare_before, bind_before = base.PlaceholderAdapter.prepare, base._bind
    rows = speed.decode_bench(m, "tiny", "llava", ["pool", "fourier", "fastv", "feather"], 0.6, 2, n_new=5,
                              rounds=3, device="cpu")
    by = {r["row"]: r for r in rows}
    assert list(by) == ["unpatched", "IDEAL", "pool", "fourier", "fastv", "feather"]
    assert not any(r.get("error") for r in rows)
    for r in rows:
        assert r["steps"] == 3 * 4 and r["decode_ms"] > 0 and r["timer"] == "perf_counter (synced)"
        assert abs(r["tok_s"] - 2 * r["steps_per_s"]) < 1e-6 and r["p10_ms"] <= r["decode_ms"] <= r["p90_ms"]
    assert by["IDEAL"]["vs_ideal"] == 1.0 and by["unpatched"]["vs_unpatched"] == 1.0
    assert "host_us" not in by["unpatched"] and "host_us" not in by["IDEAL"]
    assert by["pool"]["kind"] == "pre_llm" and by["fastv"]["kind"] == "in_llm"
    # an in-LLM method works in every decode step (each layer's mask is gathered); a pre-LLM one does almost nothing
    assert 0 < by["pool"]["host_us"] < by["fastv"]["host_us"] and by["feather"]["host_us"] > by["pool"]["host_us"]
    # timed calls: 6 warm-ups, 3 rounds of all 6 rows with the order rotated each round, then 4 instrumented runs
    timed = calls[6:6 + 18]
    names = list(by)
    assert timed == names + names[1:] + names[:1] + names[2:] + names[:2]
    assert calls[24:] == ["pool", "fourier", "fastv", "feather"]
    # nothing left behind: no patch, no hook, no wrapper
    assert vltok.get_handle(m) is None and speed._module_hooks(m) == hooks_before
    assert base.PlaceholderAdapter.prepare is prepare_before and base._bind is bind_before
    assert "get_image_features" not in m.model.__dict__
    md = speed.decode_markdown(rows, "# t")
    assert md.count("| tiny | 2 | 0.60 |") == 6 and "< 1% |" in md and "< 3% |" in md

    # the host time is vltok's: a slower prepare shows up in it
    orig = base.PlaceholderAdapter.prepare

    def slow(self, *a, **k):
        _time.sleep(0.002)
        return orig(self, *a, **k)

    monkeypatch.setattr(base.PlaceholderAdapter, "prepare", slow)
    rows = speed.decode_bench(m, "tiny", "llava", ["pool"], 0.5, 1, n_new=3, rounds=1, device="cpu")
    assert next(r for r in rows if r["row"] == "pool")["host_us"] >= 2000


def test_generate_steps_times_each_decode_step():
    m = tiny_llava()
    inputs = speed.make_inputs(m, "llava", 1, "cpu")
    steps = speed.generate_steps(m, inputs, 6)
    assert len(steps) == 5 and all(s > 0 for s in steps)
