"""functrain benchmark suite: ``python tools/bench.py [--quick] [--check] [--only NAME ...]
[--device cuda]``.

Prints one markdown table per section and writes all results to JSON (``--json``). Every timing
is a ratio against the peer measured in the same process, interleaved, as medians of several runs.
With ``--check`` the exit status is non-zero when a correctness check fails (e.g. the fused fast
path disagreeing with the pure path); speed is reported, never asserted. ``--device cuda`` runs
the optimizer and step sections on the GPU (the others stay on the CPU, as their titles say).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmarks import Section

SECTIONS = ("optimizer", "step", "per_sample", "logging", "muon")


def _markdown(section: Section) -> str:
    lines = [f"### {section.title}", ""]
    if section.rows:
        keys = list(dict.fromkeys(k for row in section.rows for k in row))
        lines.append("| " + " | ".join(keys) + " |")
        lines.append("|" + "---|" * len(keys))
        for row in section.rows:
            cells = []
            for k in keys:
                v = row.get(k, "")
                cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
            lines.append("| " + " | ".join(cells) + " |")
    for note in section.notes:
        lines.append(f"\n{note}")
    for name, ok, detail in section.checks:
        lines.append(f"- check {'PASS' if ok else 'FAIL'}: {name} ({detail})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (CI)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a check fails")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, help="sections to run")
    parser.add_argument("--json", default="bench_results.json", help="where to write results")
    parser.add_argument(
        "--device", default="cpu", help="device of the optimizer and step sections (e.g. cuda)"
    )
    args = parser.parse_args(argv)

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available")
    print(
        f"# functrain benchmarks\n\ntorch {torch.__version__}, {platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} threads, device {device}, quick={args.quick}\n"
    )
    results, failed = [], []
    for name in args.only or SECTIONS:
        module = importlib.import_module(f"benchmarks.{name}")
        on_device = "device" in inspect.signature(module.run).parameters
        section = module.run(quick=args.quick, **({"device": device} if on_device else {}))
        print(_markdown(section), flush=True)
        results.append(
            {"name": name, "title": section.title, "rows": section.rows, "checks": section.checks}
        )
        failed += [f"{name}: {c[0]} ({c[2]})" for c in section.checks if not c[1]]
    Path(args.json).write_text(json.dumps({"device": device, "sections": results}, indent=2))
    if failed:
        print("FAILED checks:\n" + "\n".join(failed))
        return 1 if args.check else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
