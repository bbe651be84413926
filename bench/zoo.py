"""Every torchvision classifier and one timm model per family through `codeq compress` and `codeq eval`.

Each model runs in its own child process, as a user would run it:

    codeq compress MODEL --data D --no-pretrained --img-size 64 --max-steps 1 --batch-size 2 --workers 0 --skip-baseline
    codeq eval OUT --workers 0

with random weights on a generated folder of 2 classes (so the head is built
with 2 outputs, the `--no-pretrained` path), retried at the model's own input
size when it cannot take 64x64 inputs. A model passes when both commands exit
0; otherwise the table gives the one-line reason the CLI printed. Warnings
printed on stderr are counted too.

    python bench/zoo.py                      # everything (long: about an hour on 2 cores)
    python bench/zoo.py --only tv            # torchvision only
    python bench/zoo.py --models tv:mnasnet0_5 timm:resnet10t
    python bench/zoo.py --list               # the models it would run

Results are appended to --results (JSON lines) as they come, so an
interrupted run keeps what it measured; --resume skips models already there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# timm families that are not image classifiers (encoders of multimodal models), or
# whose only members are far too large for a CPU bench, are skipped with the reason.
_NOT_CLASSIFIERS = ("_enc", "_merge", "_align", "_clip", "_siglip", "sam2_")
# Smaller first: a name holding an earlier keyword wins; then the shorter name.
_SMALL = ("test_", "atto", "femto", "pico", "nano", "xxs", "tiny", "mini", "xs", "_s", "small", "lite",
          "050", "b0", "_t", "18", "26", "m0", "s0", "s1", "_m", "base")


def torchvision_models() -> list[str]:
    """Every torchvision classifier, smallest first (by the parameter count its weights' metadata gives)."""
    import torchvision

    def size(name: str) -> int:
        try:
            return int(torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"])
        except Exception:
            return 10**12
    names = sorted(torchvision.models.list_models(module=torchvision.models))
    return [f"tv:{n}" for n in sorted(names, key=size)]


def _rank(name: str) -> tuple[int, int, int, str]:
    big = any(s in name for s in ("384", "448", "512", "_huge", "_giant", "large")) or name.endswith(_NOT_CLASSIFIERS)
    key = next((i for i, k in enumerate(_SMALL) if k in name), len(_SMALL))
    return (int(big), key, len(name), name)


# The torchvision models over ~80M parameters run last (minutes each on a small CPU).
_LARGE_TV = {f"tv:{n}" for n in ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
                                 "vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14", "swin_b", "swin_v2_b",
                                 "convnext_base", "convnext_large", "regnet_y_16gf", "regnet_y_32gf", "regnet_y_128gf",
                                 "regnet_x_32gf", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet101_2",
                                 "efficientnet_v2_l", "efficientnet_b7")}
# Where the name rule picks a large member, the family's small one.
_PICK = {"densenet": "densenet121", "regnet": "regnetx_002", "senet": "legacy_seresnet18", "hrnet": "hrnet_w18_small",
         "naflexvit": "naflexvit_base_patch16_gap", "twins": "twins_svt_small", "res2net": "res2net50_14w_8s"}


def timm_sample() -> list[str]:
    """One model per timm module (family), the smallest-looking by name."""
    import timm

    out = []
    for module in timm.list_modules():
        names = [n for n in timm.list_models(module=module) if not n.endswith(_NOT_CLASSIFIERS)]
        if names:
            pick = _PICK.get(module)
            out.append(f"timm:{pick if pick in names else min(names, key=_rank)}")
    return out


def make_folder(root: Path, size: int = 32) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1)):
        for c in range(2):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, size=(size, size, 3), dtype="uint8")).save(folder / f"{i}.png")
    return root


def _cli(args: list[str]) -> tuple[int, str, str]:
    """``codeq ARGS`` in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from codeq_cli.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return code, out.getvalue(), err.getvalue()


def _reason(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    if lines:
        return lines[-1][len("error: "):]
    tail = [ln for ln in err.splitlines() if ln.strip()]
    return tail[-1][:200] if tail else "no message"


def run_one(model: str, data: Path, work: Path, size: int) -> dict:
    """Child process: compress then eval one model; the row for the table."""
    import warnings

    warnings.simplefilter("default")  # count every warning a user would see once
    out = work / "m.pt"
    base = ["compress", model, "--data", str(data), "--no-pretrained", "--max-steps", "1", "--batch-size", "2",
            "--workers", "0", "--skip-baseline", "--out", str(out), "--overwrite", "--json", "--log-every", "1"]
    t0 = time.monotonic()
    code, stdout, err = _cli([*base, "--img-size", str(size)])
    used = f"{size}"
    if code == 2 and ("--img-size" in err or "input size" in err):
        code, stdout, err = _cli(base)
        used = "own"
    row = {"model": model, "img_size": used, "stage": "compress", "code": code,
           "warnings": sum("Warning" in ln for ln in err.splitlines())}
    if code == 0:
        row["bytes"] = json.loads(stdout)["file_bytes"]
        code, stdout, err2 = _cli(["eval", str(out), "--workers", "0", "--json"])
        row.update(stage="eval", code=code, warnings=row["warnings"] + sum("Warning" in ln for ln in err2.splitlines()))
        err = err2
    row["passed"] = code == 0
    row["reason"] = "" if code == 0 else _reason(err)
    row["seconds"] = round(time.monotonic() - t0, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("tv", "timm"))
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per model")
    ap.add_argument("--results", type=Path, default=Path("zoo-results.jsonl"))
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:  # child mode
        with tempfile.TemporaryDirectory() as work:
            print(json.dumps(run_one(args.one, args.data, Path(work), args.img_size)))
        return

    tv = torchvision_models() if args.only != "timm" and not args.models else []
    small = [m for m in tv if m not in _LARGE_TV]
    models = args.models or (small + (timm_sample() if args.only != "tv" else []) + [m for m in tv if m in _LARGE_TV])
    if args.list:
        print("\n".join(models))
        print(f"{len(models)} models", file=sys.stderr)
        return
    done = {}
    if args.resume and args.results.exists():
        done = {r["model"]: r for r in map(json.loads, args.results.read_text().splitlines()) if r}
    elif args.results.exists():
        args.results.unlink()
    rows = [done[m] for m in models if m in done]
    with tempfile.TemporaryDirectory() as tmp:
        data = make_folder(Path(tmp) / "data")
        env = {**os.environ, "NO_COLOR": "1"}
        for i, model in enumerate(m for m in models if m not in done):
            cmd = [sys.executable, __file__, "--one", model, "--data", str(data), "--img-size", str(args.img_size)]
            t0 = time.monotonic()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
                last = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
                row = json.loads(last[0]) if last and last[0].startswith("{") else {
                    "model": model, "passed": False, "stage": "crash", "code": proc.returncode, "warnings": 0,
                    "reason": f"the process ended with code {proc.returncode}"
                              + (" (killed: out of memory?)" if proc.returncode < 0 else "")
                              + (f": {_reason(proc.stderr)}" if proc.stderr.strip() else "")}
            except subprocess.TimeoutExpired:
                row = {"model": model, "passed": False, "stage": "timeout", "code": None, "warnings": 0,
                       "reason": f"no result within {args.timeout:.0f} s"}
            row.setdefault("seconds", round(time.monotonic() - t0, 1))
            rows.append(row)
            with open(args.results, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            mark = "ok  " if row["passed"] else "FAIL"
            print(f"[{len(rows)}/{len(models)}] {mark} {model} ({row['seconds']:.0f} s)"
                  + (f": {row['reason']}" if not row["passed"] else ""), file=sys.stderr, flush=True)
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    width = max(len(r["model"]) for r in rows)
    print(f"{'model':<{width}}  result  size  warnings  seconds  reason")
    for r in rows:
        print(f"{r['model']:<{width}}  {'passed' if r['passed'] else 'FAILED':<6}  {str(r.get('img_size', '-')):>4}  "
              f"{r.get('warnings', 0):>8}  {r['seconds']:>7.0f}  {r.get('reason', '')}")
    for label, prefix in (("torchvision", "tv:"), ("timm", "timm:")):
        part = [r for r in rows if r["model"].startswith(prefix)]
        if part:
            print(f"{label}: {sum(r['passed'] for r in part)} of {len(part)} passed, "
                  f"{sum(1 for r in part if r.get('warnings'))} printed warnings")


if __name__ == "__main__":
    main()
