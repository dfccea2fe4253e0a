"""Models to score with: the packaged models (``default``, ``lite``, ``mobilenet``), bundle directories, and
the backbones a model's recipe names, with the files they read found by name and hash and their
weights checked against the recipe."""

from __future__ import annotations

from collections.abc import Sequence

from .backbones import Backbone, BackboneSpec, create_backbone, fingerprints_match
from .bundles import (  # noqa: F401  (re-exported: models is where users look)
    DEFAULT_MODEL,
    PACKAGED_MODELS,
    RecipeFile,
    check_model_exists,
    head_version,
    locate,
    model_files,
    model_name,
    model_path,
    packaged_name,
    recipe_files,
    search_places,
)
from .cards import describe_model  # noqa: F401  (imported from here too)
from .decode import Preprocess
from .errors import ImgsentError
from .graphcache import graph_key, graph_path, load_graph
from .specs import map_files
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
    images, channels_last (:mod:`imgsent.graphcache`), or None when none is cached. The engine
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
        weights_source=f"compiled graph {graph_path(key)} (weights sha256 {recipe['fingerprint']['sha256'][:12]}...)",
        columns=recipe.get("columns"),
        files=recipe.get("files", []),
        frozen_batch=batch,
    )
