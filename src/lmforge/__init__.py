"""lmforge: a language model's whole life with the Hugging Face stack, driven by YAML recipes."""

__version__ = "0.1.0"
