"""The augmentation figure (the paper's Fig. 5): each scan beside augmented copies of it, as training draws them."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from covidscan.config import load_config  # noqa: E402
from covidscan.data import load_dataset, read_image  # noqa: E402
from covidscan.data.transforms import Preprocess, build_augment, to_gray_uint8  # noqa: E402
from covidscan.models import get_backbone  # noqa: E402


def augment_preview(data, out, *, config=None, overrides=None, n: int = 4, seed: int = 0, task=None) -> Path:
    """Rows: one scan each; columns: the preprocessed original, then 5 training augmentations."""
    cfg = load_config(config, overrides or [])
    index = load_dataset(data, task or cfg.data.task if config else task)
    pre = Preprocess.from_config(get_backbone(cfg.model.backbone), cfg.data, cfg.study)
    aug = build_augment(cfg.augment, pre.image_size)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(index), size=min(n, len(index)), replace=False)
    cols = 6
    fig, axes = plt.subplots(len(picks), cols, figsize=(2 * cols, 2 * len(picks)), squeeze=False)
    gen_state = torch.random.fork_rng()
    with gen_state:
        torch.manual_seed(seed)
        for r, i in enumerate(picks):
            rec = index.records[i]
            x = to_gray_uint8(read_image(rec.path), pre)
            for c in range(cols):
                img = x if c == 0 or aug is None else aug(x)
                ax = axes[r, c]
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=255)
                ax.set_xticks([])
                ax.set_yticks([])
                if c == 0:
                    ax.set_ylabel(rec.label, fontsize=9)
                if r == 0:
                    ax.set_title("original" if c == 0 else f"augmented {c}", fontsize=9)
    a = cfg.augment
    fig.suptitle(
        f"training augmentation: rotation ±{a.rotation:g}°, zoom ±{a.zoom:g}, shift ±{a.shift:g}, h-flip p={a.hflip:g}",
        fontsize=10,
    )
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
