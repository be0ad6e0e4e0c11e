"""Example: patch a LLaVA-1.5-shaped model (random weights, 576 visual tokens) and compare budgets.

Run: make example   (or: python -m vltok.demos.example [--keeps 1 0.5 0.25 0.16])
The model is a stock LlavaForConditionalGeneration built offline with a small language model, so the answers are
noise; what this shows is the plumbing: visual tokens reaching the LLM, sequence lengths, time, generate().
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

import vltok


def build(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, image_size=336, patch_size=14, projection_dim=64),
        text_config=dict(model_type="llama", vocab_size=1000, hidden_size=256, intermediate_size=688,
                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0),
        image_token_index=999, vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576)
    return LlavaForConditionalGeneration(cfg).eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.16, 0.11])
    ap.add_argument("--methods", nargs="+", default=["fourier", "pool", "random"])
    args = ap.parse_args(argv)
    model = build()
    ids = torch.tensor([[1] + [5, 6, 7] + [999] * 576 + [8, 9, 10, 11]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                  pixel_values=torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0)))
    print(vltok.methods(), "\n")
    print(f"{'method':<8} {'keep':>5} {'visual->LLM':>11} {'achieved':>8} {'seq len':>7} {'prefill ms':>10} "
          f"{'in vltok ms':>11}  greedy tokens")
    for method in args.methods:
        for keep in args.keeps:
            with torch.no_grad(), vltok.patched(model, method, keep=keep) as h:
                t0 = time.perf_counter()
                model(**inputs)
                dt = (time.perf_counter() - t0) * 1e3
                s = h.stats
                out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
            print(f"{method:<8} {keep:>5.2f} {s['tokens_out']:>11} {s['keep_achieved']:>8.3f} "
                  f"{s.get('seq_len_out', ids.shape[1]):>7} {dt:>10.1f} {s['seconds'] * 1e3:>11.2f}  "
                  f"{out[0, ids.shape[1]:].tolist()}")


if __name__ == "__main__":
    main()
