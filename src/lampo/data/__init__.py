"""Datasets and prompt formats (multi-step `text..textN`, PaddleNLP `src/tgt`, `messages`)."""

from lampo.data.formats import DataFormatError, PromptRow, detect_format, parse_rows
from lampo.data.loading import carve_test_split, load_prompt_dataset

__all__ = ["DataFormatError", "PromptRow", "carve_test_split", "detect_format", "load_prompt_dataset", "parse_rows"]
