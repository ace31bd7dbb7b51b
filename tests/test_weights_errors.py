"""Bad weight files: each is a clear WeightError naming the file (and the tensor), never a torch crash."""

import shutil

import numpy as np
import pytest
import torch

from ktcore.testing import tiny_model
from ktcore.weights import MissingTensorError, WeightError, open_source
from ktcore.weights.gguf_source import GGUFSource
from ktcore.weights.gguf_writer import write_gguf

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "qwen3.gguf"
    write_gguf(tiny_model("qwen3", seed=1), path, qtypes="Q8_0")
    return path


def test_wrong_magic(tmp_path, good):
    bad = tmp_path / "bad.gguf"
    data = bytearray(good.read_bytes())
    data[:4] = b"GGML"
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightError, match=r"bad\.gguf.*not a GGUF file.*magic"):
        GGUFSource(bad)


def test_truncated_file_names_the_file_and_tensor(tmp_path, good):
    bad = tmp_path / "cut.gguf"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) - 5000])
    with pytest.raises(WeightError, match=r"cut\.gguf.*(truncated|corrupt)") as info:
        open_source(bad)
    assert not isinstance(info.value, (IndexError, RuntimeError))


def test_truncated_header(tmp_path, good):
    bad = tmp_path / "head.gguf"
    bad.write_bytes(good.read_bytes()[:300])
    with pytest.raises(WeightError, match=r"head\.gguf"):
        open_source(bad)


def test_tiny_file(tmp_path):
    bad = tmp_path / "empty.gguf"
    bad.write_bytes(b"GGUF")
    with pytest.raises(WeightError, match=r"empty\.gguf.*too short"):
        open_source(bad)


def test_unknown_architecture(tmp_path):
    import gguf

    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    source = open_source(path)
    with pytest.raises(WeightError, match=r"mamba\.gguf.*architecture 'mamba' is not supported.*llama"):
        source.config()


def test_missing_tensor(tmp_path, good):
    """A file lacking one layer's tensor: names() leaves it out, missing() lists it, get() names it."""
    import gguf

    reader = gguf.GGUFReader(good)
    path = tmp_path / "missing.gguf"
    w = gguf.GGUFWriter(str(path), "qwen3")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, value, vtype, sub_type=sub)
    for t in reader.tensors:
        if t.name != "blk.1.ffn_up.weight":
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    source = open_source(path)
    name = "model.layers.1.mlp.up_proj.weight"
    assert name not in set(source.names())
    assert source.missing() == [name]
    with pytest.raises(MissingTensorError, match=r"missing\.gguf.*model\.layers\.1\.mlp\.up_proj\.weight.*blk\.1\.ffn_up\.weight"):
        source.get(name)
    with pytest.raises(MissingTensorError, match=r"no tensor 'model\.nope\.weight'"):
        source.get("model.nope.weight")


def test_shape_mismatch_names_both(good, tmp_path):
    """The config (here from --model-path) says one shape, the file holds another."""
    from transformers import Qwen3Config

    source = open_source(good)
    cfg = source.config().to_dict()
    cfg["intermediate_size"] = 768
    model_dir = tmp_path / "hf"
    Qwen3Config(**{k: v for k, v in cfg.items() if k != "model_type"}).save_pretrained(model_dir)
    overridden = open_source(good, model_path=model_dir)
    assert overridden.config().intermediate_size == 768
    with pytest.raises(WeightError, match=r"qwen3\.gguf.*blk\.0\.ffn_up\.weight.*\(512, 256\).*up_proj.*\(768, 256\)"):
        overridden.get("model.layers.0.mlp.up_proj.weight")


def test_unsupported_ggml_type_names_tensor_type_and_file(tmp_path):
    import gguf

    path = tmp_path / "q8k.gguf"
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_block_count(1)
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((4, 292), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    qt = open_source(path).gguf_tensor("blk.0.ffn_up.weight")
    assert qt.ggml_type == "Q8_K" and qt.shape == (4, 256)
    with pytest.raises(WeightError, match=r"blk\.0\.ffn_up\.weight.*q8k\.gguf.*Q8_K.*not supported; nearest supported type: Q8_0"):
        qt.dequantize()


def test_no_such_path_and_unknown_format(tmp_path):
    with pytest.raises(WeightError, match="no such file"):
        open_source(tmp_path / "nothing.gguf")
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(WeightError, match=r"notes\.txt.*no weight source can open"):
        open_source(other)


def test_incomplete_split_set(tmp_path, good):
    shard = tmp_path / "m-00001-of-00002.gguf"
    shutil.copy(good, shard)
    with pytest.raises(WeightError, match=r"incomplete.*m-00002-of-00002\.gguf"):
        open_source(shard)


def test_directory_with_two_models(tmp_path, good):
    shutil.copy(good, tmp_path / "a.gguf")
    shutil.copy(good, tmp_path / "b.gguf")
    with pytest.raises(WeightError, match=r"several GGUF models.*a\.gguf.*b\.gguf"):
        open_source(tmp_path)
