"""Per-modality preprocessing: pure functions over records and batches (no Prefect, no Dask).

``PREP_VERSION`` names the preprocessing code. It is stored in every features row and is
part of the feature cache key: bump the matching part (``img``, ``txt``, ``aud``) whenever a
change to these modules changes their output, and every cached feature is recomputed.
"""

from tasks.preprocess.audio import AudioFeatures, preprocess_audio, preprocess_audios, preprocess_signal
from tasks.preprocess.image import ImageFeatures, preprocess_gray, preprocess_image, preprocess_images
from tasks.preprocess.text import STOP_WORDS, preprocess_text, preprocess_texts

PREP_VERSION = "img1-txt1-aud1"

__all__ = [
    "PREP_VERSION", "STOP_WORDS",
    "AudioFeatures", "ImageFeatures",
    "preprocess_audio", "preprocess_audios", "preprocess_signal",
    "preprocess_gray", "preprocess_image", "preprocess_images",
    "preprocess_text", "preprocess_texts",
]
