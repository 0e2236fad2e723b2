"""fisao: Fine-Grained Self-Alignment Optimization for vision-language models."""
__version__ = "0.1.0"
