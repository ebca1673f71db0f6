"""Would a float16 CLIP cache do? SalMM's output with float32 vs float16-rounded embeddings.

    python -m bench.embed_fp16 [--frames 8] [--gammas 0.01,0.1,1]

Embeds ``--frames`` smooth synthetic 256x256 frames with a random-weight ViT-B-32 (profile
salmm), rounds the embeddings to float16 and back, and runs the same SalMM (random init, torch
backend) on both. The cross-modal attention weight ``gamma`` is 0 at init (the embedding would
not matter at all), so it is set to each of ``--gammas`` in turn. Also repeated with the
embeddings rescaled to norm 10, the order of magnitude of OpenAI ViT-B/32 image embeddings.
Prints max and mean |output difference| (the output is a saliency map in (0, 1)); the cache
stores float32 unless the max stays below 1e-4.
"""

from __future__ import annotations

import argparse
import logging

import torch

from pipeline.encoders.clip import ClipSpec, cached_encoder
from salmm.model.net import SalMM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--gammas", default="0.01,0.1,1")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.manual_seed(0)

    coarse = torch.rand(args.frames, 3, 8, 8)
    frames = torch.nn.functional.interpolate(coarse, size=(256, 256), mode="bilinear")
    with torch.inference_mode():
        emb = cached_encoder(ClipSpec(pretrained=None)).encode(frames)     # [B, 512]
    model = SalMM(backend="builtin").eval()
    worst = 0.0
    for name, e in (("random-weight CLIP embeddings", emb),
                    ("rescaled to norm 10", emb / emb.norm(dim=1, keepdim=True) * 10)):
        rounded = e.half().float()
        print(f"{name}: norm {e.norm(dim=1).mean():.1f},"
              f" max |e - fp16(e)| {(e - rounded).abs().max():.2e}")
        for gamma in (float(g) for g in args.gammas.split(",")):
            with torch.no_grad():
                model.CrossModelAtt.gamma.fill_(gamma)
                diff = (model(frames, e) - model(frames, rounded)).abs()
            worst = max(worst, diff.max().item())
            print(f"  gamma {gamma:<5g} output |fp32 - fp16|: max {diff.max():.2e},"
                  f" mean {diff.mean():.2e}")
    verdict = "float16 would do" if worst < 1e-4 else "keep float32"
    print(f"largest output difference {worst:.2e} vs tolerance 1e-4: {verdict}")


if __name__ == "__main__":
    main()
