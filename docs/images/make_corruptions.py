"""Draw docs/images/corruptions.png: the 15 corruptions × 5 severities (paper key ``cotta``).

    OMP_NUM_THREADS=1 PYTHONPATH=src python docs/images/make_corruptions.py
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from weightlab.data import digits
from weightlab.data.corruptions import CORRUPTIONS, corrupt
from weightlab.report.plots import plt


def corruption_grid(digit: torch.Tensor, colour: torch.Tensor, *, seed: int = 0):  # noqa: ANN201
    """A figure: one row per corruption; clean + severities 1–5 of ``digit`` (1×H×W) and of ``colour``."""
    fig, axes = plt.subplots(len(CORRUPTIONS), 12, figsize=(12 * 0.62, len(CORRUPTIONS) * 0.66))
    for row, name in enumerate(CORRUPTIONS):
        for block, image in enumerate((digit, colour)):
            x = image.unsqueeze(0)
            shown = [x] + [corrupt(x, name, s, generator=torch.Generator().manual_seed(seed))
                           for s in range(1, 6)]
            for col, img in enumerate(shown):
                ax = axes[row, 6 * block + col]
                ax.imshow(img[0].permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1,
                          interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title("clean" if col == 0 else f"s{col}", fontsize=7)
        axes[row, 0].set_ylabel(name.replace("_", "\n"), fontsize=6, rotation=0, ha="right", va="center")
    fig.subplots_adjust(wspace=0.05, hspace=0.08, left=0.12, right=0.99, top=0.97, bottom=0.01)
    return fig


def main() -> None:
    digit = digits("test", size=16).x[5]  # (1, 16, 16)
    g = torch.Generator().manual_seed(0)
    colour = F.interpolate(torch.rand(1, 3, 5, 5, generator=g), size=32, mode="bicubic", align_corners=False)
    colour = colour.clamp(0, 1)[0]  # a smooth synthetic colour image (3, 32, 32)
    out = Path(__file__).with_name("corruptions.png")
    corruption_grid(digit, colour).savefig(out, dpi=90)
    from PIL import Image  # a 128-colour palette keeps the file small

    Image.open(out).convert("RGB").quantize(colors=128).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
