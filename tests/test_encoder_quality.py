"""vltok.eval.tools.encoder_quality: the HF Dinov2 -> timm mapping and the probe pipeline, on a tiny random Dinov2 (no
cache, no hub). Needs timm, which needs torchvision: run in .venv-vision; skipped with that reason in the main .venv."""
import pytest
import torch

timm = pytest.importorskip("timm", reason="timm needs torchvision: run in .venv-vision (see README)")

from transformers import Dinov2Config, Dinov2Model  # noqa: E402

from vltok.eval.tools import encoder_quality as eq  # noqa: E402
from vltok.reference import dinov2_key_map  # noqa: E402


def tiny_dinov2():
    """A random Dinov2 (2 layers, 32 wide, patch 4, native 32 px) with every parameter randomised, layer-scale and
    position embeddings included, and its state dict under the hub's key names (as the vltok.reference cache)."""
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4, patch_size=4,
                       image_size=32, layerscale_value=1.0)
    m = Dinov2Model(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            unit = 1.0 if "norm" in name and name.endswith("weight") else 0.0   # layer norms scale around 1
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.5) + unit)
    hub = {v: k for k, v in dinov2_key_map(m).items()}
    return m, cfg, {hub[k]: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("px", [32, 24, 40])
@pytest.mark.parametrize("names", ["hub", "transformers"])
def test_hf_to_timm_reproduces_hf_dinov2(px, names):
    hf, cfg, sd = tiny_dinov2()
    state = sd if names == "hub" else hf.state_dict()
    vit = eq.timm_dinov2(state, cfg, px)
    assert type(vit).__module__.startswith("timm.") and vit.patch_embed.num_patches == (px // 4) ** 2
    x = torch.randn(2, 3, px, px)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        got = vit.forward_features(x)
    assert got.shape == ref.shape == (2, 1 + (px // 4) ** 2, 32)
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()
    # the pieces the mapping must carry really matter here: without the layer-scale gammas the output moves
    vit.blocks[1].ls2.gamma.data.fill_(1.0)
    with torch.no_grad():
        assert not torch.allclose(vit.forward_features(x), ref, atol=1e-3)


def test_resample_pos_is_hf_interpolation():
    hf, cfg, sd = tiny_dinov2()
    pos = sd["embeddings.position_embeddings"]
    emb = torch.zeros(1, 1 + 36, 32)
    assert torch.equal(eq.resample_pos(pos, (6, 6)), hf.embeddings.interpolate_pos_encoding(emb, 24, 24))
    assert eq.resample_pos(pos, (8, 8)) is pos


def test_probe_pipeline_runs_and_keep1_is_unpatched():
    _, cfg, sd = tiny_dinov2()
    args = eq.parse_args(["--n-train", "16", "--n-test", "8", "--img-size", "28", "--keeps", "0.5", "1",
                          "--batch", "8", "--hf-check", "2"])
    args.weights, args.command = (sd, cfg), "test"
    assert args.keeps == [1.0, 0.5]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny matrices: thread hand-offs cost more than the work on a busy 2-core runner
    try:
        res = eq.run(args)
    finally:
        torch.set_num_threads(threads)
    assert res["hf_check"]["max_abs_patch"] < 1e-5 and res["n_patches"] == 49
    rows = {(r["method"], r["keep"]): r for r in res["rows"]}
    assert set(rows) == {(m, k) for m in eq.METHODS for k in (1.0, 0.5)}
    for m in eq.METHODS:
        one = rows[m, 1.0]
        assert one["accuracy"] == res["unpatched"]["accuracy"] and one["cls_max_abs_diff"] == 0.0
        assert one["tokens_out"] == 49 and one["flops_share"] == 1.0
    for m in ("tome", "crossget"):
        half = rows[m, 0.5]
        assert half["tokens_out"] == round(0.5 * 49) and half["flops_share"] < 1.0
        assert 0 < half["flops_keep"] < 1 and half["cls_max_abs_diff"] > 1e-4   # merging changed the CLS output
    low = rows["lowres", 0.5]
    assert low["tokens_out"] == 25 and low["flops_share"] < 0.6
    assert low["cls_max_abs_diff"] > 1e-4
    assert rows["pool-final", 0.5]["flops_share"] == 1.0 and rows["pool-final", 0.5]["cls_max_abs_diff"] == 0.0
    for feat in eq.FEATURES:
        assert set(res["unpatched"]["accuracy"][feat]) == set(eq.TASKS) | {"mean"}
    md = eq.to_markdown(res)
    assert md.count("| tome | 0.5 |") == len(eq.FEATURES) == 3 and "Probe on the final CLS token" in md


def test_ridge_probe_learns_a_separable_task():
    torch.manual_seed(0)
    y = torch.arange(200) % 4
    X = 1.5 * torch.randn(4, 5)[y] + torch.randn(200, 5)   # 4 Gaussian classes in 5 dims
    probe, lam = eq.train_probe(X[:150], y[:150], 4)
    assert lam in eq.LAMBDAS
    acc = (eq.predict(probe, X[150:]) == y[150:]).double().mean()
    assert acc > 0.75, acc
    shuffled, _ = eq.train_probe(X[:150], y[:150][torch.randperm(150)], 4)   # no signal: near chance (0.25)
    assert (eq.predict(shuffled, X[150:]) == y[150:]).double().mean() < 0.6
