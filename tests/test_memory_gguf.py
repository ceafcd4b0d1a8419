"""The reader's compact metadata arrays: the same values as gguf's own reader, and a damaged
array is still refused when the file is opened."""

from __future__ import annotations

import struct

import pytest
from gguf import GGUFReader, GGUFValueType

from consortium.errors import ModelFileError
from consortium.model.gguf_file import GGUFModel, _ArrayField, _Reader


def test_fields_match_gguf_reader(tiny_gguf):
    ref, ours = GGUFReader(tiny_gguf, "r"), _Reader(tiny_gguf, "r")
    assert list(ours.fields) == list(ref.fields)
    compact = [k for k, f in ours.fields.items() if isinstance(f, _ArrayField)]
    assert "tokenizer.ggml.tokens" in compact and "tokenizer.ggml.token_type" in compact
    for name, f in ref.fields.items():
        g = ours.fields[name]
        assert (g.offset, g.types, len(g.data)) == (f.offset, f.types, len(f.data)), name
        assert g.contents() == f.contents(), name
        if f.types[0] == GGUFValueType.ARRAY and len(f.data):
            for i in (0, len(f.data) // 2, len(f.data) - 1):
                assert g.contents(i) == f.contents(i), (name, i)
            assert g.contents(slice(1, 9, 3)) == f.contents(slice(1, 9, 3)), name
    assert [(t.name, t.data_offset, t.n_bytes) for t in ours.tensors] == [
        (t.name, t.data_offset, t.n_bytes) for t in ref.tensors
    ]


def _tokens_at(path) -> tuple[int, int]:
    """File offsets of the tokens array's element count and of its first string's length."""
    f = GGUFReader(path, "r").fields["tokenizer.ggml.tokens"]
    count_at = f.offset + 8 + len("tokenizer.ggml.tokens") + 4 + 4
    return count_at, count_at + 8


@pytest.mark.parametrize("where", ["count", "length"])
def test_damaged_string_array_is_refused(tiny_gguf, tmp_path, where):
    data = bytearray(tiny_gguf.read_bytes())
    count_at, length_at = _tokens_at(tiny_gguf)
    assert struct.unpack_from("<Q", data, count_at)[0] == GGUFModel(tiny_gguf).args.vocab_size
    struct.pack_into("<Q", data, count_at if where == "count" else length_at, 1 << 40)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="not a readable GGUF"):
        GGUFModel(bad)


def test_truncated_metadata_is_refused(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    end = GGUFReader(tiny_gguf, "r").data_offset
    bad = tmp_path / "cut.gguf"
    for cut in range(64, end, max(1, end // 25)):
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelFileError):
            GGUFModel(bad)


def test_layers_digest_releases_what_it_hashed(tiny_gguf):
    """Hashing faults a layer range's pages in; they are dropped tensor by tensor, and the digest
    is the one computed without dropping them."""
    g, ref = GGUFModel(tiny_gguf), GGUFModel(tiny_gguf)
    released: list[str] = []
    release = g.release
    g.release = lambda name, rows=None: (released.append(name), release(name, rows))  # type: ignore[method-assign]
    ref.release = lambda name, rows=None: None  # type: ignore[method-assign]
    assert g.layers_digest(1, 3) == ref.layers_digest(1, 3)
    assert released == [n for i in (1, 2) for n in g.layer_names(i)]
