"""SAM ViT-B: image encoder, prompt encoder, mask decoder (segment_anything's module names and keys)."""

from .sam import *  # noqa: F401,F403
