"""Model cards: what ``imgsent models [MODEL]`` prints. Torch-free: the bundle's ``model.json``
and head arrays (:mod:`imgsent.bundles`), the files its backbones read found by name and hash, and
where each backbone's weights would come from now (:mod:`imgsent.shipped`), without loading any
network (0.3 s where importing torch alone takes 2 s)."""

from __future__ import annotations

from collections.abc import Sequence

from .bundles import model_files, model_name, numpy_model, packaged_name
from .shipped import weights_location
from .specs import BackboneSpec


def describe_model(model: str | None = None, models_dirs: Sequence[str] = ()) -> str:
    """A model's card as text: what ``imgsent models [MODEL]`` prints, with the files its
    backbones read and where they were found, and where each backbone's weights come from."""
    m = numpy_model(model)
    path = m.bundle.path
    lines = [
        f"model: {model_name(model)} {m.version()} ({path})",
        f"  head: {m.label}, classes: {', '.join(m.classes)}",
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
