"""Evaluation: feature extractors apart from the metrics, protocols, reports.

* ``extractors``: the FID InceptionV3 (``inception_net``, weights read offline by
  ``inception_weights``) and any pathology ImageEncoder as a feature space.
* ``features``: streamed extraction with float64 running statistics.
* ``metrics``: Fréchet distance, KID, precision/recall, Inception Score, Vendi, nearest neighbours.
* ``evaluate`` / ``runner``: real vs fake in every space, overall and per class, memorisation.
* protocols: ``validation`` (per-epoch FID), ``sweep`` (guidance), ``downstream`` (classifier utility).
* ``report``: JSON, CSV and PNG figures.
"""

from histolab.evaluation.evaluate import EvalConfig
from histolab.evaluation.images import ImageSet, open_image_set, to_rgb8

__all__ = ["EvalConfig", "ImageSet", "open_image_set", "to_rgb8"]
