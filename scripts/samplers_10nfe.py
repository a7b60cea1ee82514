"""One grid per sampler at 10 model calls, side by side, from the same noise: the picture
docs/samplers_10nfe.png.

    python scripts/samplers_10nfe.py -cp runs/digits -o docs/samplers_10nfe.png

Each sampler uses its default spacing (``samplers.default_spacing``); ``heun`` gets 5 timesteps,
i.e. 9 NFE (2 n - 1). Stochastic samplers draw their noise from the same seeded generator.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image, ImageDraw

from pixeldiffusion.checkpoint import load_checkpoint
from pixeldiffusion.images import atomic_save, make_grid, to_uint8
from pixeldiffusion.samplers import SAMPLERS, default_spacing, nfe_of, sample
from pixeldiffusion.schedule import alphas_cumprod_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-cp", "--checkpoint", default="runs/digits")
    parser.add_argument("-o", "--out", default="docs/samplers_10nfe.png")
    parser.add_argument("--nfe", type=int, default=10)
    parser.add_argument("-n", type=int, default=16, help="images per sampler (a square grid)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    loaded = load_checkpoint(args.checkpoint, use_ema=True, device=torch.device("cpu"))
    cfg = loaded.config
    alphas_cumprod = alphas_cumprod_of(cfg)
    shape = (args.n, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    nrow = int(round(args.n ** 0.5))
    panels = []
    for name in SAMPLERS:
        steps = (args.nfe + 1) // 2 if name == "heun" else args.nfe
        x0 = sample(loaded.model, x_T, alphas_cumprod, sampler=name, steps=steps,
                    prediction=cfg.diffusion.prediction, clip_x0=cfg.sample.clip_x0,
                    generator=torch.Generator().manual_seed(args.seed + 1))
        grid = make_grid(to_uint8(x0), nrow)
        label = f"{name} ({default_spacing(name)}, {nfe_of(name, steps)} NFE)"
        panels.append((label, grid))
        print(label)
    scale, pad, header = 2, 8, 18
    h, w = panels[0][1].shape[:2]
    canvas = Image.new("L", (len(panels) * (w * scale + pad) + pad, h * scale + header + pad), 255)
    draw = ImageDraw.Draw(canvas)
    for k, (label, grid) in enumerate(panels):
        left = pad + k * (w * scale + pad)
        picture = Image.fromarray(np.ascontiguousarray(grid[..., 0])).resize(
            (w * scale, h * scale), Image.NEAREST)
        canvas.paste(picture, (left, header))
        draw.text((left, 3), label, fill=0)
    print(atomic_save(canvas, args.out))


if __name__ == "__main__":
    main()
