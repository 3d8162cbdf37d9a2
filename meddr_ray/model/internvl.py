"""InternVL in transformers' native format (``InternVLForConditionalGeneration``, the ``-hf`` checkpoints).

Its ``InternVLProcessor`` takes a video processor too, and transformers builds video processors only with
torchvision installed. This project sends images only, so :class:`ImageOnlyInternVLProcessor` is the same
processor without the video part: it loads the image processor, tokenizer, chat template and ``image_seq_length``
of any ``-hf`` InternVL checkpoint, and expands each ``<IMG_CONTEXT>`` placeholder into
``<img>`` + ``<IMG_CONTEXT>`` x (tiles x ``image_seq_length``) + ``</img>`` exactly as the original does.
:func:`load_processor` picks it for InternVL checkpoints and ``AutoProcessor`` for every other one.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import InternVLProcessor

IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
"""The tokenizer's named special tokens ``InternVLProcessor`` reads (as in the ``-hf`` checkpoints' tokenizers)."""

_MODEL_TYPE = "internvl"


class ImageOnlyInternVLProcessor(InternVLProcessor):
    """``InternVLProcessor`` for images (no video processor, hence no torchvision); saved under the original's
    class name, so the checkpoint stays a plain ``-hf`` InternVL one."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length, chat_template=chat_template, **kwargs)

    def to_dict(self):
        out = super().to_dict()
        out["processor_class"] = InternVLProcessor.__name__
        return out


def image_only_processor(image_size: int, tokenizer, image_seq_length: int, chat_template: str):
    """A fresh processor for an offline-built tiny InternVL: ``image_size`` square tiles, up to 12 of them plus a
    thumbnail per image (the ``-hf`` checkpoints' tiling), CLIP normalisation as InternVL."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    image_processor = GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        crop_to_patches=False,  # the processor's own default (True) tiles; the image processor alone does not
        min_patches=1,
        max_patches=12,
    )
    return ImageOnlyInternVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=image_seq_length, chat_template=chat_template
    )


def is_internvl(path: str | Path) -> bool:
    """Whether the checkpoint at ``path`` is a native InternVL (``model_type: internvl`` in its config.json)."""
    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") == _MODEL_TYPE
    except (OSError, ValueError):
        return False


def load_processor(path: str | Path, trust_remote_code: bool = False):
    """The checkpoint's processor: :class:`ImageOnlyInternVLProcessor` for native InternVL, else ``AutoProcessor``."""
    from transformers import AutoProcessor

    if is_internvl(path):
        return ImageOnlyInternVLProcessor.from_pretrained(str(path))
    return AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
