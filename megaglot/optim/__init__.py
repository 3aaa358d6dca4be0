"""Data-parallel gradient buffers, mixed-precision (distributed) AdamW, loss scaling, LR schedule."""
