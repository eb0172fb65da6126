"""The quick demo: one small classifier trained with AdamW and with SAM(AdamW).

It prints test accuracy and the sharpness of the minimum each reaches, and writes a
plot. It uses scikit-learn's bundled digits, so it needs no download.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from flatworld import optim, sharpness


def _digits(seed: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_test = len(x) // 4
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 10))


def train_classifier(spec: optim.OptimSpec, steps: int, seed: int, label: str) -> dict:
    xtr, ytr, xte, yte = _digits(seed)
    model = _model(seed)
    opt = optim.build(spec, model.parameters(), total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    curve = []
    for step in tqdm(range(steps), desc=label, leave=False):
        idx = torch.randint(len(xtr), (64,), generator=gen)

        def closure(idx=idx):
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            loss.backward()
            return loss

        opt.zero_grad(set_to_none=True)
        loss = opt.step(closure)
        if step % 25 == 0:
            curve.append((step, loss.item()))
    params = list(model.parameters())

    def train_loss():
        return nn.functional.cross_entropy(model(xtr), ytr)

    with torch.no_grad():
        acc = (model(xte).argmax(-1) == yte).float().mean().item()
    return {
        "label": label,
        "test_accuracy": acc,
        "train_loss": float(train_loss()),
        "sharpness_first_order": sharpness.first_order(train_loss, params, rho=0.05),
        "lambda_max": sharpness.lambda_max(train_loss, params, iters=50).value,
        "curve": curve,
    }


def run(out_dir: Path = Path("runs-demo"), steps: int = 1500, seed: int = 0) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    adamw = optim.OptimSpec("adamw", lr=1e-3, weight_decay=1e-4)
    sam = optim.OptimSpec("adamw", lr=1e-3, weight_decay=1e-4, sam=optim.SamSpec(rho=0.1))
    results = [train_classifier(adamw, steps, seed, "AdamW"),
               train_classifier(sam, steps, seed, "SAM(AdamW)")]
    lines = ["| optimizer | test accuracy | train loss | first-order sharpness | lambda_max |",
             "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['label']} | {r['test_accuracy']:.4f} | {r['train_loss']:.4f} | "
                     f"{r['sharpness_first_order']:.4f} | {r['lambda_max']:.2f} |")
    table = "\n".join(lines)
    print(table)
    _plot(results, out_dir / "demo.png")
    (out_dir / "demo.md").write_text("# flatworld demo: AdamW vs SAM on digits\n\n" + table +
                                     "\n\n![curves](demo.png)\n")
    (out_dir / "demo.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out_dir / 'demo.md'} and {out_dir / 'demo.png'}")
    return out_dir / "demo.md"


def _plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for r in results:
        steps, losses = np.array(r["curve"]).T
        axes[0].plot(steps, losses, label=r["label"])
    axes[0].set(xlabel="step", ylabel="minibatch loss", yscale="log", title="training loss")
    axes[0].legend()
    names = [r["label"] for r in results]
    axes[1].bar(names, [r["lambda_max"] for r in results], color=["tab:blue", "tab:orange"])
    axes[1].set(ylabel="lambda_max of the train loss", title="sharpness of the minimum")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
