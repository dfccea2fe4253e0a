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
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", help="Images per batch.")]
Workers = Annotated[int | None, typer.Option(help="Decoding processes (default: cores - 1; 0 = in-process).")]
Shard = Annotated[str | None, typer.Option(help="Process only part I of N of the inputs (I/N), for job arrays.")]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing output made with other settings.")]
MaxPixels = Annotated[int, typer.Option("--max-pixels", help="Refuse images with more pixels (bomb guard).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the backbones (slow start, faster long runs).")]
RowsPerShard = Annotated[int, typer.Option("--rows-per-shard", help="Rows per Parquet shard (resume granularity).")]


def _fail(message: str) -> None:
    typer.echo(f"imgsent: error: {message}", err=True)
    raise typer.Exit(2)


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
    quiet: Quiet = False,
) -> None:
    """Extract backbone features of images into a Parquet feature store."""
    from .extraction import extract as run

    summary = run(
        inputs, out, backbones=backbones, random_weights=random_weights, device=device, precision=precision,
        batch_size=batch_size, workers=workers, tta=tta, dtype=dtype, shard=shard, overwrite=overwrite,
        rows_per_shard=rows_per_shard, max_pixels=max_pixels, null=null, include_hidden=hidden,
        compile=compile, progress=not quiet,
    )  # fmt: skip
    if not quiet:
        summary.print("imgsent extract")


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
