"""The demo end to end over real HTTP (gradio_client against a launched app), and demo_core.run_cell's cells.

A tiny LLaVA-1.5 with the reference VLM's processor (576 placeholders) stands in for the model, so a cell takes a
fraction of a second; the browser test (test_demo_browser.py) runs the reference VLM itself."""
from __future__ import annotations

import socket
import threading

import pytest

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

import vltok  # noqa: E402
from vltok import demo_core as core  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dm():
    from demo_tiny import tiny_demo_model

    return tiny_demo_model(n_layers=12)


@pytest.fixture(scope="module")
def client(dm):
    from gradio_client import Client

    from vltok.demos import app

    port = free_port()
    demo = app.launch(dm, port=port, block=False, max_new_tokens=3)
    assert demo.local_url.startswith(f"http://127.0.0.1:{port}")
    yield Client(demo.local_url, verbose=False)
    demo.close()


def _example():
    return core.examples()[0]


def test_run_endpoint_fills_every_cell(client):
    from gradio_client import handle_file

    ex = _example()
    cells, status = client.predict(handle_file(ex["image_path"]), ex["question"], ["random", "fastv", "tome"],
                                   ["0.5", "0.25"], api_name="/run")
    assert status.startswith("Done: 6 cells")
    assert [(c["method"], c["keep"]) for c in cells] == [(m, k) for m in ("random", "fastv", "tome")
                                                         for k in (0.5, 0.25)]
    for c in cells:
        assert c["status"] == "ok", c
        assert isinstance(c["answer"], str) and c["total_s"] >= c["ttft_s"] > 0
    by = {(c["method"], c["keep"]): c for c in cells}
    assert by[("random", 0.25)]["tokens"] == 144 and by[("random", 0.25)]["kept_kind"] == "select"
    assert by[("tome", 0.5)]["tokens"] == 288 and by[("tome", 0.5)]["kept_kind"] == "merge"
    fv = by[("fastv", 0.25)]
    assert fv["kept_kind"] == "in_llm" and fv["tokens"] == 576 and fv["final_tokens"] < 576
    assert len(fv["tokens_per_layer"]) == 12 and abs(fv["flops_keep"] - 0.25) < 0.01


def test_a_variant_that_fixes_its_budget_runs_once(client):
    """"feather preset=paper" fixes its own budget: one cell whatever budgets are ticked, at the keep it gave."""
    from gradio_client import handle_file

    ex = _example()
    cells, status = client.predict(handle_file(ex["image_path"]), ex["question"], ["pool", "feather preset=paper"],
                                   ["0.5", "0.25"], api_name="/run")
    assert status.startswith("Done: 3 cells")
    assert [(c["method"], c["keep"]) for c in cells[:2]] == [("pool", 0.5), ("pool", 0.25)]
    f = cells[2]
    assert f["method"] == "feather preset=paper" and f["status"] == "ok" and f["keep_set_by"] == "preset='paper'"
    assert f["keep"] == f["flops_keep"] and 0.2 < f["keep"] < 0.5 and f["final_tokens"] < 576


def test_budget_below_the_floor_is_the_methods_error(client):
    from gradio_client import handle_file

    ex = _example()
    cells, _ = client.predict(handle_file(ex["image_path"]), ex["question"], ["pool", "fastv"],
                              ["0.11"], api_name="/run")
    assert cells[0]["status"] == "ok" and cells[0]["tokens"] == 64   # the other cell still filled
    assert cells[1]["status"] == "error" and "fastv cannot reach keep=0.11" in cells[1]["message"] and "floor" in cells[1]["message"]


@pytest.mark.parametrize("question, match", [("", "empty"), ("x" * 400, "at most")])
def test_bad_question_is_refused_and_the_app_lives_on(client, question, match):
    from gradio_client import handle_file

    with pytest.raises(Exception, match=match):
        client.predict(handle_file(_example()["image_path"]), question, ["pool"], ["0.5"], api_name="/run")
    cells, _ = client.predict(handle_file(_example()["image_path"]), "What color is the star?", ["pool"], ["0.5"],
                              api_name="/run")
    assert cells[0]["status"] == "ok"


def test_unreadable_upload_is_refused(client, tmp_path):
    from gradio_client import handle_file

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(Exception, match="(?i)image"):
        client.predict(handle_file(str(bad)), "What color is the star?", ["pool"], ["0.5"], api_name="/run")


def test_two_visitors_queue(client):
    from gradio_client import handle_file

    ex = _example()
    jobs = [client.submit(handle_file(ex["image_path"]), ex["question"], [m], ["0.25"], api_name="/run")
            for m in ("pool", "random")]
    results = [j.result(timeout=120) for j in jobs]
    assert [r[0][0]["method"] for r in results] == ["pool", "random"]
    assert [r[0][0]["tokens"] for r in results] == [144, 144]


def test_speed_endpoint(client):
    info, table = client.predict("speed-h100-b1-llava.json", api_name="/speed")
    assert "H100" in info and table["headers"][0] == "model" and len(table["data"]) > 4


# -- demo_core.run_cell directly ---------------------------------------------------------------------------------
def test_cells_never_see_another_requests_patch(dm):
    """Threads run cells at once: inside every generate the model carries the cell's own patch, and afterwards none."""
    ex = _example()
    seen, orig = [], dm.model.generate

    def generate(*a, **k):   # runs inside the patched generate wrapper's call chain: the handle is the cell's
        seen.append(vltok.get_handle(dm.model).method.name)
        return orig(*a, **k)

    results = {}

    def work(m):
        results[m] = dm.run_cell(ex["image_path"], ex["question"], m, 0.5, max_new_tokens=2)

    dm.model.generate = generate   # under vltok's instance wrapper, which calls the attribute it found at patch time
    try:
        threads = [threading.Thread(target=work, args=(m,)) for m in ("pool", "random", "fourier", "tome")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        del dm.model.generate
    assert vltok.get_handle(dm.model) is None
    assert sorted(seen) == ["fourier", "pool", "random", "tome"]
    assert all(results[m].status == "ok" for m in results)


def test_not_applicable_shows_the_support_reason():
    from tiny_families import tiny_blip

    from vltok.support import incompatibility
    from vltok.api import build_method

    blip = core.DemoModel(tiny_blip(), processor=None, name="tiny-blip")
    cell = blip.run_cell(_example()["image_path"], "What is it?", "fastv", 0.5)
    assert cell.status == "n/a"
    assert incompatibility(blip.adapter_cls, build_method("fastv", 0.5)) in cell.message
    assert "BLIP" in cell.message


def test_right_and_wrong_marks(dm):
    ex = _example()
    cell = dm.run_cell(ex["image_path"], ex["question"], "pool", 0.5, truth=ex, max_new_tokens=2)
    assert cell.correct is core.is_correct(cell.answer, ex) and cell.correct is not None
    assert ("✓ right" in cell.text()) == cell.correct and ("✗ wrong" in cell.text()) == (not cell.correct)
    assert cell.overlay is not None and cell.overlay.size == (336, 336)


def test_time_grid_and_cli(dm):
    from vltok.cli import build_parser

    runs = core.time_grid(dm, ("pool", "fastv"), (0.5,), repeats=1, max_new_tokens=2)
    assert runs[0]["cells"] == 2 and runs[0]["ok"] == 2 and runs[0]["seconds"] > 0
    args = build_parser().parse_args(["demo"])
    assert (args.port, args.host, args.share, args.model, args.dtype) == (7860, "127.0.0.1", False, None, "float32")
    args = build_parser().parse_args(["demo", "--port", "7999", "--share", "--model", "/x", "--time-grid"])
    assert args.port == 7999 and args.share and args.model == "/x" and args.time_grid
