"""`sdx4 upscale DIR -o OUTDIR`: the command-line side of the batch runner (see batch.py, docs/batch.md).

`cli.cmd_upscale` hands over here when an INPUT is a folder. No torch import here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: Options that only mean something for a folder INPUT, with their defaults.
BATCH_DEFAULTS = {
    "recursive": False,
    "prompts": None,
    "engine": "local",
    "ray_address": None,
    "workers": 1,
    "gpus_per_worker": None,
}


def add_batch_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("folder INPUT (batch run, resumable; see docs/batch.md)")
    g.add_argument("--recursive", action="store_true", help="also upscale images in sub-folders (mirrored in OUTDIR)")
    g.add_argument(
        "--prompts",
        metavar="FILE",
        help="CSV (path,prompt[,negative_prompt]) or JSONL mapping of relative path -> prompt",
    )
    g.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="run here, or on a Ray cluster (pip install sdx4[ray])",
    )
    g.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="Ray cluster: 'auto' (a running cluster) or ray://HOST:10001; None starts Ray on this machine",
    )
    g.add_argument(
        "--workers", type=int, default=1, metavar="N", help="Ray actors, each with its own copy of the model"
    )
    g.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        metavar="G",
        help="GPUs per Ray actor; None = 1 if the cluster has GPUs and --device is not cpu, else 0",
    )


def is_batch(args: argparse.Namespace) -> bool:
    """True when an INPUT is a folder; raises UsageError for batch options without one, or a mix."""
    from .args import UsageError

    dirs = [p for p in args.inputs if Path(p).is_dir()]
    if not dirs:
        given = [k for k, v in BATCH_DEFAULTS.items() if getattr(args, k, v) != v]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} only applies when INPUT is a folder")
        return False
    if len(args.inputs) > 1:
        raise UsageError(f"{dirs[0]}: a folder must be the only INPUT (got {len(args.inputs)} inputs)")
    return True


def cmd_batch(args: argparse.Namespace) -> int:
    from ..batch import run_batch, summary_lines
    from ..batch.job import BatchError, BatchJob
    from ..batch.ray import RayConfig, RayMissingError, RayRunError
    from ..imageio import OUTPUT_SUFFIXES
    from .args import (
        EXIT_FAILURE,
        UsageError,
        load_options_from_args,
        options_from_args,
    )

    options = options_from_args(args)
    src = Path(args.inputs[0])
    if not args.output:
        raise UsageError(f"{src}: a folder INPUT needs an output folder: -o OUTDIR")
    out = Path(args.output)
    if args.output == "-" or (out.suffix.lower() in OUTPUT_SUFFIXES and not out.is_dir()):  # one file: a folder INPUT writes many
        raise UsageError(f"-o {args.output}: a folder INPUT writes a folder of outputs; give -o a folder name (OUTDIR or OUTDIR/)")
    if args.max_job_cost is not None:
        raise UsageError("--max-job-cost applies to image INPUTs; a folder run has no per-image cost limit")
    if args.overwrite:
        raise UsageError(
            f"--overwrite does not apply to a folder INPUT: the run resumes and redoes only what changed "
            f"(remove {out / 'sdx4-manifest.jsonl'} to redo everything)"
        )
    if args.engine == "local" and (args.ray_address or args.workers != 1 or args.gpus_per_worker is not None):
        raise UsageError("--ray-address, --workers and --gpus-per-worker need --engine ray")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1; got {args.workers}")
    if args.gpus_per_worker is not None and args.gpus_per_worker < 0:
        raise UsageError(f"--gpus-per-worker must be >= 0; got {args.gpus_per_worker}")
    job = BatchJob(
        input_dir=src,
        output_dir=out,
        options=options,
        # Checked for every method: the classical ones load no model, but Ray reserves GPUs by --device.
        load=load_options_from_args(args),
        recursive=args.recursive,
        prompts_file=Path(args.prompts) if args.prompts else None,
    )
    say = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if options.method == "sd":
        from ..api import quiet_libraries

        quiet_libraries()
    config = RayConfig(address=args.ray_address, workers=args.workers, gpus_per_worker=args.gpus_per_worker)
    try:
        summary = run_batch(job, engine=args.engine, ray_config=config, log=say)
    except BatchError as e:
        raise UsageError(str(e)) from None
    except KeyboardInterrupt:
        print(
            f"sdx4: interrupted; run the same command again to resume (manifest: {job.manifest_path})", file=sys.stderr
        )
        return 130
    except (RayMissingError, RayRunError) as e:
        print(f"sdx4: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except ValueError as e:  # the model folder or --device/--dtype (same exit codes as for one file)
        from ..api import ModelConfigError

        if isinstance(e, ModelConfigError):
            raise
        raise UsageError(str(e)) from None
    except Exception as e:
        from ..api import ModelPathError

        if isinstance(e, ModelPathError):
            raise UsageError(str(e)) from None
        raise
    lines = list(summary_lines(summary, job))
    say(lines[0])
    for line in lines[1:]:  # failures are shown even with --quiet
        if line.startswith("  failed") or not args.quiet:
            print(line, file=sys.stderr)
    return summary.exit_code
