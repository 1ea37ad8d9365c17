"""Paper key ``rws``: robust weight signatures."""

from weightlab.methods.rws.signatures import (
    Patch,
    QuantizedTensor,
    apply_signatures,
    check_compatible,
    dequantize,
    dequantize_signature,
    extract_signature,
    patch,
    project_out,
    quantize,
    quantize_signature,
    shallow_keys,
    signature_bytes,
    unpatch,
)

__all__ = [
    "Patch",
    "QuantizedTensor",
    "apply_signatures",
    "check_compatible",
    "dequantize",
    "dequantize_signature",
    "extract_signature",
    "patch",
    "project_out",
    "quantize",
    "quantize_signature",
    "shallow_keys",
    "signature_bytes",
    "unpatch",
]
