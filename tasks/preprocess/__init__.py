"""Per-modality preprocessing: pure functions over records and batches (no Prefect, no Dask).

``PREP_VERSION`` names the preprocessing code. It is stored in every features row and is
part of the feature cache key: bump the matching part (``img``, ``txt``, ``aud``) whenever a
change to these modules changes their output, and every cached feature is recomputed.
"""

from tasks.preprocess.audio import (
    AUDIO_FUNCTIONALS_VERSION,
    AudioFeatures,
    audio_functionals,
    functionals_size,
    preprocess_audio,
    preprocess_audios,
    preprocess_signal,
)
from tasks.preprocess.errors import ExtractorUnavailable
from tasks.preprocess.image import (
    FACE_DESCRIPTOR_VERSION,
    FACE_FEATURES_VERSION,
    ImageFeatures,
    face_descriptor,
    face_descriptor_size,
    face_features,
    face_features_size,
    preprocess_gray,
    preprocess_image,
    preprocess_images,
)
from tasks.preprocess.text import (
    STOP_WORDS,
    TEXT_FEATURES_VERSION,
    preprocess_text,
    preprocess_texts,
    text_features,
    text_features_size,
)

# img2: a face that is already a crop is not re-detected ("as_given"); the extractors'
# versions live in the FeatureSpec (image/text/audio_extractor) and so in the cache key too.
PREP_VERSION = "img2-txt1-aud2"

__all__ = [
    "PREP_VERSION", "STOP_WORDS",
    "AudioFeatures", "ImageFeatures",
    "preprocess_audio", "preprocess_audios", "preprocess_signal",
    "preprocess_gray", "preprocess_image", "preprocess_images",
    "preprocess_text", "preprocess_texts",
    "AUDIO_FUNCTIONALS_VERSION", "FACE_DESCRIPTOR_VERSION", "FACE_FEATURES_VERSION", "TEXT_FEATURES_VERSION",
    "ExtractorUnavailable",
    "audio_functionals", "face_descriptor", "face_features", "text_features",
    "functionals_size", "face_descriptor_size", "face_features_size", "text_features_size",
]
