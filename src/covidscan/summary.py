"""Model summary (the paper's Figures 6 and 7): the layer table and a block diagram of stages and head.

``covidscan summary --config C`` (or ``--checkpoint K``) builds the network for the task's number of
classes with random weights (nothing is downloaded) and prints torchinfo's table: each layer's output
shape and parameter count down to ``depth``, totals, trainable parameters and the input size. With
``--diagram out.png`` it also draws the top-level stages of the backbone and the head as boxes with the
output shape after each (measured with forward hooks on a dummy input of the model's input size).
"""

from __future__ import annotations

from pathlib import Path

import torch

from covidscan.config import Config
from covidscan.labels import TASKS
from covidscan.models import CovidNet, build_model, get_backbone


def model_for(config: Config | None = None, checkpoint=None) -> tuple[CovidNet, int, str]:
    """``(model, input_size, title)`` from a config (random weights) or a checkpoint (its weights)."""
    if checkpoint is not None:
        from covidscan.checkpoint import load_checkpoint, model_from_checkpoint

        model, meta = model_from_checkpoint(load_checkpoint(checkpoint), checkpoint)
        return model, meta.preprocess.image_size, f"{meta.backbone} + {meta.head}, {meta.task} ({len(meta.class_names)} classes)"
    cfg = config or Config()
    n = len(TASKS[cfg.data.task])
    model, _ = build_model(cfg.model.backbone, cfg.model.head, n, weights="none", download=False)
    size = cfg.data.image_size or get_backbone(cfg.model.backbone).input_size
    return model, size, f"{cfg.model.backbone} + {cfg.model.head} head, {cfg.data.task} ({n} classes)"


def summary_table(model: torch.nn.Module, size: int, *, depth: int = 2) -> str:
    """torchinfo's layer table for a ``1 x 3 x size x size`` input (output shapes, parameters, totals)."""
    from torchinfo import summary

    model.eval()
    stats = summary(
        model,
        input_size=(1, 3, size, size),
        depth=depth,
        col_names=("output_size", "num_params", "trainable"),
        row_settings=("var_names",),
        verbose=0,
        device="cpu",
    )
    # torchinfo counts mult-adds and parameter bytes of leaf layers only: a convolution with a padding child
    # (EfficientNet-Lite's Conv2dStaticSamePadding) drops out. The totals below are counted here, every
    # convolution and linear layer once, whatever it contains.
    params, macs = totals(model, size)
    lines = str(stats).splitlines()
    for k, line in enumerate(lines):
        if line.startswith("Total mult-adds"):
            lines[k] = f"Total mult-adds: {macs / 1e9:.3f} G (every convolution and linear layer, for one image)"
        elif line.startswith("Params size"):
            lines[k] = f"Params size (MB): {params * 4 / 1e6:.2f}"
    return "\n".join(lines)


@torch.no_grad()
def totals(model: torch.nn.Module, size: int) -> tuple[int, int]:
    """``(parameters, mult-adds)`` of one ``1 x 3 x size x size`` forward pass: mult-adds of every ``Conv2d``
    (and subclass: weights x output pixels) and ``Linear`` layer, counted with forward hooks."""
    macs = [0]

    def hook(module, _inputs, output):
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(module, torch.nn.Conv2d):
            macs[0] += module.weight.numel() * out.shape[-2] * out.shape[-1]
        else:
            macs[0] += module.weight.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    try:
        model.eval()(torch.zeros(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    return sum(p.numel() for p in model.parameters()), macs[0]


def stages(model: CovidNet, size: int) -> list[tuple[str, tuple[int, ...], int]]:
    """``(name, output shape, parameters)`` for each top-level stage of the backbone, then the head."""
    prefix, body = "backbone", model.backbone
    while len(list(body.children())) == 1:  # DenseNet's adapter wraps one Sequential: show its blocks
        name, body = next(iter(body.named_children()))
        prefix = f"{prefix}.{name}"
    parts = []
    for n, m in body.named_children():  # a ModuleList never runs itself: its blocks are the stages
        parts += (
            [(f"{prefix}.{n}.{i}", b) for i, b in enumerate(m)] if isinstance(m, torch.nn.ModuleList) else [(f"{prefix}.{n}", m)]
        )
    parts = parts or [(prefix, body)]
    parts.append(("head", model.head))
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, o, n=n: shapes.__setitem__(n, tuple(o.shape))) for n, m in parts]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    return [(n, shapes[n], sum(p.numel() for p in m.parameters())) for n, m in parts if n in shapes]


def stage_diagram(model: CovidNet, size: int, path, title: str = "") -> Path:
    """Boxes for the input, each backbone stage and the head, with output shapes and parameter counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("input", (1, 3, size, size), 0)] + [r for r in stages(model, size) if r[2] or r[0] == "head"]
    fig, ax = plt.subplots(figsize=(4.2, 0.55 * len(rows) + 0.6))
    for i, (name, shape, params) in enumerate(rows):
        y = len(rows) - 1 - i
        color = "#e8eefc" if name.startswith("backbone") else "#fde8d8" if name == "head" else "#eeeeee"
        ax.add_patch(plt.Rectangle((0, y + 0.1), 1, 0.8, color=color, ec="#555"))
        label = f"{name}  ->  {' x '.join(str(d) for d in shape[1:])}" + (f"   ({params / 1e6:.2f} M)" if params else "")
        ax.text(0.5, y + 0.5, label, ha="center", va="center", fontsize=7)
        if i:
            ax.annotate("", (0.5, y + 0.9), (0.5, y + 1.1), arrowprops={"arrowstyle": "->", "lw": 0.8})
    ax.set_xlim(0, 1)
    ax.set_ylim(0, len(rows))
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
