"""GPT-NeoX (Polyglot-Ko) on tensor-parallel layers, split into pipeline chunks."""

from megaglot.model.gpt import GPTChunk, build_model_chunks, layers_of_chunk, masked_mean, parameter_seed

__all__ = ["GPTChunk", "build_model_chunks", "layers_of_chunk", "masked_mean", "parameter_seed"]
