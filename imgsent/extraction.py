"""``extract``: images in, a feature store out (inputs -> decode -> backbones -> engine -> store)."""

from __future__ import annotations

from collections.abc import Sequence

from .features import DTYPES, store_writer
from .inputs import resolve_inputs
from .jobs import build_engine, run_job
from .options import RunOptions, check_choice
from .report import RunSummary


def extract(
    inputs: Sequence[str],
    out: str,
    *,
    backbones: Sequence[str] = ("default",),
    random_weights: bool = False,
    dtype: str = "float32",
    options: RunOptions | None = None,
    stdin=None,
    **overrides,
) -> RunSummary:
    """Extract features of every image named by ``inputs`` into the feature store ``out``.

    ``inputs``: directories, image files, ``@list.txt`` or ``-`` (stdin); see
    :func:`imgsent.inputs.find_images`. ``backbones``: spec strings or presets (see
    :mod:`imgsent.backbones`). ``options``: a :class:`~imgsent.options.RunOptions`; keyword
    ``overrides`` replace its fields (``device="cpu"``, ``batch_size=32``, ``shard="0/4"``,
    ``engine="ray"``...). Re-running on an interrupted store resumes it. Returns a
    :class:`~imgsent.report.RunSummary`. Raises :class:`~imgsent.errors.ImgsentError` for bad
    arguments; bad images become error rows.
    """
    opts = RunOptions.build(options, **overrides)
    check_choice("dtype", dtype, tuple(DTYPES))
    refs = resolve_inputs(inputs, opts, stdin=stdin)
    from .backbones import load_backbones  # (torch, imported by a run that builds backbones only)

    models = load_backbones(backbones, random_weights=random_weights, int8=opts.precision == "int8")
    engine = build_engine(models, opts)
    output = store_writer(out, models, dtype, opts, engine, refs)
    return run_job(engine, refs, [output], opts, "extract", out)
