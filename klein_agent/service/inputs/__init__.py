"""Image inputs, split by job: the argument dispatcher, local paths, data: URIs, URLs, and the one decoder."""

from klein_agent.service.inputs.common import ImageInputError, LoadedImage
from klein_agent.service.inputs.dispatch import load_image_argument
from klein_agent.service.inputs.paths import read_image_file
from klein_agent.service.inputs.policy import (
    ALLOW_URLS_FLAG,
    INPUT_DIR_FLAG,
    InputPolicy,
    default_allowed_dirs,
)

__all__ = [
    "ALLOW_URLS_FLAG",
    "INPUT_DIR_FLAG",
    "ImageInputError",
    "InputPolicy",
    "LoadedImage",
    "default_allowed_dirs",
    "load_image_argument",
    "read_image_file",
]
