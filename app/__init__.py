"""Kestrel: find, download, plan, quantize and chat with EXL2 language models."""

__version__ = "0.1.0"
APP_NAME = "Kestrel"
