"""tunelab: fine-tune language models, from raw data to a deployed model."""

__version__ = "0.1.0"
