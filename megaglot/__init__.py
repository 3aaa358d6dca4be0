"""megaglot: Megatron-style 3D-parallel training of Polyglot-Ko-style GPT-NeoX models."""

__version__ = "0.1.0"
