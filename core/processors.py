"""Qwen2-VL processors (the image-and-text input of Qwen2.5-VL, which Qwen-Image-Edit encodes its instructions with),
built and saved without torchvision.

transformers' `Qwen2VLProcessor.from_pretrained` also builds a video processor, whose class needs torchvision, and its
constructor checks every sub-processor's class against registries that need it too. Image editing never reads
video, so the processor is built here from its image processor (`Qwen2VLImageProcessorPil`, transformers' PIL
backend of `Qwen2VLImageProcessor`, read from the folder's `preprocessor_config.json` or `processor_config.json`) and
its tokenizer, with no video processor. Such a processor saves itself (a pipeline's `save_pretrained`) without a
video processor's config; the released pipelines' `processor/` folders hold one besides.
"""

from __future__ import annotations

from unittest import mock

from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin


def qwen_vl_processor(image_processor: Qwen2VLImageProcessorPil, tokenizer) -> Qwen2VLProcessor:
    """A `Qwen2VLProcessor` of `image_processor` and `tokenizer`, without a video processor."""
    check = ProcessorMixin.check_argument_for_proper_class

    def check_given(self, name, argument):  # the absent video processor is not checked against torchvision's classes
        return None if argument is None else check(self, name, argument)

    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", check_given):
        processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                     chat_template=getattr(tokenizer, "chat_template", None))  # fmt: skip
    processor.get_attributes = lambda: ["image_processor", "tokenizer"]  # what `save_pretrained` writes
    return processor


def load_qwen_vl_processor(model: str, subfolder: str, tokenizer_class: type) -> Qwen2VLProcessor:
    """The processor saved in `subfolder` of `model` (a pipeline folder or Hub id), its tokenizer of
    `tokenizer_class`."""
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(model, subfolder=subfolder)
    return qwen_vl_processor(image_processor, tokenizer_class.from_pretrained(model, subfolder=subfolder))
