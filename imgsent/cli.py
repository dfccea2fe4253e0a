"""The ``imgsent`` command line: a thin shell over the library API (one call per subcommand)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .errors import ImgsentError

app = typer.Typer(
    name="imgsent",
    help="Score the sentiment (positive / negative) of images in bulk.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# --- options shared by extract and score ---------------------------------------------------------
Inputs = Annotated[list[str], typer.Argument(help="Directories, image files, @list.txt, or - for paths on stdin.")]
Null = Annotated[bool, typer.Option("--null", "-0", help="Paths in lists/stdin are NUL-separated (find -print0).")]
Hidden = Annotated[bool, typer.Option("--hidden", help="Include hidden files and directories.")]
Device = Annotated[str, typer.Option(help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps.")]
Precision = Annotated[str, typer.Option(help="auto (AMP on CUDA, fp32 elsewhere), fp32, bf16, fp16.")]
ScorePrecision = Annotated[
    str, typer.Option(help="auto (AMP on CUDA, fp32 elsewhere), fp32, bf16 (the head too), fp16.")
]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", help="Images per batch.")]
Workers = Annotated[int | None, typer.Option(help="Decoding processes (default: cores - 1; 0 = in-process).")]
Shard = Annotated[str | None, typer.Option(help="Process only part I of N of the inputs (I/N), for job arrays.")]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing output made with other settings.")]
MaxPixels = Annotated[int, typer.Option("--max-pixels", help="Refuse images with more pixels (bomb guard).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the backbones (slow start, faster long runs).")]
Engine = Annotated[str, typer.Option(help="local (this machine) or ray (Ray Data; pip install 'imgsent[ray]').")]
RayAddress = Annotated[
    str | None, typer.Option("--ray-address", help="Ray cluster to join (default: start a local one).")
]
RayWorkers = Annotated[int | None, typer.Option("--ray-workers", help="Ray: backbone actors in the pool (default 1).")]
GpusPerWorker = Annotated[float, typer.Option("--gpus-per-worker", help="Ray: GPUs per backbone actor (0 = CPU).")]
RowsPerShard = Annotated[int, typer.Option("--rows-per-shard", help="Rows per Parquet shard (resume granularity).")]


@app.command()
def extract(
    inputs: Inputs,
    out: Annotated[str, typer.Option("--out", "-o", help="Feature store directory to write (or resume).")],
    backbones: Annotated[
        list[str],
        typer.Option("--backbones", "-B", help="Backbone specs or presets (repeat or comma-separate)."),
    ] = ["default"],  # noqa: B006 (typer reads the default, never mutates it)
    random_weights: Annotated[bool, typer.Option(help="Random (seeded) weights, for testing only.")] = False,
    tta: Annotated[str, typer.Option(help="Test-time augmentation: none, flip, crops, flip+crops.")] = "none",
    dtype: Annotated[str, typer.Option(help="Stored feature type: float32 or float16.")] = "float32",
    device: Device = "auto",
    precision: Precision = "auto",
    batch_size: BatchSize = 64,
    workers: Workers = None,
    shard: Shard = None,
    overwrite: Overwrite = False,
    rows_per_shard: RowsPerShard = 10_000,
    max_pixels: MaxPixels = 89_478_485,
    null: Null = False,
    hidden: Hidden = False,
    compile: Compile = False,
    engine: Engine = "local",
    ray_address: RayAddress = None,
    ray_workers: RayWorkers = None,
    gpus_per_worker: GpusPerWorker = 0.0,
    quiet: Quiet = False,
) -> None:
    """Extract backbone features of images into a Parquet feature store."""
    from .extraction import extract as run

    summary = run(
        inputs, out, backbones=backbones, random_weights=random_weights, device=device, precision=precision,
        batch_size=batch_size, workers=workers, tta=tta, dtype=dtype, shard=shard, overwrite=overwrite,
        rows_per_shard=rows_per_shard, max_pixels=max_pixels, null=null, include_hidden=hidden,
        compile=compile, progress=not quiet, engine=engine, ray_address=ray_address, ray_workers=ray_workers,
        gpus_per_worker=gpus_per_worker,
    )  # fmt: skip
    if not quiet:
        summary.print("imgsent extract")


# --- options shared by train and evaluate ---------------------------------------------------------
Store = Annotated[str, typer.Argument(help="Feature store directory (from imgsent extract).")]
Labels = Annotated[str | None, typer.Option("--labels", "-l", help="CSV/TSV or '<file> <label>' list.")]
LabelsFromFolders = Annotated[
    bool, typer.Option("--labels-from-folders", help="Each image's folder name is its label.")
]
Map = Annotated[
    str, typer.Option("--map", help="Label mapping: auto (0/1, pos/neg -> polarity), polarity (emotions too), none.")
]
Features = Annotated[list[str] | None, typer.Option("--features", "-f", help="Feature blocks to use (default: all).")]
IdColumn = Annotated[str | None, typer.Option("--id-column", help="Labels file column holding the id or path.")]
LabelColumn = Annotated[str | None, typer.Option("--label-column", help="Labels file column holding the label.")]
Seed = Annotated[int, typer.Option(help="Random seed (weights init, shuffling, dropout, splits).")]
Epochs = Annotated[int | None, typer.Option(help="Epochs (default: nn 20, moe schedule 1: 120, schedule 2: 60).")]
Lr = Annotated[float | None, typer.Option(help="Adam learning rate (default 1e-4).")]
HeadBatch = Annotated[int | None, typer.Option("--batch-size", help="Minibatch size (default: nn 8, moe 256).")]
WeightDecay = Annotated[float | None, typer.Option(help="Adam weight decay (default: nn 0, moe 1e-3).")]
Dropout = Annotated[float | None, typer.Option(help="Dropout (default: nn 0.4, moe 0.5).")]
HiddenUnits = Annotated[int, typer.Option("--hidden", help="Hidden units of the first layer.")]
Experts = Annotated[int, typer.Option(help="MoE experts per class (plus the dummy expert).")]
NormBlocks = Annotated[
    bool | None,
    typer.Option(
        "--normalize-blocks/--no-normalize-blocks", help="L2-normalise each feature block (default: nn yes, moe no)."
    ),
]


def _features(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


@app.command()
def train(
    store: Store,
    out: Annotated[str, typer.Option("--out", "-o", help="Model bundle directory to write.")],
    labels: Labels = None,
    labels_from_folders: LabelsFromFolders = False,
    map: Map = "auto",
    head: Annotated[str, typer.Option(help="nn or moe.")] = "nn",
    schedule: Annotated[
        int, typer.Option(help="MoE schedule: 1 (120 epochs, lr x0.1 every 40) or 2 (60, every 20).")
    ] = 1,
    features: Features = None,
    epochs: Epochs = None,
    lr: Lr = None,
    batch_size: HeadBatch = None,
    weight_decay: WeightDecay = None,
    dropout: Dropout = None,
    hidden: HiddenUnits = 200,
    experts: Experts = 2,
    normalize_blocks: NormBlocks = None,
    seed: Seed = 0,
    id_column: IdColumn = None,
    label_column: LabelColumn = None,
    quiet: Quiet = False,
) -> None:
    """Train a head (the paper's NN or MoE) on a feature store and write a model bundle."""
    from .training import train as run

    model = run(
        store, labels=labels, labels_from_folders=labels_from_folders, mapping=map, head=head, features=_features(features),
        out=out, id_column=id_column, label_column=label_column, progress=not quiet, schedule=schedule, epochs=epochs,
        lr=lr, batch_size=batch_size, weight_decay=weight_decay, dropout=dropout, hidden=hidden, experts=experts,
        normalize_blocks=normalize_blocks, seed=seed,
    )  # fmt: skip
    if not quiet:
        t = model.training
        typer.echo(
            f"wrote {out}: {model.config.label} head on {model.in_dim}-d features, classes {', '.join(model.classes)}; "
            f"{t['labelled']} labelled images (unlabelled images {t['images_without_label']}, labels without image "
            f"{t['labels_without_image']}, labelled error rows {t['labelled_error_rows']}); train accuracy "
            f"{100 * t['train_accuracy']:.2f}%",
            err=True,
        )


@app.command()
def evaluate(
    store: Store,
    labels: Labels = None,
    labels_from_folders: LabelsFromFolders = False,
    map: Map = "auto",
    protocol: Annotated[str, typer.Option(help="random-splits, kfold, predefined, train-val-test.")] = "random-splits",
    heads: Annotated[str, typer.Option(help="Comma-separated: nn, moe1, moe2.")] = "nn,moe1,moe2",
    ablation: Annotated[bool, typer.Option(help="Also each feature block alone with the NN head.")] = False,
    features: Features = None,
    splits: Annotated[int, typer.Option(help="random-splits: how many splits.")] = 5,
    test_size: Annotated[float, typer.Option(help="random-splits: test fraction.")] = 0.2,
    folds: Annotated[int, typer.Option(help="kfold: number of folds.")] = 5,
    split: Annotated[
        list[str] | None, typer.Option("--split", help="predefined: a file listing one split's test ids (repeat).")
    ] = None,
    split_from_folders: Annotated[
        bool, typer.Option(help="predefined: train/ + test/ or partitionK/ folders.")
    ] = False,
    report: Annotated[str | None, typer.Option(help="Also write the results to FILE.json or FILE.csv.")] = None,
    epochs: Epochs = None,
    lr: Lr = None,
    batch_size: HeadBatch = None,
    weight_decay: WeightDecay = None,
    dropout: Dropout = None,
    hidden: HiddenUnits = 200,
    experts: Experts = 2,
    normalize_blocks: NormBlocks = None,
    seed: Seed = 0,
    id_column: IdColumn = None,
    label_column: LabelColumn = None,
    quiet: Quiet = False,
) -> None:
    """Evaluate heads under a protocol; print the paper's Table II layout (mean ± std per metric)."""
    from .evaluation import evaluate as run

    result = run(
        store, labels=labels, labels_from_folders=labels_from_folders, mapping=map, protocol=protocol,
        heads=[h.strip() for h in heads.split(",") if h.strip()], features=_features(features), ablation=ablation,
        splits=splits, test_size=test_size, folds=folds, split_files=split or [], split_from_folders=split_from_folders,
        seed=seed, report=report, progress=not quiet, id_column=id_column, label_column=label_column, epochs=epochs,
        lr=lr, batch_size=batch_size, weight_decay=weight_decay, dropout=dropout, hidden=hidden, experts=experts,
        normalize_blocks=normalize_blocks,
    )  # fmt: skip
    result.print()


@app.command()
def score(
    inputs: Annotated[
        list[str] | None, typer.Argument(help="Directories, image files, @list.txt, or - for paths on stdin.")
    ] = None,
    out: Annotated[
        str, typer.Option("--out", "-o", help="FILE.parquet|.csv|.jsonl, - for stdout, or DIR/ for resumable shards.")
    ] = "-",
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model bundle directory (default: the packaged polarity model).")
    ] = None,
    features: Annotated[
        str | None, typer.Option("--features", help="Score an existing feature store instead of images.")
    ] = None,
    weights: Annotated[
        list[str] | None,
        typer.Option(
            "--weights", help="Backbone weights file (or KEY=FILE); default: $IMGSENT_WEIGHTS, cache, download."
        ),
    ] = None,
    format: Annotated[
        str | None,
        typer.Option("--format", help="parquet, csv or jsonl (default: from the extension; jsonl on stdout)."),
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="Two-class models: predict positive when p_positive >= this (default: argmax).")
    ] = None,
    keep_features: Annotated[
        str | None, typer.Option("--keep-features", help="Also write the computed features to this store.")
    ] = None,
    device: Device = "auto",
    precision: ScorePrecision = "auto",
    batch_size: BatchSize = 64,
    workers: Workers = None,
    shard: Shard = None,
    overwrite: Overwrite = False,
    rows_per_shard: RowsPerShard = 10_000,
    max_pixels: MaxPixels = 89_478_485,
    null: Null = False,
    hidden: Hidden = False,
    compile: Compile = False,
    engine: Engine = "local",
    ray_address: RayAddress = None,
    ray_workers: RayWorkers = None,
    gpus_per_worker: GpusPerWorker = 0.0,
    quiet: Quiet = False,
) -> None:
    """Score the sentiment of images (or of a feature store): one row per image.

    With no --model, the packaged default polarity model is used (a head trained on Twitter I over
    MobileNetV2 features); see `imgsent models` for where its backbone weights come from offline.
    """
    from .scoring import score as run

    summary = run(
        inputs or [], out, model=model, features=features, weights=weights or [], fmt=format, threshold=threshold,
        device=device, precision=precision, batch_size=batch_size, workers=workers, shard=shard, overwrite=overwrite,
        rows_per_shard=rows_per_shard, max_pixels=max_pixels, keep_features=keep_features, null=null,
        include_hidden=hidden, compile=compile, progress=not quiet, engine=engine, ray_address=ray_address,
        ray_workers=ray_workers, gpus_per_worker=gpus_per_worker,
    )  # fmt: skip
    if not quiet:
        summary.print("imgsent score")


@app.command()
def models() -> None:
    """Where the default model and its backbone weights live, and how to use local weights offline."""
    from .scoring import default_model_path, resolve_model
    from .weights import WEIGHTS_ENV, cache_dir

    m = resolve_model(None)
    card = m.training.get("card", {})
    lines = [
        f"default model: {default_model_path()}",
        f"  head: {m.config.label}, classes: {', '.join(m.classes)}, features: {', '.join(k for k, _ in m.blocks)}",
    ]
    if card:
        lines += [f"  {k}: {v}" for k, v in card.items()]
    lines += [
        "backbone weights for the default model are looked up in this order:",
        f"  1. --weights FILE, or ${WEIGHTS_ENV}=FILE (float mobilenet_v2 weights, .safetensors or .pth)",
        f"  2. imgsent's cache: {cache_dir() / 'weights'} (set $IMGSENT_HOME to move it)",
        "  3. download torchvision's official quantized MobileNetV2 (IMAGENET1K_QNNPACK_V1) through torchvision,",
        "     convert it to float32 and cache it (needs internet once)",
        "offline: copy the converted file (mobilenet_v2.IMAGENET1K_QNNPACK_V1.float32.safetensors) into the cache,",
        f"  or pass --weights / set ${WEIGHTS_ENV}. Weights that do not match the model are refused.",
    ]
    typer.echo("\n".join(lines))


@app.command(name="backbones")
def list_backbones() -> None:
    """List backbone presets and the spec syntax."""
    from rich.console import Console
    from rich.table import Table

    from .backbones import describe_presets

    t = Table(title="Presets (use with --backbones NAME)")
    t.add_column("preset")
    t.add_column("backbones")
    t.add_column("what it is / needs")
    for name, specs, desc in describe_presets():
        t.add_row(name, specs, desc)
    console = Console()
    console.print(t)
    console.print(
        "Any backbone: timm:NAME[.TAG], torchvision:NAME[.WEIGHTS_TAG], torchscript:PATH; add :probs for class "
        "probabilities, @FILE for local weights (.safetensors or .pth). Pretrained weights download on first use "
        "(timm: Hugging Face cache, torchvision: torch hub cache); offline, give @FILE."
    )


def main() -> None:
    """Entry point: one clear line and exit code 2 for user errors, never a traceback."""
    import os
    import warnings

    if not os.environ.get("IMGSENT_DEBUG"):  # torch's deprecation chatter is not the user's business
        for module in ("torch", "torchvision", "timm"):
            warnings.filterwarnings("ignore", category=UserWarning, module=module)
            warnings.filterwarnings("ignore", category=FutureWarning, module=module)
    try:
        app()
    except ImgsentError as exc:
        typer.echo(f"imgsent: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("imgsent: interrupted; rerun the same command to resume", err=True)
        sys.exit(130)
    except BrokenPipeError:
        _quiet_broken_pipe()


def _quiet_broken_pipe() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    sys.exit(0)
