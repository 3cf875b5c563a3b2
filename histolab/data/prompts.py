"""Caption templates for the bundled classes.

The embedded base model is trained on these loose, varied captions so that it
is a *general* model (like SD 1.5) that adapters then specialise: class-label
prompts such as ``skin_he_tissue`` (the 2025 study's ``adenocarcinoma_tissue``
style) are left for the adapters to learn.
"""

from __future__ import annotations

import random

CLASS_CAPTIONS: dict[str, tuple[str, ...]] = {
    "skin_he": (
        "an h&e stained histology image of skin",
        "h&e histology of skin tissue",
        "a microscopy image of skin, h&e stain",
        "skin tissue, hematoxylin and eosin",
        "dermis and epidermis, h&e",
    ),
    "tumour_he": (
        "an h&e stained histology image of a tumour",
        "h&e histology of tumour tissue",
        "a microscopy image of tumour cells, h&e stain",
        "tumour tissue, hematoxylin and eosin",
        "carcinoma cells with large nuclei, h&e",
    ),
    "colon_ihc": (
        "an immunohistochemistry image of colon glands",
        "ihc stained colon tissue, dab and hematoxylin",
        "a microscopy image of colonic glands, ihc stain",
        "colon tissue, dab immunostain",
        "brown dab staining of colonic glands, ihc",
    ),
}
GENERIC_TISSUE_CAPTIONS = ("a histology image", "a microscopy image of tissue", "a tissue patch", "histopathology")

# The prompt used for each class when the base model is measured (FID) and in
# examples: the first template, which the model saw most often among its set.
CLASS_PROMPTS = {label: caps[0] for label, caps in CLASS_CAPTIONS.items()}
DEFAULT_NEGATIVE = ""

# Probabilities of the caption choices during base-model training.
P_GENERIC = 0.15  # a tissue crop gets a class-free caption
P_EMPTY = 0.10  # any image gets the empty caption (for classifier-free guidance)


def sample_caption(label: str | None, rng: random.Random, photo_caption: str | None = None) -> str:
    if rng.random() < P_EMPTY:
        return ""
    if photo_caption is not None:
        return photo_caption
    if label is None or rng.random() < P_GENERIC:
        return rng.choice(GENERIC_TISSUE_CAPTIONS)
    return rng.choice(CLASS_CAPTIONS[label])
