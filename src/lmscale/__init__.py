"""lmscale: recurrent-state language models against Transformers, measured reproducibly."""

__version__ = "0.1.0"
