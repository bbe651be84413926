"""Wall time and peak memory of `codeq compress` beside a plain FP32 fine-tune of the same steps.

Both run as child processes on the same generated ImageNet-style folder
(64x64 images, 10 classes), with the same data pipeline, model (torchvision
ResNet-18, random init), batch size and number of optimizer steps:

* codeq:  codeq compress resnet18 --no-pretrained --img-size 64 --max-steps 50 --batch-size 64
          (plus --num-classes 10 --skip-baseline: the folder has 10 classes)
* plain:  the same DataLoader feeding an FP32 AdamW loop, no quantizers, no checkpoint

    python bench/compress_cpu.py [--steps 50] [--batch 64] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path


def make_folder(root: Path, classes: int = 10, train: int = 120, val: int = 10, size: int = 72) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 255, size=3)
            for i in range(n):
                img = np.clip(base + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype("uint8")
                Image.fromarray(img).save(folder / f"{i:04d}.png")
    return root


PLAIN = textwrap.dedent(
    """
    import sys, time, torch, torchvision
    from torch.utils.data import DataLoader
    from codeq_cli.data.folders import build_datasets
    from codeq_cli.data.loader import collate
    from codeq_cli.models.factory import ModelSpec, create, data_config
    data, steps, batch, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(0)
    spec = ModelSpec("torchvision", "resnet18", num_classes=10)
    model = create(spec)
    cfg = data_config(model, spec).with_size(64)
    train, val, classes = build_datasets(data, cfg)
    loader = DataLoader(train, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate, drop_last=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    model.train()
    done = 0
    while done < steps:
        for images, target in loader:
            loss = torch.nn.functional.cross_entropy(model(images), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    """
)


def measure(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    env = {**os.environ, "NO_COLOR": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_folder(Path(tmp) / "data")
        codeq = [sys.executable, "-m", "codeq_cli", "compress", "resnet18", "--no-pretrained", "--img-size", "64",
                 "--max-steps", str(args.steps), "--batch-size", str(args.batch), "--data", str(data),
                 "--num-classes", "10", "--skip-baseline", "--workers", str(args.workers),
                 "--out", str(Path(tmp) / "out.pt"), "--overwrite"]
        plain = [sys.executable, "-c", PLAIN, str(data), str(args.steps), str(args.batch), str(args.workers)]
        results = {}
        for name, cmd in (("plain", plain), ("codeq", codeq), ("plain", plain), ("codeq", codeq)):
            results.setdefault(name, []).append(measure(cmd, env))
    best = {k: (min(w for w, _ in v), max(m for _, m in v)) for k, v in results.items()}
    print(f"ResNet-18, 64x64, batch {args.batch}, {args.steps} steps, CPU, best of 2 alternating runs")
    for name, (wall, mem) in best.items():
        print(f"  {name:6s} wall {wall:7.1f} s   peak RSS {mem:8.0f} MB")
    print(f"wall_ratio={best['codeq'][0] / best['plain'][0]:.2f}")
    print(f"memory_ratio={best['codeq'][1] / best['plain'][1]:.2f}")


if __name__ == "__main__":
    main()
