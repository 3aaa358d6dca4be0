"""Process groups, tensor-parallel collectives and layers, RNG and recomputation."""
