"""vitprobe: probe pretrained Vision Transformers beyond the [cls] token."""

__version__ = "0.1.0"
