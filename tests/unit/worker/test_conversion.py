"""GGUF conversion: transformers opens a GGUF three times (tokenizer, config,
weights); during a conversion the three share one parse of it."""

from __future__ import annotations

import gguf
import numpy as np

from services.worker.models import _one_gguf_parse


def tiny_gguf(path):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(100)])
    writer.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_readers_of_one_file_are_shared_during_a_conversion_only(tmp_path):
    path = tiny_gguf(tmp_path / "tiny.gguf")
    original = gguf.GGUFReader
    with _one_gguf_parse():
        from gguf import GGUFReader     # as transformers imports it, inside its loader
        first = GGUFReader(str(path))
        assert GGUFReader(path) is first, "a second read of the file parsed it again"
        assert len(first.fields["tokenizer.ggml.tokens"].data) == 100
        np.testing.assert_array_equal(np.asarray(first.tensors[0].data).reshape(-1),
                                      np.arange(12, dtype=np.float32))
        assert GGUFReader(tmp_path / "tiny.gguf", "c") is not first, "only read-only is shared"
    assert gguf.GGUFReader is original
    assert gguf.GGUFReader(path) is not first
