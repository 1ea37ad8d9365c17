"""Pure functions over weights (state dicts) and safetensors I/O."""

from weightlab.weights.io import atomic_path, load_tensors, save_tensors, write_text_atomic

__all__ = ["atomic_path", "load_tensors", "save_tensors", "write_text_atomic"]
