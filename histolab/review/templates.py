"""Default aspects, artefact checklist and the built-in study templates.

The six aspects are those of the colonoscopy study (experts scored sets of
generated images 0-10 on each, then ranked the anonymised models); the
artefacts start with the two that the 2025 histology study saw slip past the
metrics (patchy stromal background, nuclear swelling) and add what a
pathologist looks for in synthetic tissue. Every study may replace or edit
them in its config.
"""

from __future__ import annotations

from dataclasses import dataclass

# Aspect types. Both are 0-10 (the scale); they differ in the step.
#   scale:      integers 0..10 (a slider with 11 stops, as in the colonoscopy study)
#   continuous: any real number in [0, 10] (a visual analogue scale)
ASPECT_TYPES = ("scale", "continuous")
# Where an aspect is scored: on one image ("item") or on a panel of images
# from one model ("set"; intra-set diversity only makes sense there).
ASPECT_SCOPES = ("item", "set")
SCALE_MIN, SCALE_MAX = 0, 10


@dataclass(frozen=True)
class AspectDef:
    key: str
    label: str
    description: str
    type: str = "scale"
    scope: str = "item"
    anchors: tuple[tuple[int, str], ...] = ()
    # A required aspect must be scored before a task can be submitted; an optional one may be left unset
    # (then nothing is stored for it: an unset answer is never recorded as a value).
    required: bool = True


@dataclass(frozen=True)
class ArtefactDef:
    key: str
    label: str
    description: str


DEFAULT_ASPECTS: tuple[AspectDef, ...] = (
    AspectDef(
        "clinical_realism",
        "Clinical realism",
        "Could this tissue have come from a real slide, at this stain and magnification?",
        anchors=((0, "clearly artificial"), (5, "plausible with doubts"), (10, "indistinguishable from a real slide")),
    ),
    AspectDef(
        "prompt_faithfulness",
        "Prompt faithfulness",
        "Does the image show the tissue, stain and findings that the prompt describes?",
        anchors=((0, "unrelated to the prompt"), (5, "partly matches"), (10, "exactly what was asked")),
    ),
    AspectDef(
        "abnormality_detectability",
        "Detectability of abnormality",
        "If the prompt names an abnormality, how clearly could a pathologist recognise it here?",
        anchors=((0, "not recognisable"), (5, "recognisable with effort"), (10, "textbook example")),
    ),
    AspectDef(
        "color_contrast",
        "Color and contrast",
        "Are stain colours, intensity and contrast those of a well-prepared slide?",
        anchors=((0, "wrong colours or washed out"), (5, "acceptable"), (10, "like a well-stained slide")),
    ),
    AspectDef(
        "intra_set_diversity",
        "Intra-set diversity",
        "Do the images of this set differ as real fields of the same tissue would, without repeating each other?",
        scope="set",
        anchors=((0, "near copies"), (5, "some variety"), (10, "as varied as real fields")),
    ),
    AspectDef(
        "confidence_of_use",
        "Confidence of use",
        "How confident would you be using such images for teaching or for training a model?",
        anchors=((0, "would not use"), (5, "with reservations"), (10, "without reservation")),
    ),
)

DEFAULT_ARTEFACTS: tuple[ArtefactDef, ...] = (
    ArtefactDef("patchy_stroma", "Patchy stromal background", "Stroma in blotches or patches with no fibre structure"),
    ArtefactDef(
        "nuclear_swelling", "Nuclear swelling", "Enlarged, pale, ballooned nuclei out of proportion to the cells"
    ),
    ArtefactDef("smudged_chromatin", "Smudged chromatin", "Nuclei without chromatin texture, smeared or glassy"),
    ArtefactDef("tiling_seams", "Tiling seams", "Straight seams, grid lines or abrupt changes where tiles would meet"),
    ArtefactDef("colour_cast", "Colour cast", "A hue that no stain gives (e.g. green or blue cast over the field)"),
    ArtefactDef(
        "implausible_glands", "Implausible gland architecture", "Glands with impossible shapes, lumens or layering"
    ),
    ArtefactDef("repeated_structures", "Repeated structures", "The same cell or structure copied within the field"),
    ArtefactDef("pattern_noise", "Checkerboard or pattern noise", "Regular high-frequency texture from the decoder"),
    ArtefactDef("blurred_borders", "Blurred cell borders", "Cell and tissue boundaries melt into each other"),
    ArtefactDef(
        "impossible_cells", "Impossible cells", "Merged nuclei, floating cytoplasm or cells no tissue contains"
    ),
)

DEFAULT_INSTRUCTIONS = (
    "You will see histology images one at a time. Some come from real slides, some may be synthetic; "
    "nothing on screen tells which. Score each aspect from 0 to 10, tick every artefact you see, "
    "and say whether you believe the image is real or synthetic and how sure you are. "
    "You can stop at any time: you will resume where you left off."
)

COLONOSCOPY_INSTRUCTIONS = (
    "For each prompt you first see real reference images. Then you see sets of images from anonymised "
    "models (Model A, Model B, ...): score each set from 0 to 10 on every aspect and tick the artefacts "
    "you see in it. At the end, rank the models from best (1) to worst."
)


@dataclass(frozen=True)
class StudyTemplate:
    name: str
    mode: str  # "item": one image per task; "set": a panel of one model's images per task
    turing_test: bool  # ask "real or synthetic?" with a confidence on every task
    ranking: bool  # a final task ranks the anonymised models (set mode only)
    set_size: int | None
    aspects: tuple[AspectDef, ...]
    artefacts: tuple[ArtefactDef, ...]
    instructions: str


TEMPLATES: dict[str, StudyTemplate] = {
    # Per-image scoring with a visual Turing test: the 2025 histology study's design.
    # Intra-set diversity is a set-level aspect, so item studies leave it out.
    "default": StudyTemplate(
        name="default",
        mode="item",
        turing_test=True,
        ranking=False,
        set_size=None,
        aspects=tuple(a for a in DEFAULT_ASPECTS if a.scope == "item"),
        artefacts=DEFAULT_ARTEFACTS,
        instructions=DEFAULT_INSTRUCTIONS,
    ),
    # The colonoscopy protocol: real references first, then sets of 10 images per
    # prompt from Models A/B/C, 0-10 per aspect, then a global ranking.
    "colonoscopy": StudyTemplate(
        name="colonoscopy",
        mode="set",
        turing_test=False,
        ranking=True,
        set_size=10,
        aspects=DEFAULT_ASPECTS,
        artefacts=DEFAULT_ARTEFACTS,
        instructions=COLONOSCOPY_INSTRUCTIONS,
    ),
}

ASPECTS_BY_KEY = {a.key: a for a in DEFAULT_ASPECTS}
ARTEFACTS_BY_KEY = {a.key: a for a in DEFAULT_ARTEFACTS}
