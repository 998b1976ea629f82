"""Parse arguments -> build a config -> call the library -> exit code. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from ndonnx import __version__
from ndonnx.errors import FULL_INSTALL_HINT, NdonnxError, Terminated, missing_full_dependency


def _emit(report: dict, as_json: bool, table) -> None:
    """JSON on stdout for tools, or the human table."""
    if as_json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        table(report)


def _inspect(args: argparse.Namespace) -> int:
    from ndonnx.config import PartitionConfig
    from ndonnx.inspection import inspect_model
    from ndonnx_cli.progress import bar
    from ndonnx_cli.tables import inspect_table

    cfg = PartitionConfig(primary_input=args.primary_input, block_size=args.block_size)
    progress = None if args.json else bar
    _emit(inspect_model(args.model, cfg, check=not args.no_check, progress=progress, data=args.data), args.json,
          inspect_table)
    return 0


def _distill(args: argparse.Namespace) -> int:
    from ndonnx.distill.runner import distill
    from ndonnx_cli.progress import bar
    from ndonnx_cli.tables import candidates_table

    rows = distill(args.model, args.run_dir, _distill_config(args), data_path=args.data, progress=bar)
    candidates_table(rows)
    return 0


def _distill_config(args: argparse.Namespace):
    from ndonnx.config import DistillConfig, PartitionConfig

    return DistillConfig(
        partition=PartitionConfig(primary_input=args.primary_input, block_size=args.block_size),
        candidates=args.candidates, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
        device=args.device, jobs=args.jobs, backend=args.backend, gpus_per_job=args.gpus_per_job,
        lookahead=args.lookahead, data_free=args.data_free,
        data_free_method=args.data_free_method, synthetic_count=args.synthetic_count, labels=args.labels,
        force=args.force, channel_multiple=args.channel_multiple, min_steps=args.min_steps, patience=args.patience,
        min_gain=args.min_gain, fit_tolerance=args.fit_tolerance)


def _compress_config(args: argparse.Namespace, distill_cfg=None):
    from ndonnx.config import CompressConfig, DistillConfig

    if args.target_latency is not None and args.target_params is not None:
        raise NdonnxError("--target-latency and --target-params are two budgets: give one")
    return CompressConfig(distill=distill_cfg or DistillConfig(), target=args.target_params or "50%",
                          strategy=args.strategy, max_drop=args.max_drop, finetune_steps=args.finetune_steps,
                          finetune_batch=args.finetune_batch, finetune_lr=args.finetune_lr, refit_steps=args.refit_steps,
                          refit_samples=args.refit_samples,
                          eval_data=args.eval_data, tolerances=args.tolerances, force=args.force,
                          target_macs=args.target_macs, quantize=args.quantize, target_latency=args.target_latency,
                          latency_batch=args.latency_batch, threads=args.threads)


def _finish(report: dict, args: argparse.Namespace) -> None:
    from ndonnx.compress import report_json
    from ndonnx_cli.tables import compress_table

    if args.report:
        report_json(report, args.report)
    compress_table(report)


def _reported(run, args: argparse.Namespace) -> int:
    """Run a compress/search; show and save the report, also when the result exceeds --max-drop."""
    from ndonnx.compress import DropTooLarge

    try:
        report = run()
    except DropTooLarge as e:
        _finish(e.report, args)
        raise
    _finish(report, args)
    return 0


def _compress(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ndonnx.compress import compress
    from ndonnx_cli.progress import bar

    if args.model is None:
        raise NdonnxError("give a teacher model, e.g. ndonnx compress models/resnet20_fmnist.onnx "
                          "--data models/fmnist_subset.npz --labels labels")
    if args.data is None and not args.data_free:
        raise NdonnxError("give calibration data with --data FILE.npz, or use --data-free")
    run_dir = args.run_dir or str(Path(args.model).with_suffix("")) + ".ndonnx-run"
    cfg = _compress_config(args, _distill_config(args))
    return _reported(lambda: compress(args.model, run_dir, cfg, data_path=args.data, output=args.output,
                                      progress=bar), args)


def _search(args: argparse.Namespace) -> int:
    from ndonnx.compress import build
    from ndonnx_cli.progress import bar

    return _reported(lambda: build(args.run_dir, _compress_config(args), args.output, progress=bar), args)


def _validate(args: argparse.Namespace) -> int:
    from ndonnx.data import load_data
    from ndonnx.graph import is_quantized, load_teacher
    from ndonnx.validate import validate

    teacher = load_teacher(args.reference)
    student = load_teacher(args.student, quantized=True)  # a quantized student is compared as well
    data = load_data(args.data, teacher, args.labels).read_all()
    labels = data.pop(args.labels) if args.labels else None
    s_names, t_names = student.input_names, teacher.input_names
    if s_names != t_names or [o.name for o in student.model.graph.output] != [o.name for o in teacher.model.graph.output]:
        raise NdonnxError(f"{args.student} and {args.reference} have different inputs or outputs")
    from ndonnx_cli.tables import validation_table

    report = validate(student.model, teacher.model, data, labels, args.student, args.reference,
                      torch_check=not is_quantized(student.model))
    from ndonnx.latency import validate_latency

    report.update(validate_latency(student, teacher, data, args.latency_batch, args.threads))
    _emit(report, args.json, validation_table)
    return 0


def _check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ndonnx.files import atomic_write_text
    from ndonnx.gates import GateConfig, as_json, junit, run_gates

    cfg = GateConfig(max_params=args.max_params, max_size=args.max_size, max_nonzero=args.max_nonzero,
                     max_macs=args.max_macs, dims=tuple(args.dim or ()), reference=args.reference, data=args.data,
                     labels=args.labels,
                     min_agreement=args.min_agreement, max_rel_err=args.max_rel_err,
                     max_accuracy_drop=args.max_accuracy_drop)
    gates = run_gates(args.model, cfg)
    if args.junit:
        atomic_write_text(Path(args.junit), junit(args.model, gates))
    _emit(as_json(args.model, gates), args.json, lambda r: print("\n".join(g.line() for g in gates)))
    failed = [g for g in gates if not g.passed]
    if failed:
        print(f"ndonnx: check failed: {', '.join(g.name for g in failed)}", file=sys.stderr)
        return 1
    return 0


def _sensitivity(args: argparse.Namespace) -> int:
    from ndonnx.sensitivity import plot, sensitivity
    from ndonnx_cli.tables import sensitivity_table

    try:
        eps = tuple(float(e) for e in args.eps.split(","))
    except ValueError:
        raise NdonnxError(f"--eps {args.eps!r}: expected comma-separated numbers, e.g. 0.01,0.1,1") from None
    if not eps or any(e < 0 for e in eps):
        raise NdonnxError("--eps values must be >= 0")
    from ndonnx_cli.progress import bar

    report = sensitivity(args.model, args.data, args.labels, tuple(sorted(eps)), args.max_drop, args.samples, args.seed,
                         progress=None if args.json else bar)
    if args.plot:
        plot(report, args.plot)
    _emit(report, args.json, sensitivity_table)
    return 0


def _add_distill_options(s) -> None:
    s.add_argument("--data", help="calibration data: .npz (arrays named after the inputs) or a folder of .npz shards")
    s.add_argument("--data-free", action="store_true", help="no data: train on inputs made from the teacher alone "
                   "(see --data-free-method); with --data, on Gaussian noise matched to its statistics")
    s.add_argument("--data-free-method", default="auto", choices=("auto", "bn-stats", "inversion", "noise"),
                   help="bn-stats: inputs optimised until the teacher's BatchNormalization layers see their running "
                   "statistics; inversion: until a classifier assigns them to each class in turn; noise: Gaussian "
                   "noise at every boundary; auto (default): bn-stats where the teacher has BatchNormalization, "
                   "else inversion for a classifier, else noise")
    s.add_argument("--synthetic-count", type=int, help="inputs --data-free makes (default 512 for bn-stats and "
                   "inversion, 256 held-out ones for noise)")
    s.add_argument("--candidates", help='student candidates per neighbourhood, e.g. '
                   '"width:0.1-0.9/0.1,lowrank:0.5,heads:0.5,vocab:1,sparse:0.8,identity,teacher" (default: width '
                   '0.25/0.5/0.75, lowrank 0.25/0.5, heads 0.5, vocab 1, identity, teacher)')
    s.add_argument("--channel-multiple", type=int, default=1, help="round width and lowrank students' channels "
                   "and ranks to a multiple of N (8 or 16 suit onnxruntime's blocked CPU kernels; default 1: none)")
    from ndonnx.config import DistillConfig as D

    s.add_argument("--steps", type=int, default=D.steps, help=f"most training steps per candidate; each stops "
                   f"earlier once its held-out error stops falling (default {D.steps})")
    s.add_argument("--min-steps", type=int, default=D.min_steps, help=f"fewest steps before a candidate may stop "
                   f"(default {D.min_steps})")
    s.add_argument("--patience", type=int, default=D.patience, help=f"a candidate stops when its held-out error fell "
                   f"by less than --min-gain over the last this many steps (default {D.patience})")
    s.add_argument("--min-gain", type=float, default=D.min_gain, help=f"relative fall of the held-out error that "
                   f"keeps a candidate training (default {D.min_gain:g}; 0: train every candidate --steps steps)")
    s.add_argument("--fit-tolerance", type=float, default=D.fit_tolerance, help=f"a candidate fitted to the teacher "
                   f"within this held-out relative MSE is not trained (default {D.fit_tolerance:g})")
    s.add_argument("--batch", type=int, default=D.batch, help=f"samples per training step (default {D.batch})")
    s.add_argument("--lr", type=float, default=D.lr, help=f"Adam learning rate (default {D.lr:g})")
    s.add_argument("--lookahead", type=int, default=0, help="also match the next J teacher neighbourhoods (paper Eq. 4-5)")
    s.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where students train (default auto: CUDA when torch sees it)")
    s.add_argument("--jobs", type=int, default=0, help="parallel workers (default: one per core on CPU, one per GPU "
                   "on CUDA)")
    s.add_argument("--backend", default="local", choices=("local", "ray"), help="where jobs run: local processes, "
                   "or Ray tasks (pip install -e '.[ray]'; joins the cluster at RAY_ADDRESS if set, else starts a "
                   "local Ray) (default local)")
    s.add_argument("--gpus-per-job", type=float, default=1.0, help="--backend ray on CUDA: the GPU share of each "
                   "task, e.g. 0.5 for two per GPU (default 1)")
    s.add_argument("--seed", type=int, default=0, help="seed of every random choice: same seed, same student (default 0)")
    s.add_argument("--labels", help="name of a labels array in the data file (scores become accuracy)")
    s.add_argument("--primary-input", help="graph input the neighbourhoods are cut along (default: the one on "
                   "whose paths the weights lie)")
    s.add_argument("--block-size", type=int, default=1, help="weighted segments per neighbourhood (default 1)")


def _add_search_options(s) -> None:
    from ndonnx.config import QUANTIZE, STRATEGIES

    s.add_argument("--target-params", help="budget: 18M, 250K, 1.5e6 or 60%% of the teacher (default 50%%)")
    s.add_argument("--target-macs", help="a compute budget instead: multiply-accumulates per sample, 20M or 60%% of "
                   "the teacher's (replaces --target-params; sizes of symbolic dims as in the data)")
    _add_latency_options(s, budget=True)
    s.add_argument("-o", "--output", help="student .onnx (default: <teacher>.ndonnx-<budget>.onnx beside the teacher, "
                   "e.g. resnet.ndonnx-50pct.onnx, resnet.ndonnx-50pct-int8.onnx with --quantize); an existing file is "
                   "refused without --force")
    s.add_argument("--report", help="write the report as JSON here (replaced if it exists)")
    s.add_argument("--strategy", default="greedy", choices=STRATEGIES,
                   help="greedy: least score lost per parameter saved until the budget is met (default); "
                   "threshold: the paper's smallest candidate per neighbourhood within --max-drop or --tolerances, "
                   "grown back within the budget when the whole drops more")
    s.add_argument("--max-drop", type=float, help="largest score drop accepted (exit 1 beyond it; with --strategy "
                   "threshold also each neighbourhood's allowance)")
    from ndonnx.config import CompressConfig as C

    s.add_argument("--refit-steps", type=int, default=C.refit_steps, help=f"after search, train each chosen student "
                   f"this many steps more on what the students before it give it, in order (default {C.refit_steps}; "
                   f"0: none)")
    s.add_argument("--refit-samples", type=int, default=C.refit_samples, help=f"training samples the refit runs the "
                   f"composed student on (default {C.refit_samples})")
    s.add_argument("--finetune-steps", type=int, default=C.finetune_steps, help="end-to-end KD steps after splicing "
                   "(paper Eq. 3)")
    s.add_argument("--finetune-batch", type=int, default=C.finetune_batch, help=f"samples per fine-tuning step "
                   f"(default {C.finetune_batch})")
    s.add_argument("--finetune-lr", type=float, default=C.finetune_lr, help=f"Adam learning rate of fine-tuning "
                   f"(default {C.finetune_lr:g})")
    s.add_argument("--tolerances", help="with --strategy threshold: per-neighbourhood noise thresholds from "
                   "`ndonnx sensitivity --json` (a candidate fits when its relative MSE <= threshold^2)")
    s.add_argument("--quantize", choices=QUANTIZE, help="quantize the student to int8 after splicing and "
                   "fine-tuning, with onnxruntime's quantizer: int8 picks static QDQ (uint8 activations calibrated "
                   "on 256 samples of the calibration data, int8 weights per channel) when Conv/ConvTranspose hold "
                   ">= 50%% of the Conv, ConvTranspose, MatMul and Gemm parameters (conv nets), else dynamic (int8 "
                   "weights per channel, activations quantized at run time: transformers); int8-static and "
                   "int8-dynamic force one. The output is the quantized model (default name ends in -int8); "
                   "--max-drop applies to it")
    s.add_argument("--eval-data", help="validate on this .npz (e.g. a test set, with labels under the name used "
                   "for distilling) instead of the held-out 10%% of the calibration data")


def _add_latency_options(s, budget: bool = False) -> None:
    if budget:
        s.add_argument("--target-latency", help="a latency budget instead: 60%% of the teacher's onnxruntime latency, "
                       "or a time (3ms, 0.5s, 800us), at --latency-batch and --threads on this machine; every "
                       "candidate is timed against the teacher's neighbourhood (cached in the run directory) and "
                       "the whole student is timed against the teacher after splicing")
    s.add_argument("--latency-batch", type=int, default=32, help="batch size latency is timed at (default 32)")
    s.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads latency is timed with "
                   "(default 1)")


class Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (and `--help` for the rest), exit 2."""

    def error(self, message: str):
        self.exit(2, f"ndonnx: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="ndonnx", description="Make ONNX models smaller by Neighbourhood Distillation.")
    p.add_argument("--version", action="version", version=f"ndonnx {__version__}")
    p.add_argument("--verbose", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    s = sub.add_parser("inspect", help="show the weights and neighbourhoods ndonnx finds in a model")
    s.add_argument("model", help="teacher .onnx file")
    s.add_argument("--json", action="store_true", help="print JSON on stdout instead of a table")
    s.add_argument("--primary-input", help="graph input the neighbourhoods are cut along (default: the one "
                   "on whose paths the weights lie)")
    s.add_argument("--block-size", type=int, default=1, help="weighted segments per neighbourhood (default 1)")
    s.add_argument("--no-check", action="store_true", help="skip the torch round trip of each neighbourhood")
    s.add_argument("--data", help="run the sample on the first samples of this .npz instead of random inputs")
    s.set_defaults(run=_inspect)

    s = sub.add_parser("distill", help="train smaller student candidates for every neighbourhood")
    s.add_argument("model", help="teacher .onnx file")
    s.add_argument("--run-dir", required=True, help="where candidates, cache and journal live (resumable)")
    _add_distill_options(s)
    s.add_argument("--force", action="store_true", help="start anew in a run directory made for another model")
    s.set_defaults(run=_distill)

    s = sub.add_parser("compress", help="distil, search and splice: a smaller model for a budget")
    s.add_argument("model", nargs="?", help="teacher .onnx file")
    s.add_argument("--run-dir", help="run directory (default: <teacher>.ndonnx-run beside the teacher)")
    _add_distill_options(s)
    _add_search_options(s)
    s.add_argument("--force", action="store_true", help="replace an existing output file, and start anew in a "
                   "run directory made for another model")
    s.set_defaults(run=_compress)

    s = sub.add_parser("search", help="a model for another budget from a run directory, without training")
    s.add_argument("run_dir", help="a run directory of `ndonnx compress` or `ndonnx distill`")
    _add_search_options(s)
    s.add_argument("--force", action="store_true", help="replace an existing output file")
    s.set_defaults(run=_search)

    s = sub.add_parser("validate", help="compare a student with its teacher in onnxruntime")
    s.add_argument("student", help="the student .onnx")
    s.add_argument("--reference", required=True, help="the teacher .onnx")
    s.add_argument("--data", required=True, help="inputs to compare on: .npz or a folder of .npz shards")
    s.add_argument("--labels", help="name of a labels array in the data (adds accuracy)")
    _add_latency_options(s)
    s.add_argument("--json", action="store_true", help="print JSON on stdout instead of a table")
    s.set_defaults(run=_validate)

    s = sub.add_parser("sensitivity", help="score lost when each neighbourhood's output gets Gaussian noise")
    s.add_argument("model", help="teacher .onnx file")
    s.add_argument("--data", required=True, help="inputs: .npz or a folder of .npz shards")
    s.add_argument("--labels", help="name of a labels array in the data (scores become accuracy)")
    s.add_argument("--eps", default="0.01,0.03,0.1,0.3,1", help="noise amplitudes, times each output's std")
    s.add_argument("--max-drop", type=float, default=0.01, help="tolerance that defines each threshold (default 0.01)")
    s.add_argument("--samples", type=int, default=512, help="samples of the data used (default 512)")
    s.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    s.add_argument("--plot", help="write the drop-vs-eps curves as a PNG here")
    s.add_argument("--json", action="store_true", help="print JSON on stdout instead of a table")
    s.set_defaults(run=_sensitivity)

    s = sub.add_parser("check", help="CI gates: exit 0 when every gate passes, 1 when one fails")
    s.add_argument("model", help="the .onnx file to gate")
    s.add_argument("--max-params", help="parameters (dense weights; a quantized model's int8 weights count once "
                   "each, its scales and zero points not): 18M, 250K, 1.5e6")
    s.add_argument("--max-size", help="file size with external data: 10MB, 512KiB, ...")
    s.add_argument("--max-nonzero", help="non-zero weights (sparse students; an int8 weight equal to its zero "
                   "point is a zero)")
    s.add_argument("--max-macs", help="multiply-accumulates for one sample (batch 1), counted from the graph's "
                   "shapes: 1.2G, 40M, 5e8; deterministic, unlike latency")
    s.add_argument("--dim", action="append", metavar="NAME=N", help="size of a symbolic input dim other than the "
                   "batch, for --max-macs (e.g. --dim seq=128); repeatable")
    s.add_argument("--reference", help="teacher .onnx for the quality gates")
    s.add_argument("--data", help="data for the quality gates")
    s.add_argument("--labels", help="name of a labels array in the data, for --max-accuracy-drop")
    s.add_argument("--min-agreement", type=float, help="top-1 agreement with the reference, a fraction 0..1")
    s.add_argument("--max-rel-err", type=float, help="||student - reference|| / ||reference|| on the outputs")
    s.add_argument("--max-accuracy-drop", type=float, help="reference accuracy minus the model's, a fraction "
                   "0..1 (needs --labels)")
    s.add_argument("--json", action="store_true", help="print JSON on stdout instead of lines")
    s.add_argument("--junit", help="also write a JUnit XML report here")
    s.set_defaults(run=_check)
    return p


class _Format(logging.Formatter):
    """`ndonnx: note` for our own progress notes, `ndonnx: warning: ...` above that."""

    def format(self, record: logging.LogRecord) -> str:
        kind = "" if record.levelno < logging.WARNING else "warning: "
        return f"ndonnx: {kind}{record.getMessage()}"


def _logging(verbose: bool) -> None:
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
        return
    root = logging.getLogger()
    if not root.handlers:  # (a host that set up logging, e.g. a test runner, keeps its own)
        handler = logging.StreamHandler()
        handler.setFormatter(_Format())
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    logging.getLogger("ndonnx").setLevel(logging.INFO)  # our notes; other libraries stay at warnings


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # usage errors and --help
        return int(e.code or 0)
    _logging(args.verbose)
    previous = _on_sigterm()
    try:
        return args.run(args)
    except NdonnxError as e:
        if args.verbose:
            raise
        print(f"ndonnx: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        print("ndonnx: terminated" if isinstance(e, Terminated) else "ndonnx: interrupted", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except Exception as e:  # a bug of ours, not a user mistake: say so on one line
        if args.verbose:
            raise
        missing = missing_full_dependency(e)
        if missing:  # a light install (no torch) asked to distil: a usage error, not a bug
            print(f"ndonnx: error: `ndonnx {args.command}` needs the full install with torch ({missing} is not "
                  f"installed; a light install runs check, inspect --no-check and validate): {FULL_INSTALL_HINT}",
                  file=sys.stderr)
            return 2
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        print(f"ndonnx: internal error: {type(e).__name__}: {first} (rerun with --verbose for the traceback)",
              file=sys.stderr)
        return 3
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _on_sigterm():
    """SIGTERM (a CI timeout, `kill`) stops like ^C: workers ended, journalled jobs kept, exit 143."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def raise_terminated(signum, frame):
        raise Terminated()

    return signal.signal(signal.SIGTERM, raise_terminated)


def entry() -> None:
    """The `ndonnx` command. After an interrupt the workers are already ended and every finished job
    journalled: leave at once rather than run exit handlers that could wait on a dead pool."""
    code = main()
    if code in (130, 143):
        from multiprocessing import util

        util._exit_function()  # multiprocessing's own exit step: releases the pool's semaphores
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
