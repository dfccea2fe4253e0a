"""imgsent: score the sentiment of images in bulk."""

__version__ = "0.1.0"
