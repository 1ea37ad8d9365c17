import pytest


@pytest.mark.parametrize("header", [b"[]", b'{"w": 3}', b'{"w": {"dtype": "F32", "shape": [1]}}'])
def test_malformed_headers_are_format_errors(tmp_path, header):
    import struct

    from weightlab.errors import FormatError
    from weightlab.weights.stream_io import read_header

    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(FormatError, match="bad.safetensors"):
        read_header(path)

