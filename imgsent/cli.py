"""The ``imgsent`` command line: a thin shell over the library API (one call per subcommand).

Flags are parsed and checked here (choices, ranges) so that a bad value is refused before any
model loads; each command then builds :class:`~imgsent.options.RunOptions` once and calls one
library function. Output data goes to stdout or files; progress, summaries and messages to stderr.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer
from typer.core import TyperArgument

from . import __version__
from .decode import DEFAULT_MAX_PIXELS, TTA_MODES
from .errors import ImgsentError, OutputClosed
from .options import (
    CALIBRATION_METHODS,
    DECODES,
    DEFAULT_ROWS_PER_SHARD,
    ENGINES,
    FEATURE_DTYPES,
    HEAD_NAMES,
    LABEL_MAPS,
    OUTPUT_FORMATS,
    PRECISIONS,
    PROTOCOLS,
    RUNTIMES,
    STRATEGIES,
    RunOptions,
)


def _plain_argument_help(self, ctx):  # "INPUT..." rather than "INPUT... <list[str]>"
    return None if self.metavar else TyperArgument.display_type(self, ctx)


TyperArgument.display_type_rich = _plain_argument_help


def _version(value: bool) -> None:
    if value:
        typer.echo(f"imgsent {__version__}")
        raise typer.Exit()


app = typer.Typer(
    name="imgsent",
    help="Score the sentiment (positive / negative) of images in bulk.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def _main_options(
    version: Annotated[
        bool, typer.Option("--version", "-V", help="Print the version and exit.", callback=_version, is_eager=True)
    ] = False,
) -> None:
    """Score the sentiment (positive / negative) of images in bulk."""


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(f"imgsent {__version__}")


# --- choices: the values each choice flag takes (help, completion and validation read them) -------
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _complete_device(incomplete: str) -> list[str]:
    return [d for d in (*DEVICE_CHOICES, "cuda:0", "cuda:1") if d.startswith(incomplete)]


def _check_device(value: str) -> str:
    base, _, index = value.partition(":")
    if base not in DEVICE_CHOICES or (index and (base != "cuda" or not index.isdigit())):
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(DEVICE_CHOICES)}, cuda:N")
    return value


def _check_shard(value: str | None) -> str | None:
    from .options import parse_shard

    try:
        parse_shard(value)
    except ImgsentError as exc:
        raise typer.BadParameter(str(exc)) from None
    return value


def _check_heads(value: str) -> str:
    bad = [h for h in value.split(",") if h.strip() and h.strip() not in HEAD_NAMES]
    if bad or not value.strip(","):
        raise typer.BadParameter(f"{bad[0] if bad else value!r} is not one of {', '.join(HEAD_NAMES)}")
    return value


def _complete_heads(incomplete: str) -> list[str]:
    done, _, last = incomplete.rpartition(",")
    return [f"{done},{h}" if done else h for h in HEAD_NAMES if h.startswith(last)]


# --- options shared by extract and score ---------------------------------------------------------
INPUT_HELP = "Directories, image files, tar shards (a/{00..09}.tar), Parquet files, @list.txt, or - for paths on stdin."
Inputs = Annotated[list[str], typer.Argument(metavar="INPUT...", help=INPUT_HELP)]
ImageColumn = Annotated[
    str | None,
    typer.Option(
        "--image-column",
        metavar="NAME",
        help="Inputs are Parquet files (or dataset folders): NAME holds the images (binary, or {bytes, path}).",
    ),
]
KeepImages = Annotated[
    Path | None,
    typer.Option(
        "--keep-images",
        metavar="DIR",
        file_okay=False,
        help="Save downloaded URL images here (named by the URL's sha256); the rows' path is then the copy.",
    ),
]
InputIdColumn = Annotated[
    str | None,
    typer.Option("--id-column", metavar="NAME", help="With --image-column: the column of ids (default: row number)."),
]
Null = Annotated[bool, typer.Option("--null", "-0", help="Paths in lists/stdin are NUL-separated (find -print0).")]
Hidden = Annotated[bool, typer.Option("--hidden", help="Include hidden files and directories.")]
Device = Annotated[
    str,
    typer.Option(
        metavar="auto|cpu|cuda|cuda:N|mps",
        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps.",
        callback=_check_device,
        autocompletion=_complete_device,
    ),
]
Precision = Annotated[
    Literal[PRECISIONS],
    typer.Option(
        help="auto: fp32 on CPU, bf16 (fp16 on pre-Ampere cards) on CUDA; fp32 on CUDA has TF32 off; "
        "int8: torchvision's official quantized weights on the CPU (others stay fp32)."
    ),
]
ScorePrecision = Annotated[
    Literal[PRECISIONS],
    typer.Option(help="auto: what the model's training features used (fp32 for the default); bf16: the head too."),
]
BatchSize = Annotated[
    int | None, typer.Option("--batch-size", "-b", metavar="N", min=1, help="Images per batch (64; 256 on CUDA).")
]
Decode = Annotated[
    Literal[DECODES],
    typer.Option(
        help="workers: Pillow in the decoding processes; device: JPEGs decoded on the run's device (nvJPEG on "
        "CUDA, many times Pillow's rate; pixels within a grey level or two, so features close, not equal).",
    ),
]
Runtime = Annotated[
    Literal[RUNTIMES],
    typer.Option(
        help="What runs the networks. auto: ONNX Runtime on a CPU for every network that exports and checks out "
        "(1.3x torch's rate for the default model; features within ~1e-5), torch otherwise; torch; onnx: ONNX Runtime or a "
        "one-line error.",
    ),
]
Workers = Annotated[
    int | None, typer.Option(metavar="N", min=0, help="Decoding processes (default: cores - 1; 0 = in-process).")
]
Shard = Annotated[
    str | None,
    typer.Option(metavar="I/N", callback=_check_shard, help="Process only part I of N of the inputs, for job arrays."),
]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing output made with other settings.")]
MaxPixels = Annotated[
    int, typer.Option("--max-pixels", metavar="N", min=1, help="Refuse images with more pixels (bomb guard).")
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress, summary or Ray logging.")]
ModelsDirs = Annotated[
    list[Path] | None,
    typer.Option(
        "--models",
        metavar="DIR",
        exists=True,
        file_okay=False,
        help="A folder to look in for files a model needs (after the bundle's own and $IMGSENT_MODELS); repeat.",
    ),
]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile the backbones (slow start; fixed padded batches, so results stay batch-independent).",
    ),
]
Engine = Annotated[
    Literal[ENGINES], typer.Option(help="local (this machine) or ray (Ray Data; pip install 'imgsent[ray]').")
]
RayAddress = Annotated[
    str | None, typer.Option("--ray-address", metavar="ADDRESS", help="Ray cluster to join (default: start one).")
]
RayWorkers = Annotated[
    int | None, typer.Option("--ray-workers", metavar="N", min=1, help="Ray: backbone actors in the pool (default 1).")
]
GpusPerWorker = Annotated[
    float, typer.Option("--gpus-per-worker", metavar="G", min=0, help="Ray: GPUs per backbone actor (0 = CPU).")
]
RowsPerShard = Annotated[
    int, typer.Option("--rows-per-shard", metavar="N", min=1, help="Rows per Parquet shard (resume granularity).")
]


Tta = Annotated[Literal[TTA_MODES], typer.Option(help="Test-time augmentation.")]
KeepColumns = Annotated[
    list[str] | None,
    typer.Option(
        "--keep-columns",
        metavar="NAME,...",
        help="Carry these fields of tar shards' KEY.json (txt: KEY.txt) or Parquet columns into the rows; * = all.",
    ),
]

# The run flags extract and score share, in --help's order, with their defaults: each command
# takes them through with_run_flags and gets one RunOptions.
RUN_FLAGS = {
    "device": (Device, "auto"),
    "precision": (Precision, "auto"),
    "batch_size": (BatchSize, None),
    "workers": (Workers, None),
    "decode": (Decode, "workers"),
    "runtime": (Runtime, "auto"),
    "shard": (Shard, None),
    "overwrite": (Overwrite, False),
    "rows_per_shard": (RowsPerShard, DEFAULT_ROWS_PER_SHARD),
    "max_pixels": (MaxPixels, DEFAULT_MAX_PIXELS),
    "null": (Null, False),
    "hidden": (Hidden, False),
    "image_column": (ImageColumn, None),
    "id_column": (InputIdColumn, None),
    "keep_images": (KeepImages, None),
    "compile": (Compile, False),
    "engine": (Engine, "local"),
    "ray_address": (RayAddress, None),
    "ray_workers": (RayWorkers, None),
    "gpus_per_worker": (GpusPerWorker, 0.0),
    "quiet": (Quiet, False),
}


def flag_group(table: dict, into: str, build):
    """A decorator factory for a group of flags several commands share: the command offers
    ``table``'s flags (name -> (annotation, default); ``more``: a command's own version of one, or
    flags of its own that belong to the group) after its own parameters, and is called with them
    as one ``into`` argument, ``build(given)``."""

    def decorator(**more):
        def wrap(fn):
            flags = {**table, **more}
            sig = inspect.signature(fn, eval_str=True)
            own = [p for p in sig.parameters.values() if p.name != into]
            kw = inspect.Parameter.KEYWORD_ONLY
            params = own + [inspect.Parameter(n, kw, default=d, annotation=a) for n, (a, d) in flags.items()]

            @functools.wraps(fn)
            def command(*args, **kwargs):
                given = {n: kwargs.pop(n) for n in flags if n in kwargs}
                return fn(*args, **{into: build(given)}, **kwargs)

            command.__signature__ = sig.replace(parameters=params)
            command.__annotations__ = {p.name: p.annotation for p in params} | {"return": sig.return_annotation}
            return command

        return wrap

    return decorator


# extract and score: one RunOptions (see _run_options)
with_run_flags = flag_group(RUN_FLAGS, "options", lambda given: _run_options(given))


@app.command()
@with_run_flags(tta=(Tta, "none"))
def extract(
    inputs: Inputs,
    out: Annotated[
        str, typer.Option("--out", "-o", metavar="DIR", help="Feature store directory to write (or resume).")
    ],
    backbones: Annotated[
        list[str],
        typer.Option("--backbones", "-B", metavar="SPEC", help="Backbone specs or presets (repeat or comma-separate)."),
    ] = ["default"],  # noqa: B006 (typer reads the default, never mutates it)
    random_weights: Annotated[bool, typer.Option(help="Random (seeded) weights, for testing only.")] = False,
    dtype: Annotated[Literal[FEATURE_DTYPES], typer.Option(help="Stored feature type.")] = "float32",
    options: RunOptions = RunOptions(),
) -> None:
    """Extract backbone features of images into a Parquet feature store."""
    from .extraction import extract as run

    summary = run(inputs, out, backbones=backbones, random_weights=random_weights, dtype=dtype, options=options)
    if options.progress:
        summary.print("imgsent extract")
    _fail_when_none_ok(summary, "extracted")


# --- options shared by train and evaluate ---------------------------------------------------------
Store = Annotated[str, typer.Argument(metavar="STORE", help="Feature store directory (from imgsent extract).")]
Labels = Annotated[str | None, typer.Option("--labels", "-l", metavar="FILE", help="CSV/TSV or '<file> <label>' list.")]
LabelsFromFolders = Annotated[
    bool, typer.Option("--labels-from-folders", help="Each image's folder name is its label.")
]
Map = Annotated[
    Literal[LABEL_MAPS],
    typer.Option("--map", help="Label mapping: auto (0/1, pos/neg -> polarity), polarity (emotions too), none."),
]
Blocks = Annotated[
    list[str] | None,
    typer.Option("--blocks", metavar="KEY", help="Feature blocks (backbone keys) to use; repeat or comma-separate."),
]
IdColumn = Annotated[
    str | None, typer.Option("--id-column", metavar="NAME", help="Labels file column holding the id or path.")
]
LabelColumn = Annotated[
    str | None, typer.Option("--label-column", metavar="NAME", help="Labels file column holding the label.")
]
Seed = Annotated[int, typer.Option(metavar="N", help="Random seed (weights init, shuffling, dropout, splits).")]
Epochs = Annotated[
    int | None,
    typer.Option(metavar="N", min=1, help="Epochs (paper: nn 20, moe schedule 1: 120, schedule 2: 60)."),
]
Lr = Annotated[float | None, typer.Option(metavar="LR", help="Adam learning rate (paper: 1e-4).")]
HeadBatch = Annotated[
    int | None, typer.Option("--batch-size", metavar="N", min=1, help="Minibatch size (paper: nn 8, moe 256).")
]
WeightDecay = Annotated[
    float | None, typer.Option(metavar="WD", help="Adam weight decay (paper: moe 1e-3; nn 0, ours).")
]
Dropout = Annotated[
    float | None,
    typer.Option(metavar="P", help="Dropout (paper: nn 0.4; moe 0.5 is ours, the paper gives no rate)."),
]
MinSteps = Annotated[
    int | None,
    typer.Option(
        "--min-steps",
        metavar="N",
        min=0,
        help="Fewest optimiser steps (ours; nn 1000, moe 300): a shorter schedule gets more epochs; 0 = the "
        "paper's (also the default when --epochs is given).",
    ),
]
HiddenUnits = Annotated[
    int, typer.Option("--hidden-units", metavar="N", min=1, help="Hidden units of the first layer (paper: 200).")
]
Experts = Annotated[int, typer.Option(metavar="N", min=1, help="MoE experts per class, plus the dummy (paper: 2).")]
NormBlocks = Annotated[
    bool | None,
    typer.Option(
        "--normalize-blocks/--no-normalize-blocks",
        help="L2-normalise each feature block (paper: nn yes, moe no).",
    ),
]


def _blocks(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


# train and evaluate: the head-fitting settings, as imgsent.train / imgsent.evaluate take them
FIT_FLAGS = {
    "epochs": (Epochs, None),
    "lr": (Lr, None),
    "batch_size": (HeadBatch, None),
    "weight_decay": (WeightDecay, None),
    "dropout": (Dropout, None),
    "hidden_units": (HiddenUnits, 200),
    "experts": (Experts, 2),
    "normalize_blocks": (NormBlocks, None),
    "min_steps": (MinSteps, None),
}
with_fit_flags = flag_group(
    FIT_FLAGS, "fit", lambda given: {("hidden" if k == "hidden_units" else k): v for k, v in given.items()}
)

# train, evaluate, prevalence, calibrate: how a label file is read, as the library's functions take it
LABEL_FLAGS = {"map": (Map, "auto"), "id_column": (IdColumn, None), "label_column": (LabelColumn, None)}
with_label_flags = flag_group(
    LABEL_FLAGS, "reading", lambda given: {("mapping" if k == "map" else k): v for k, v in given.items()}
)


@app.command()
@with_fit_flags()
@with_label_flags()
def train(
    store: Store,
    out: Annotated[str, typer.Option("--out", "-o", metavar="DIR", help="Model bundle directory to write.")],
    labels: Labels = None,
    labels_from_folders: LabelsFromFolders = False,
    head: Annotated[Literal[HEAD_NAMES], typer.Option(help="nn, moe (schedule from --schedule), moe1, moe2.")] = "nn",
    schedule: Annotated[
        int | None,
        typer.Option(metavar="1|2", min=1, max=2, help="MoE schedule: 1 (120 epochs, lr x0.1 every 40) or 2 (60, 20)."),
    ] = None,
    blocks: Blocks = None,
    cv: Annotated[
        int,
        typer.Option(
            metavar="K", min=0, help="Held-out estimate first: stratified K-fold accuracy (0 = skip it; default 5)."
        ),
    ] = 5,
    seed: Seed = 0,
    overwrite: Annotated[
        bool, typer.Option(help="Write into --out even if it holds something other than a model.")
    ] = False,
    quiet: Quiet = False,
    reading: dict | None = None,
    fit: dict | None = None,
) -> None:
    """Train a head (the paper's NN or MoE) on a feature store and write a model bundle."""
    from .training import train as run

    model = run(
        store,
        labels=labels,
        labels_from_folders=labels_from_folders,
        head=head,
        blocks=_blocks(blocks),
        out=out,
        overwrite=overwrite,
        progress=not quiet,
        cv=cv,
        schedule=schedule,
        seed=seed,
        **(reading or {}),
        **(fit or {}),
    )
    if not quiet:
        typer.echo(f"wrote {out}: {model.describe_training(with_warnings=False)}", err=True)  # warned above


@app.command()
@with_fit_flags()
@with_label_flags()
def evaluate(
    store: Store,
    labels: Labels = None,
    labels_from_folders: LabelsFromFolders = False,
    protocol: Annotated[Literal[PROTOCOLS], typer.Option(help="Evaluation protocol.")] = "random-splits",
    heads: Annotated[
        str,
        typer.Option(
            metavar="HEAD,...",
            help="Comma-separated heads: nn, moe1, moe2 (moe = moe1).",
            callback=_check_heads,
            autocompletion=_complete_heads,
        ),
    ] = "nn,moe1,moe2",
    ablation: Annotated[
        bool,
        typer.Option(
            help="The paper's Table II: each view alone (NN), all views (every head), all views but one (NN)."
        ),
    ] = False,
    blocks: Blocks = None,
    splits: Annotated[int, typer.Option(metavar="N", min=1, help="random-splits: how many splits.")] = 5,
    test_size: Annotated[float, typer.Option(metavar="F", help="random-splits: test fraction.")] = 0.2,
    folds: Annotated[int, typer.Option(metavar="K", min=2, help="kfold: number of folds.")] = 5,
    split: Annotated[
        list[str] | None,
        typer.Option("--split", metavar="FILE", help="predefined: a file listing one split's test ids (repeat)."),
    ] = None,
    split_from_folders: Annotated[
        bool, typer.Option(help="predefined: train/ + test/ or partitionK/ folders.")
    ] = False,
    report: Annotated[
        str | None, typer.Option(metavar="FILE", help="Also write the results to FILE.json or FILE.csv.")
    ] = None,
    plots: Annotated[
        str | None,
        typer.Option(metavar="DIR", help="Also draw ROC curves and confusion matrices (PNG and SVG) into DIR."),
    ] = None,
    seed: Seed = 0,
    quiet: Quiet = False,
    reading: dict | None = None,
    fit: dict | None = None,
) -> None:
    """Evaluate heads under a protocol; print the paper's Table II layout (mean ± std per metric) on stdout."""
    from .evaluation import evaluate as run

    result = run(
        store,
        labels=labels,
        labels_from_folders=labels_from_folders,
        protocol=protocol,
        heads=[h.strip() for h in heads.split(",") if h.strip()],
        blocks=_blocks(blocks),
        ablation=ablation,
        splits=splits,
        test_size=test_size,
        folds=folds,
        split_files=split or [],
        split_from_folders=split_from_folders,
        seed=seed,
        report=report,
        plots=plots,
        progress=not quiet,
        **(reading or {}),
        **(fit or {}),
    )
    result.print()


@app.command()
@with_run_flags(precision=(ScorePrecision, "auto"), keep_columns=(KeepColumns, None))
def score(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(metavar="INPUT...", help=INPUT_HELP),
    ] = None,
    out: Annotated[
        str,
        typer.Option(
            "--out", "-o", metavar="FILE|DIR/|-", help="FILE.parquet|.csv|.tsv|.jsonl, - for stdout, or DIR/ (shards)."
        ),
    ] = "-",
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            metavar="NAME|DIR",
            help="A packaged model (default, mobilenet) or a model bundle directory (./NAME for a folder).",
        ),
    ] = None,
    models_dirs: ModelsDirs = None,
    features: Annotated[
        str | None, typer.Option("--features", metavar="STORE", help="Score an existing feature store, not images.")
    ] = None,
    weights: Annotated[
        list[str] | None,
        typer.Option(
            "--weights",
            metavar="FILE|KEY=FILE",
            help="Backbone weights file; default: $IMGSENT_WEIGHTS, cache, download.",
        ),
    ] = None,
    format: Annotated[
        Literal[OUTPUT_FORMATS] | None,
        typer.Option("--format", help="Output format (default: from the extension; jsonl on stdout)."),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(metavar="T", help="Two-class models: predict positive when p_positive >= T (default: argmax)."),
    ] = None,
    keep_features: Annotated[
        str | None, typer.Option("--keep-features", metavar="DIR", help="Also write the computed features here.")
    ] = None,
    options: RunOptions = RunOptions(),
) -> None:
    """Score the sentiment of images (or of a feature store): one row per image.

    With no --model, the packaged default polarity model is used (a head trained on Twitter I over
    EfficientNet-Lite1 + Lite2 features and the faces in the image and their expressions; weights
    from installed packages and imgsent itself: works offline); --model lite (no faces) is the
    previous default, --model mobilenet is faster and less accurate. `imgsent models MODEL` says where a model's weights and
    files come from.
    """
    from .scoring import score as run

    summary = run(
        inputs or [],
        out,
        model=model,
        features=features,
        weights=weights or [],
        models=[str(d) for d in models_dirs or []],
        fmt=format,
        threshold=threshold,
        keep_features=keep_features,
        options=options,
    )
    if options.progress:
        summary.print("imgsent score")
    _fail_when_none_ok(summary, "scored")


def _run_options(flags: dict) -> RunOptions:
    """The :class:`RunOptions` of a command's run flags (``flags``: its parameters, ``locals()``),
    the one shared group of ``extract``, ``score`` and ``label``: each flag named as a field goes
    there as it is; ``--hidden`` is ``include_hidden``, ``--quiet`` no ``progress``, ``--keep-images``
    a folder name and ``--keep-columns`` a tuple."""
    fields = {f.name for f in dataclasses.fields(RunOptions)}
    picked = {k: v for k, v in flags.items() if k in fields}
    picked["progress"] = not flags.get("quiet", False)
    if "hidden" in flags:
        picked["include_hidden"] = flags["hidden"]
    if picked.get("keep_images") is not None:
        picked["keep_images"] = str(picked["keep_images"]) or None
    if "keep_columns" in picked:
        picked["keep_columns"] = tuple(picked["keep_columns"] or ())
    return RunOptions(**picked)


def _fail_when_none_ok(summary, done: str) -> None:
    """A non-empty run in which no image succeeded exits 1 with one line (the rows are written)."""
    if summary.total and summary.ok == 0:
        first = summary.first_error or "see the error column of the output"
        typer.echo(f"imgsent: error: 0 of {summary.total} images {done}; first error: {first}", err=True)
        raise typer.Exit(1)


@app.command()
@with_label_flags()
def prevalence(
    scores: Annotated[
        str, typer.Argument(metavar="SCORES", help="A score output: a file, a directory of shards, or - (stdin).")
    ],
    labels: Annotated[
        str | None,
        typer.Option("--labels", "-l", metavar="FILE", help="A labelled random sample of the same collection."),
    ] = None,
    by: Annotated[str | None, typer.Option(metavar="COLUMN", help="Also per group of this column.")] = None,
    meta: Annotated[
        str | None, typer.Option(metavar="FILE", help="CSV/Parquet metadata with id and the --by column.")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="JSON Lines: one object per group, class, method.")] = False,
    level: Annotated[float, typer.Option(metavar="L", min=0.5, max=0.999, help="Confidence level.")] = 0.95,
    bootstrap: Annotated[int, typer.Option(metavar="B", min=100, help="Bootstrap resamples.")] = 1000,
    seed: Seed = 0,
    plot: Annotated[
        str | None, typer.Option(metavar="FILE", help="Also chart the shares over groups (.svg, .png, .pdf).")
    ] = None,
    reading: dict | None = None,
) -> None:
    """Class shares of a scored collection, overall and per group, with confidence intervals
    (adjusted for the model's errors when given a labelled sample)."""
    from .collection import prevalence as run

    report = run(
        scores, labels=labels, by=by, meta=meta, level=level, bootstrap=bootstrap, seed=seed, **(reading or {})
    )
    if plot is not None:
        from .htmlreport import shares_plot

        shares_plot(report, plot)
    if json_out:
        sys.stdout.write(report.to_json_lines())
    else:
        typer.echo(report.table())
    for w in report.warnings:  # stderr in both forms: stdout carries the data only
        typer.echo(f"imgsent: warning: {w}", err=True)


@app.command()
def report(
    scores: Annotated[str, typer.Argument(metavar="SCORES", help="A score output: a file or a directory of shards.")],
    out: Annotated[str, typer.Option("--out", "-o", metavar="FILE", help="The HTML file to write.")],
    by: Annotated[str | None, typer.Option(metavar="COLUMN", help="Shares and contact sheets per group.")] = None,
    meta: Annotated[
        str | None, typer.Option(metavar="FILE", help="CSV/Parquet metadata with id and the --by column.")
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option("--labels", "-l", metavar="FILE", help="A labelled sample: adjusted shares, confusion, ROC."),
    ] = None,
    per_class: Annotated[
        int, typer.Option("--per-class", metavar="N", min=1, max=200, help="Images per contact sheet.")
    ] = 24,
    seed: Seed = 0,
    map: Map = "auto",
    quiet: Quiet = False,
) -> None:
    """A self-contained HTML report of a score output: counts, score histogram, class shares, contact
    sheets of the most positive, most negative and least sure images."""
    from .htmlreport import build_report

    info = build_report(scores, out, by=by, meta=meta, labels=labels, per_class=per_class, seed=seed, mapping=map)
    if not quiet:
        typer.echo(f"wrote {out}: {info['rows']} rows, {info['bytes'] / 1e6:.2f} MB", err=True)


@app.command()
@with_label_flags()
def calibrate(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Model bundle directory, or 'default'.")],
    labels: Annotated[
        str, typer.Option("--labels", "-l", metavar="FILE", help="A labelled random sample of the collection.")
    ],
    out: Annotated[str, typer.Option("--out", "-o", metavar="DIR", help="The recalibrated model bundle to write.")],
    features: Annotated[
        str | None, typer.Option("--features", metavar="STORE", help="A feature store holding the sample.")
    ] = None,
    scores: Annotated[
        str | None, typer.Option("--scores", metavar="FILE", help="Or the model's score output holding it.")
    ] = None,
    method: Annotated[
        Literal[CALIBRATION_METHODS],
        typer.Option(help="auto: Platt (isotonic from 1000 images); temperature for several classes."),
    ] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Write into --out even if it holds other files.")] = False,
    reading: dict | None = None,
) -> None:
    """Recalibrate a model's probabilities on a labelled sample of the collection it scores."""
    from .collection import calibrate as run

    sample = {"labels": labels, "features": features, "scores": scores}  # where the labelled sample is
    m = run(model, out=out, method=method, overwrite=overwrite, **sample, **(reading or {}))
    c = m.calibration
    typer.echo(f"wrote {out}: {c.method} calibration on {c.sample['size']} labelled images", err=True)


@app.command()
def label(
    out: Annotated[
        str, typer.Option("--out", "-o", metavar="LABELS.csv", help="The labels file (created, or resumed).")
    ],
    inputs: Annotated[list[str] | None, typer.Argument(metavar="[INPUT...]", help=INPUT_HELP)] = None,
    features: Annotated[
        str | None,
        typer.Option(
            "--features", metavar="STORE", help="Feature store to label from (with INPUT: where to extract them)."
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", metavar="NAME|DIR", help="The model to start from (default).")
    ] = None,
    model_out: Annotated[
        str | None, typer.Option("--model-out", metavar="DIR", help="Write the model as it stands when you stop.")
    ] = None,
    classes: Annotated[
        str | None, typer.Option("--classes", metavar="A,B,...", help="Class names (default: the model's).")
    ] = None,
    strategy: Annotated[
        Literal[STRATEGIES],
        typer.Option(help="Which image next: random (honest estimates), active (least sure), mix (both)."),
    ] = "mix",
    host: Annotated[
        str, typer.Option(metavar="ADDRESS", help="Address to serve on (another than 127.0.0.1 warns).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="N", min=0, max=65535, help="Port (0: any free one).")] = 8750,
    token: Annotated[
        str | None, typer.Option(metavar="T", help="The page's access token (default: a random one).")
    ] = None,
    annotator: Annotated[
        str | None, typer.Option(metavar="NAME", help="Who labels (default: $USER); the page may name another.")
    ] = None,
    no_browser: Annotated[bool, typer.Option("--no-browser", help="Print the page's URL, do not open it.")] = False,
    seed: Seed = 0,
    models_dirs: ModelsDirs = None,
    device: Device = "auto",
    workers: Workers = None,
    quiet: Quiet = False,
) -> None:
    """Label images in the browser: the model learns as you label and says how good it is on them."""
    from .labelling import label as run

    run(
        inputs or [],
        out,
        features=features,
        model=model,
        model_out=model_out,
        classes=[c.strip() for c in classes.split(",") if c.strip()] if classes else None,
        host=host,
        port=port,
        token=token,
        annotator=annotator,
        browser=not no_browser,
        strategy=strategy,
        seed=seed,
        models=[str(d) for d in models_dirs or []],
        options=_run_options(locals()),
        echo=lambda text: typer.echo(text, err=True),
    )


@app.command()
def models(
    model: Annotated[
        str | None,
        typer.Argument(metavar="[MODEL]", help="A packaged model (default, mobilenet) or a bundle directory."),
    ] = None,
    models_dirs: ModelsDirs = None,
) -> None:
    """A model's card (head, classes, backbones, training data, held-out estimate), the files its
    backbones read and where they were found, and where each backbone's weights come from."""
    from .cards import describe_model

    typer.echo(describe_model(model, [str(d) for d in models_dirs or []]))


@app.command(name="backbones")
def list_backbones() -> None:
    """List backbone presets and the spec syntax (one spec a line, never cut)."""
    from .specs import MODELS_ENV, describe_presets

    lines = []
    for name, specs, desc in describe_presets():
        lines.append(f"{name}: {desc}")
        lines += [f"    {s}" for s in specs.split(", ")]
    lines += [
        "",
        "Any backbone: timm:NAME[.TAG], torchvision:NAME[.WEIGHTS_TAG], torchscript:PATH, imgsent:face_expression",
        "(shipped); add :probs for class probabilities or :head for the raw head outputs (CLIP: the image",
        "embedding), @FILE for local weights (.safetensors or .pth). Detector views, DETECTOR =",
        "imgsent:faces_rfb320 | imgsent:faces_rfb640 (shipped),",
        "torchscript:PATH or torchvision:NAME[@FILE]:",
        "  objects:DETECTOR              per COCO class: max score, sum of scores, area share (3 x classes)",
        "  regions:DETECTOR+SPEC[+k=K][+min=S]  SPEC's features of the top-K object crops scoring >= S,",
        "                                score-weighted mean (default k=5, min=0.3)",
        f"{{models}} in a preset is the folder ${MODELS_ENV} names. Pretrained weights download on first use",
        "(timm: Hugging Face cache, torchvision: torch hub cache); offline, give @FILE.",
    ]
    typer.echo("\n".join(lines))


def _show_warning(message, category, filename, lineno, file=None, line=None):
    from .errors import ImgsentWarning

    if issubclass(category, ImgsentWarning):
        typer.echo(f"imgsent: warning: {message}", err=True)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = None


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every ``finally`` runs (shards kept, locks freed)."""


def main() -> None:
    """Entry point: one clear line and exit code 2 for user errors, never a traceback; 130 / 143
    after Ctrl-C / SIGTERM (finished shards kept); 0 when the reader of stdout goes away.
    The process-wide settings it changes (warning display, the SIGTERM handler) are restored."""
    import signal
    import warnings

    from .errors import ImgsentWarning

    def terminated(signum, frame):
        raise _Terminated()

    global _default_showwarning
    _default_showwarning = warnings.showwarning
    previous_term = signal.signal(signal.SIGTERM, terminated)
    debug = bool(os.environ.get("IMGSENT_DEBUG"))
    cpp_level = os.environ.get(CPP_LOG_ENV)
    if not debug and cpp_level is None:
        # torch's C++ warnings ("Quantizer.cpp:111 ... deprecated" when an int8 TorchScript detector
        # loads) print straight to stderr, past Python's filters; torch reads this when it loads,
        # and the decoding processes inherit it
        os.environ[CPP_LOG_ENV] = "ERROR"
    with warnings.catch_warnings():
        if not debug:  # torch's deprecation chatter is not the user's business
            for module in ("torch", "torchvision", "timm"):
                warnings.filterwarnings("ignore", category=UserWarning, module=module)
                warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.simplefilter("always", ImgsentWarning)  # messages for the user, whatever PYTHONWARNINGS says
        warnings.showwarning = _show_warning
        try:
            code = _run()
        finally:
            signal.signal(signal.SIGTERM, previous_term)
            if cpp_level is None:
                os.environ.pop(CPP_LOG_ENV, None)
    sys.exit(code)


CPP_LOG_ENV = "TORCH_CPP_LOG_LEVEL"


def _one_dash_long_option(argv: list[str]) -> str | None:
    """A long option typed with one dash (``-out``, which the parser reads as ``-o ut``)."""
    suspects = [a for a in argv if a.startswith("-") and not a.startswith("--") and len(a) > 2]
    if not suspects:
        return None  # the usual command line: no second build of the app's commands at start-up
    command = typer.main.get_command(app)
    longs = {
        name
        for sub in getattr(command, "commands", {}).values()
        for p in sub.params
        for name in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]
        if name.startswith("--")
    }
    for arg in argv:
        if arg == "--":
            break
        if arg.startswith("-") and not arg.startswith("--") and "-" + arg.split("=")[0] in longs:
            return arg
    return None


def _run() -> int:
    from typer._click.exceptions import ClickException

    typo = _one_dash_long_option(sys.argv[1:])
    if typo is not None:
        name = typo.split("=")[0]
        typer.echo(
            f"imgsent: error: {name} has one dash (read as {name[:2]} {name[2:]}): did you mean -{name}?", err=True
        )
        return 2
    try:
        code = app(standalone_mode=False)
    except ImgsentError as exc:
        typer.echo(f"imgsent: error: {exc}", err=True)
        return 2
    except ClickException as exc:
        return _usage_error(exc)
    except _Terminated:
        return _interrupted(143)
    except (OutputClosed, BrokenPipeError):
        return _quiet_broken_pipe()
    except OSError as exc:  # an output folder that does not exist, a full disk...: one line, not a traceback
        where = f": {exc.filename}" if exc.filename else ""
        typer.echo(f"imgsent: error: {exc.strerror or exc}{where}", err=True)
        return 2
    if code == 130:  # typer turns Ctrl-C into exit code 130
        return _interrupted(130)
    return code if isinstance(code, int) else 0


def _usage_error(exc) -> int:
    """A bad command line: one line (plus where to look), exit 2. ``imgsent`` alone: the help."""
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
        typer.echo(ctx.get_help(), err=True)
        return 2
    where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    message = " ".join(exc.format_message().split()).replace("Value error, ", "")  # typer's Literal check
    typer.echo(f"imgsent: error: {message}{where}", err=True)
    return getattr(exc, "exit_code", 2) or 2


def _interrupted(code: int) -> int:
    import threading

    # The process is ending: helper threads of multiprocessing / the DataLoader, cut off mid-call,
    # must not print tracebacks over the one line that matters.
    threading.excepthook = lambda args: None
    typer.echo(f"imgsent: interrupted: {_what_was_kept()}", err=True)
    return code


def _what_was_kept() -> str:
    """What an interrupted run leaves: nothing yet (still loading models), or shards to resume from."""
    from .shards import WRITTEN_HERE
    from .sinks import WRITING

    if WRITING and not WRITTEN_HERE["shards"]:
        out = sorted(WRITING)[0]
        return (
            f"{out} was not written (a single file appears only when the run completes); "
            f"--out {os.path.splitext(out)[0]}/ writes shards that a rerun resumes"
        )
    if not WRITTEN_HERE["outputs"]:
        return "nothing was written yet"
    if not WRITTEN_HERE["shards"]:
        return "before the first shard was finished; rerun the same command to start again"
    return f"{WRITTEN_HERE['shards']} finished shard(s) are kept; rerun the same command to resume"


def _quiet_broken_pipe() -> int:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    return 0
