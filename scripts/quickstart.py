"""Wrap the offline DINOv2-small backbone with Mona, take a few training steps, save and reload the adapter.

A short end-to-end check of the method on real pretrained weights; the full fine-tuning job is scripts/train.py.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from peft import PeftModel, get_peft_model
from transformers import Dinov2ForImageClassification

import mona_peft
from mona_peft.offline import ensure_dinov2_small


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", default=None, help="where to save the adapter (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    backbone_dir = ensure_dinov2_small()
    base = Dinov2ForImageClassification.from_pretrained(backbone_dir, num_labels=3)
    model = get_peft_model(base, mona_peft.MonaConfig(modules_to_save=["classifier"]))
    model.print_trainable_parameters()

    pixels = torch.randn(4, 3, 112, 112)
    labels = torch.tensor([0, 1, 2, 0])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for step in range(args.steps):
        loss = model(pixel_values=pixels, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="mona-quickstart-")
    model.save_pretrained(output_dir)
    fresh = Dinov2ForImageClassification.from_pretrained(backbone_dir, num_labels=3)
    reloaded = PeftModel.from_pretrained(fresh, output_dir).eval()
    with torch.no_grad():
        same = torch.equal(reloaded(pixel_values=pixels).logits, expected)
    print(f"adapter saved to {output_dir}; reloaded logits identical: {same}")
    if not same:
        raise SystemExit("reloaded adapter does not reproduce the trained model")


if __name__ == "__main__":
    main()
