"""Datasets and prompt formats (multi-step `text..textN`, PaddleNLP `src/tgt`, `messages`)."""
