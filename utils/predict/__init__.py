"""Classifying one's own images: the classifier (:mod:`.classifier`), the image sources
(:mod:`.sources`) and the output file (:mod:`.output`).

::

    from utils.predict import DVTClassifier
"""
from .classifier import DVTClassifier, Prediction

__all__ = ["DVTClassifier", "Prediction"]
