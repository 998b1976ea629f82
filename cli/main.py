"""Parse arguments -> build a config -> call the library -> exit code. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from ndonnx import __version__
from ndonnx.errors import NdonnxError


def _inspect(args: argparse.Namespace) -> int:
    from ndonnx.config import PartitionConfig
    from ndonnx.inspection import inspect_model
    from ndonnx_cli.progress import bar
    from ndonnx_cli.tables import inspect_table

    cfg = PartitionConfig(primary_input=args.primary_input, block_size=args.block_size)
    progress = None if args.json else bar
    report = inspect_model(args.model, cfg, check=not args.no_check, progress=progress)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        inspect_table(report)
    return 0


def _distill(args: argparse.Namespace) -> int:
    from ndonnx.config import DistillConfig, PartitionConfig
    from ndonnx.distill.runner import distill
    from ndonnx_cli.progress import bar
    from ndonnx_cli.tables import candidates_table

    cfg = DistillConfig(
        partition=PartitionConfig(primary_input=args.primary_input, block_size=args.block_size),
        candidates=args.candidates, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
        device=args.device, jobs=args.jobs, lookahead=args.lookahead, data_free=args.data_free,
        labels=args.labels, force=args.force)
    rows = distill(args.model, args.run_dir, cfg, data_path=args.data, progress=bar)
    candidates_table(rows)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ndonnx", description="Make ONNX models smaller by Neighbourhood Distillation.")
    p.add_argument("--version", action="version", version=f"ndonnx {__version__}")
    p.add_argument("--verbose", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="show the weights and neighbourhoods ndonnx finds in a model")
    s.add_argument("model", help="teacher .onnx file")
    s.add_argument("--json", action="store_true", help="print JSON on stdout instead of a table")
    s.add_argument("--primary-input", help="graph input the neighbourhoods are cut along (default: the one "
                   "on whose paths the weights lie)")
    s.add_argument("--block-size", type=int, default=1, help="weighted segments per neighbourhood (default 1)")
    s.add_argument("--no-check", action="store_true", help="skip the torch round trip of each neighbourhood")
    s.set_defaults(run=_inspect)

    s = sub.add_parser("distill", help="train smaller student candidates for every neighbourhood")
    s.add_argument("model", help="teacher .onnx file")
    s.add_argument("--data", help="calibration data: .npz (arrays named after the inputs) or a folder of .npz shards")
    s.add_argument("--data-free", action="store_true", help="train on Gaussian noise (matched to --data statistics if given)")
    s.add_argument("--run-dir", required=True, help="where candidates, cache and journal live (resumable)")
    s.add_argument("--candidates", help='e.g. "width:0.1-0.9/0.1,lowrank:0.5,sparse:0.8,identity,teacher"')
    s.add_argument("--steps", type=int, default=300, help="training steps per candidate (default 300)")
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--lookahead", type=int, default=0, help="also match the next J teacher neighbourhoods (paper Eq. 4-5)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda")
    s.add_argument("--jobs", type=int, default=0, help="worker processes (default: one per core on CPU)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--labels", help="name of a labels array in the data file (kept for scoring)")
    s.add_argument("--primary-input")
    s.add_argument("--block-size", type=int, default=1)
    s.add_argument("--force", action="store_true", help="start anew in a run directory made for another model")
    s.set_defaults(run=_distill)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="ndonnx: warning: %(message)s" if not args.verbose else "%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except NdonnxError as e:
        if args.verbose:
            raise
        print(f"ndonnx: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("ndonnx: interrupted", file=sys.stderr)
        return 130
