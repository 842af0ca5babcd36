"""The GPU rows of issue 13 in one command: the compiled trainer beside the plain compiled step, same batch.

    python -m tools.bench_gpu --out bench_gpu.json            # run again to continue after the time budget

Each item runs in its own process (clean peak memory), in this order, and its result is merged into ``--out``
as soon as it finishes; items already in the file are skipped, so a second call continues where the first
stopped (``--budget-s``: no new item starts after that many seconds):
 1-6. for T2I@512 (batch 64, checkpointing), XL/16@256 (64) and T2I@1024 (16, checkpointing): the trainer's
      compiled step (``tools.bench_train --compile on``: MFU, images/s, peak memory, step-time breakdown) and
      the plain compiled step (``tools.bench_mfu --compile``);
 7.   host synchronisations per trainer step, XL/16@256 (``tools.bench_train --count-syncs``);
 8.   the trainer's eager step, XL/16@256 (the compiled/eager gain inside the trainer);
 9-10. compile strategies, XL/16@256, same engine: per block (``pixeldit.train.compile``) and DeepSpeed's
      ``engine.compile()`` (``tools.bench_compile``).
Prints the markdown tables for tools/BENCHMARKS.md at the end (from everything in ``--out``).
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

CASES = {"T2I@512": "T2I@512:bs=64:ckpt", "XL/16@256": "XL/16@256:bs=64", "T2I@1024": "T2I@1024:bs=16:ckpt"}


def items() -> list[tuple[str, list[str]]]:
    """(name, command) in the order they run."""
    out = []
    for short, case in CASES.items():
        out.append((f"trainer {short}", ["-m", "tools.bench_train", "--compile", "on", "--case", case,
                                         "--warmup", "2", "--steps", "5"]))
        out.append((f"mfu {short}", ["-m", "tools.bench_mfu", "--compile", "--case", case, "--warmup", "2",
                                     "--steps", "5"]))
    xl = CASES["XL/16@256"]
    out.append(("syncs XL/16@256", ["-m", "tools.bench_train", "--compile", "on", "--case", xl, "--warmup", "2",
                                    "--steps", "3", "--count-syncs"]))
    out.append(("trainer eager XL/16@256", ["-m", "tools.bench_train", "--compile", "off", "--case", xl,
                                            "--warmup", "2", "--steps", "5"]))
    for strategy in ("blocks", "deepspeed"):
        out.append((f"strategy {strategy} XL/16@256", ["-m", "tools.bench_compile", "--strategy", strategy, "--case",
                                                       xl, "--warmup", "2", "--steps", "4"]))
    return out


def run_item(args: list[str], timeout_s: float) -> dict:
    """Run one benchmark with a JSON output file; returns its parsed JSON, or the error and the output tail."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, *args, "--json", str(out)]
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as e:
            tail = (e.stdout or b"")[-2000:]
            return {"error": f"timed out after {timeout_s:.0f} s", "tail": str(tail)}
        seconds = time.time() - t0
        if proc.returncode != 0:
            return {"error": f"exit {proc.returncode}", "tail": (proc.stdout + proc.stderr)[-3000:]}
        if not out.exists():
            return {"error": "no JSON written", "tail": (proc.stdout + proc.stderr)[-3000:]}
        return {"seconds": seconds, **json.loads(out.read_text())}


def tables(results: dict) -> str:
    lines = ["| case | step | batch | step (s) | img/s | MFU | peak mem (GiB) | data / fwd / bwd / opt (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for short, case in CASES.items():
        t = results.get(f"trainer {short}", {})
        for r in t.get("rows", []):
            if "error" in r:
                lines.append(f"| {short} | trainer, compiled | | {r['error']} | | | | |")
                continue
            b = r["breakdown"]
            ms = " / ".join(f"{1e3 * b[f'time_{k}_s']:.0f}" for k in ("data", "forward", "backward", "optimizer"))
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
            lines.append(f"| {short} | trainer (ZeRO-2), compiled | {case.split(':')[1]} | {r['step_s']:.3f} | "
                         f"{r['img_per_s_per_rank']:.1f} | {mfu} | {r['peak_mem_gib']:.1f} | {ms} |")
        m = results.get(f"mfu {short}", {})
        for r in m.get("results", []):
            lines.append(f"| {short} | plain step (bench_mfu), compiled | bs={r['batch']} | {r['step_s']:.3f} | "
                         f"{r['img_per_s']:.1f} | {100 * r['mfu']:.1f}% | {r['peak_mem_gib']:.1f} | |")
    for name in ("syncs XL/16@256", "trainer eager XL/16@256", "strategy blocks XL/16@256",
                 "strategy deepspeed XL/16@256"):
        if name in results:
            lines.append(f"\n{name}: {json.dumps(results[name])[:2000]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_gpu.json")
    ap.add_argument("--budget-s", type=float, default=540.0, help="start no new item after this many seconds")
    ap.add_argument("--item-timeout-s", type=float, default=420.0)
    ap.add_argument("--only", nargs="*", default=None, help="run only these item names")
    a = ap.parse_args(argv)
    path = Path(a.out)
    results = json.loads(path.read_text()) if path.exists() else {}
    start = time.time()
    for name, args in items():
        if name in results and "error" not in results[name] or (a.only and name not in a.only):
            continue
        left = a.budget_s - (time.time() - start)
        if left <= 30:
            print(f"budget spent: run again to continue with {name!r}", flush=True)
            break
        print(f"== {name}: python {' '.join(args)}", flush=True)
        results[name] = run_item(args, min(a.item_timeout_s, left))
        print(json.dumps(results[name])[:1500], flush=True)
        path.write_text(json.dumps(results, indent=1))
    print(f"\nload average {os.getloadavg()[0]:.1f}\n")
    print(tables(results))


if __name__ == "__main__":
    main()
