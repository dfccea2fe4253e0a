"""Models to score with: the packaged models (``default``, ``lite``, ``mobilenet``), bundle directories, and
the backbones a model's recipe names, with the files they read found by name and hash and their
weights checked against the recipe."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from .backbones import Backbone, BackboneSpec, create_backbone, fingerprints_match, weights_location
from .bundles import (  # noqa: F401  (re-exported: models is where users look)
    DEFAULT_MODEL,
    PACKAGED_MODELS,
    check_model_exists,
    head_version,
    model_name,
    model_path,
    packaged_name,
)
from .compiled import graph_key, graph_path, load_graph
from .decode import Preprocess
from .errors import ImgsentError
from .specs import MODELS_ENV, file_key, file_sha256, map_files, spec_files
from .training import SentimentModel, load_model


def default_model_path() -> str:
    """Where the packaged default polarity model lives."""
    return model_path(None)


def resolve_model(model: str | None) -> SentimentModel:
    """``None`` or a packaged model's name: that model; else a bundle directory."""
    return load_model(check_model_exists(model))


def model_identity(model: SentimentModel, path: str | None) -> tuple[str, str]:
    """(name, version) of a model as score rows record it (:func:`imgsent.bundles.model_name`,
    :func:`imgsent.bundles.head_version`)."""
    arrays = {k: v.detach().contiguous().numpy() for k, v in model.head.state_dict().items()}
    return model_name(path), head_version(arrays, model.calibration)


def packaged_model_named(identity: str) -> SentimentModel | None:
    """The packaged model whose score rows carry the model name ``identity`` (``imgsent-default``...)."""
    for name in PACKAGED_MODELS:
        if identity == f"imgsent-{name}":
            return resolve_model(name)
    return None


# --- the files a recipe reads -----------------------------------------------------------------


@dataclass
class RecipeFile:
    """A local file a backbone's recipe names: where it was (``written``, as in the spec;
    ``recorded``, absolute), its content hash (None for recipes before 0.5), where it is now."""

    key: str
    name: str
    sha256: str | None
    written: str
    recorded: str
    optional: bool  # @FILE weights of a timm / torchvision backbone: else its own resolution serves
    path: str | None = None
    where: str = "not found"


def search_places(model_dir: str | None, models_dirs: Sequence[str] = ()) -> list[tuple[str, str]]:
    """Where a model looks for its files, in order: beside the bundle, ``$IMGSENT_MODELS``,
    each ``--models DIR``; then (not listed here) the path the file had when the model was made."""
    places = [(model_dir, "beside the model")] if model_dir else []
    if os.environ.get(MODELS_ENV):
        places.append((os.environ[MODELS_ENV], f"${MODELS_ENV}"))
    places += [(d, f"--models {d}") for d in models_dirs]
    return places


def recipe_files(recipe: dict) -> list[RecipeFile]:
    """The files ``recipe``'s spec names, with the name and hash recorded for each."""
    text = recipe.get("spec", recipe["key"])
    spec = BackboneSpec.parse(text)
    written = spec_files(text)
    records = recipe.get("files") or [{"name": file_key(p), "sha256": None, "path": p} for p in written]
    if len(records) != len(written):
        raise ImgsentError(
            f"model recipe for {recipe['key']} lists {len(records)} files for {len(written)} in its spec"
        )
    weights = spec.weights if spec.source in ("timm", "torchvision") else None
    return [
        RecipeFile(recipe["key"], r["name"], r.get("sha256"), w, r.get("path", w), optional=w == weights)
        for w, r in zip(written, records)
    ]


def locate(f: RecipeFile, places: list[tuple[str, str]]) -> RecipeFile:
    """``f`` with ``path``/``where`` set: the first place holding a file of that name and hash.
    Only files of the wrong hash: one line naming both hashes."""
    seen, wrong = set(), []
    candidates = [(os.path.join(d, f.name), where) for d, where in places] + [(f.recorded, "its recorded path")]
    for path, where in candidates:
        real = os.path.realpath(path)
        if real in seen or not os.path.isfile(path):
            continue
        seen.add(real)
        digest = file_sha256(path) if f.sha256 else None
        if digest == f.sha256:
            f.path, f.where = path, where
            return f
        wrong.append((path, digest))
    if wrong:
        path, digest = wrong[0]
        raise ImgsentError(
            f"{path} has sha256 {digest}, but this model needs the {f.name} with sha256 {f.sha256} (for {f.key})"
        )
    return f


def model_files(model: SentimentModel, model_dir: str | None, models_dirs: Sequence[str] = ()) -> list[RecipeFile]:
    """Every file the model's backbones read, located (see :func:`search_places`)."""
    places = search_places(model_dir, models_dirs)
    recipes = {r["key"]: r for r in model.recipes}
    return [locate(f, places) for key, _ in model.blocks if key in recipes for f in recipe_files(recipes[key])]


def _weights_for(model: SentimentModel, weights: Sequence[str]) -> dict[str, str]:
    """``--weights FILE`` (one-backbone models) or ``--weights KEY=FILE`` -> {key: file}."""
    keys = [k for k, _ in model.blocks]
    out: dict[str, str] = {}
    for w in weights:
        key, sep, path = w.partition("=")
        if sep and key in keys:
            out[key] = path
        elif len(keys) == 1:
            out[keys[0]] = w
        else:
            raise ImgsentError(
                f"this model has {len(keys)} backbones: give weights as KEY=FILE with KEY one of {', '.join(keys)}"
            )
    return out


def model_backbones(
    model: SentimentModel,
    weights: Sequence[str] = (),
    *,
    int8: bool = False,
    model_dir: str | None = None,
    models_dirs: Sequence[str] = (),
    frozen_batch: int | None = None,
) -> list[Backbone]:
    """Build exactly the backbones the model's recipe names, and check their weights' fingerprints
    (``int8``: official int8 weights where they exist; a backbone whose numerics differ from its
    recipe's, because the run asked for other numerics by name, is not compared).

    ``frozen_batch``: the engine will run CPU graphs frozen for passes of this many images
    (:func:`imgsent.engine.frozen_cpu_batch`); a backbone whose graph a previous run cached is then
    that graph (:func:`compiled_backbone`), and no network is built for it.

    Files the recipe names are found by name and hash (:func:`model_files`): beside the bundle
    ``model_dir``, in ``$IMGSENT_MODELS``, in ``models_dirs``, then at their recorded path. Weights
    of timm / torchvision backbones, in order: ``weights`` (``--weights``), the recipe's file found
    so, then the backbone's own resolution (installed package, imgsent's cache, environment, download).
    """
    given = _weights_for(model, weights)
    recipes = {r["key"]: r for r in model.recipes}
    files = model_files(model, model_dir, models_dirs)
    out = []
    for key, _dim in model.blocks:
        recipe = recipes.get(key)
        if recipe is None:
            raise ImgsentError(f"model recipe has no backbone entry for block {key}")
        cached = compiled_backbone(recipe, frozen_batch) if frozen_batch and key not in given and not int8 else None
        if cached is not None:
            out.append(cached)
            continue
        mine = [f for f in files if f.key == key]
        missing = [f for f in mine if f.path is None and not f.optional]
        if missing:
            f = missing[0]
            where = ", ".join(w for _, w in search_places(model_dir, models_dirs)) or "no folder"
            raise ImgsentError(
                f"this model needs {f.name} for {key} and it is not beside the model, in {where}, nor at "
                f"{f.recorded}: put it in one of them, or pass --models DIR"
            )
        spec = BackboneSpec.parse(recipe.get("spec", key))
        if spec.source in ("timm", "torchvision"):
            path = given.get(key) or next((f.path for f in mine if f.optional and f.path), None)
            spec_str = key + (f"@{path}" if path else "")
        else:
            found = {f.written: f.path for f in mine}
            path, spec_str = None, map_files(recipe.get("spec", key), lambda p, found=found: found.get(p) or p)
        # A model trained on random (seeded, test-only) backbone weights gets them again.
        random_weights = bool(recipe.get("fingerprint", {}).get("random")) and not path
        bb = create_backbone(spec_str, random_weights=random_weights, int8=int8)
        same_numerics = recipe.get("numerics", "fp32") == ("int8" if bb.int8 else "fp32")
        if same_numerics and not fingerprints_match(recipe.get("fingerprint", {}), bb.fingerprint):
            raise ImgsentError(
                f"weights for {key}{' (' + path + ')' if path else ''} are not the ones this model was trained on "
                f"(their probe features differ); point --weights at the right file"
            )
        out.append(bb)
    return out


def compiled_backbone(recipe: dict, batch: int) -> Backbone | None:
    """The backbone of ``recipe`` as the CPU graph a previous run froze for passes of ``batch``
    images, channels_last (:mod:`imgsent.compiled`), or None when none is cached. The engine
    checks it against the recipe's probe features before use."""
    if BackboneSpec.parse(recipe.get("spec", recipe["key"])).source not in ("timm", "torchvision"):
        return None
    key = graph_key(recipe, batch, True)
    graph = load_graph(key)
    if graph is None:
        return None
    return Backbone(
        spec=BackboneSpec.parse(recipe.get("spec", recipe["key"])),
        module=graph,
        preprocess=Preprocess.from_dict(recipe["preprocess"]),
        dim=int(recipe["dim"]),
        fingerprint=recipe["fingerprint"],
        cpu_only=True,
        weights_source=f"compiled graph {graph_path(key)} (weights sha256 {recipe['fingerprint']['sha256'][:12]}...)",
        columns=recipe.get("columns"),
        files=recipe.get("files", []),
        frozen_batch=batch,
    )


def describe_model(model: str | None = None, models_dirs: Sequence[str] = ()) -> str:
    """A model's card as text: what ``imgsent models [MODEL]`` prints, with the files its
    backbones read and where they were found, and where each backbone's weights come from."""
    m = resolve_model(model)
    path = model_path(model)
    name, version = model_identity(m, model)
    lines = [
        f"model: {name} {version} ({path})",
        f"  head: {m.config.label}, classes: {', '.join(m.classes)}",
        f"  backbones: {', '.join(f'{k} ({d}-d)' for k, d in m.blocks)}",
        f"  training: {m.describe_training()}",
    ]
    lines += [f"  {k}: {v}" for k, v in m.training.get("card", {}).items()]
    files = model_files(m, None if packaged_name(model) else path, models_dirs)
    if files:
        lines.append("files its backbones read (found by name and sha256):")
        for f in files:
            lines.append(
                f"  {f.name} for {f.key}: "
                + (f"{f.path} ({f.where})" if f.path else f"not found (recorded at {f.recorded})")
                + (f", sha256 {f.sha256}" if f.sha256 else "")
            )
    lines.append("backbone weights a score would use now:")
    recipes = {r["key"]: r for r in m.recipes}
    for key, _ in m.blocks:
        spec = BackboneSpec.parse(recipes.get(key, {}).get("spec", key))
        found = next((f.path for f in files if f.key == key and f.optional and f.path), None)
        lines.append(f"  {key}: " + (f"{found} (the model's file)" if found else weights_location(spec)))
    return "\n".join(lines)
