"""Train the digit classifier whose weights ship as src/pixeldiffusion/assets/
digit_classifier.safetensors (the feature extractor of the offline digit-FID).

    python scripts/train_digit_classifier.py     # about 4 minutes on a busy 2-core CPU

Reproducible: one CPU thread, fixed seeds, the held-in split of ``digit_classifier.digit_splits``
(4,000 of the 5,000 built-in digits; the other 1,000 are never seen and give the held-out
accuracy stored in the weights' metadata). Augmentation: random shifts of up to 2 pixels.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pixeldiffusion.digit_classifier import DigitClassifier, builtin_digits

SEED = 0
EPOCHS = 15
BATCH = 64
LR = 2e-3
SHIFT = 2


def shifted(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image of x [B, 1, 32, 32] moved by up to SHIFT pixels in x and y (background -1)."""
    padded = F.pad(x, (SHIFT,) * 4, value=-1.0)
    out = torch.empty_like(x)
    offsets = torch.randint(0, 2 * SHIFT + 1, (x.shape[0], 2), generator=generator)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]
    return out


def accuracy(model: DigitClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model.logits(x).argmax(dim=1) == y).double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "src" /
                                             "pixeldiffusion" / "assets" /
                                             "digit_classifier.safetensors"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    x_in, y_in = builtin_digits("heldin")
    x_out, y_out = builtin_digits("heldout")
    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    steps = EPOCHS * (len(x_in) // BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LR, total_steps=steps)
    start = time.perf_counter()
    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(x_in), generator=generator)
        for b in range(len(x_in) // BATCH):
            index = order[b * BATCH:(b + 1) * BATCH]
            loss = F.cross_entropy(model.logits(shifted(x_in[index], generator)), y_in[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1:2d}  loss {loss.item():.4f}  "
              f"held-out accuracy {accuracy(model, x_out, y_out):.2%}", flush=True)
    info = {"script": "scripts/train_digit_classifier.py", "seed": SEED, "epochs": EPOCHS,
            "train_split": "heldin (4000)", "heldin_accuracy": accuracy(model, x_in, y_in),
            "heldout_accuracy": accuracy(model, x_out, y_out),
            "seconds": round(time.perf_counter() - start, 1),
            "torch": torch.__version__}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, args.out, metadata={"format": "pixeldiffusion-digit-classifier/1",
                                          "info": json.dumps(info)})
    print(json.dumps(info))
    print(args.out)


if __name__ == "__main__":
    main()
