"""open_source dispatch, split GGUF sets, directories, --model-path override, safetensors directories,
the synthetic MoE writer and the loading progress bar."""

import numpy as np
import pytest
import torch

from ktcore.testing import tiny_model
from ktcore.weights import builtin_source_classes, open_source
from ktcore.weights.gguf_source import GGUFSource
from ktcore.weights.gguf_writer import copy_metadata, write_gguf, write_synthetic_moe_gguf
from ktcore.weights.safetensors_source import SafetensorsSource

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def moe_model():
    return tiny_model("qwen2_moe", seed=3)


@pytest.fixture(scope="module")
def moe_gguf(tmp_path_factory, moe_model):
    path = tmp_path_factory.mktemp("moe") / "qwen2moe.gguf"
    write_gguf(moe_model, path, qtypes="Q8_0")
    return path


def _write_split(source_path, out_dir, max_tensors):
    """Re-write a GGUF as a llama.cpp split set (gguf-py's own splitting)."""
    import gguf

    reader = gguf.GGUFReader(source_path)
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(out_dir / "model.gguf"), arch, split_max_tensors=max_tensors)
    copy_metadata(reader, w)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sorted(out_dir.glob("*.gguf"))


def test_split_set_and_directory_give_the_same_tensors(tmp_path, moe_gguf, moe_model):
    shards = _write_split(moe_gguf, tmp_path, max_tensors=10)
    assert len(shards) > 2 and shards[0].name.endswith("-00001-of-%05d.gguf" % len(shards))
    single = open_source(moe_gguf)
    for path in (shards[0], shards[-1], tmp_path):
        split = open_source(path)
        assert isinstance(split, GGUFSource) and len(split.files) == len(shards)
        assert list(split.names()) == list(single.names())
        for name in ("model.layers.1.mlp.experts.gate_up_proj", "model.norm.weight", "lm_head.weight"):
            assert torch.equal(split.get(name).dequantize(), single.get(name).dequantize())
    assert split.config().to_dict() == single.config().to_dict()


def test_directory_with_one_gguf(tmp_path, moe_gguf):
    import shutil

    shutil.copy(moe_gguf, tmp_path / "only.gguf")
    source = open_source(tmp_path)
    assert isinstance(source, GGUFSource) and source.path.endswith("only.gguf")


def test_model_path_overrides_config_and_tokenizer(tmp_path, moe_gguf):
    source = open_source(moe_gguf)
    config = source.config()
    config.save_pretrained(tmp_path)
    source.tokenizer().save_pretrained(tmp_path)
    config.__class__(**{**config.to_dict(), "max_position_embeddings": 1234}).save_pretrained(tmp_path)
    overridden = open_source(moe_gguf, model_path=tmp_path)
    assert overridden.config().max_position_embeddings == 1234
    assert source.config().max_position_embeddings != 1234
    assert overridden.tokenizer().encode("hello world") == source.tokenizer().encode("hello world")


def test_written_tokenizer_rebuilds_in_transformers(moe_gguf):
    """The writer's byte-level BPE vocabulary is one Transformers' GGUF converter rebuilds, and ours
    equals the one AutoTokenizer builds from the same file."""
    from transformers import AutoTokenizer

    ours = open_source(moe_gguf).tokenizer()
    ref = AutoTokenizer.from_pretrained(str(moe_gguf.parent), gguf_file=moe_gguf.name)
    text = "the quick brown fox; hello world 123 — ünïcode"
    assert ours.encode(text) == ref.encode(text)
    assert ours.decode(ours.encode(text)) == text
    assert len(ours) == len(ref)
    assert max(ours.encode(text)) < 512
    msgs = [{"role": "user", "content": "hi"}]
    assert "<|im_start|>user" in ours.apply_chat_template(msgs, tokenize=False)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "llama"])
def test_safetensors_directory(tmp_path, family):
    model = tiny_model(family, seed=2)
    model.save_pretrained(tmp_path)
    source = open_source(tmp_path)
    assert isinstance(source, SafetensorsSource)
    assert source.missing() == []
    state = model.state_dict()
    assert set(state) <= set(source.names())
    for name, expected in state.items():
        qt = source.get(name)
        assert qt.ggml_type == "F32"
        assert torch.equal(qt.dequantize(), expected), name
    if family != "llama":
        gate = source.get("model.layers.0.mlp.experts.gate_proj")
        assert gate.shape == (8, 256, 256) if family == "mixtral" else gate.shape[0] == 8


def test_safetensors_plain_tensors_are_views(tmp_path):
    model = tiny_model("llama", seed=2)
    model.save_pretrained(tmp_path)
    source = open_source(tmp_path)
    qt = source.get("model.layers.0.mlp.up_proj.weight")
    mapped = next(iter(source._maps.values()))
    assert np.shares_memory(qt.data.numpy(), mapped)


def test_synthetic_moe_streams_to_a_loadable_deepseek2(tmp_path):
    path = write_synthetic_moe_gguf(tmp_path / "syn.gguf", layers=2, experts=8, experts_used=2, hidden=256,
                                    moe_intermediate=256, intermediate=512, heads=2, kv_lora_rank=256, vocab=512)
    source = open_source(path)
    config = source.config()
    assert config.model_type == "deepseek_v2"
    assert (config.n_routed_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (8, 2, 256)
    assert (config.first_k_dense_replace, config.n_shared_experts, config.kv_lora_rank) == (1, 2, 256)
    assert source.missing() == []
    gate = source.get("model.layers.1.mlp.experts.gate_proj")
    assert gate.ggml_type == "Q4_K" and gate.shape == (8, 256, 256)
    values = gate.dequantize()
    assert torch.isfinite(values).all() and values.abs().max() > 0


def test_items_reports_progress(moe_gguf, capsys):
    source = open_source(moe_gguf)
    seen = [name for name, qt in source.items(progress=True)]
    assert seen == list(source.names())
    err = capsys.readouterr().err
    assert "loading weights" in err and "B" in err


def test_builtin_sources_are_exposed_for_the_plugin():
    classes = builtin_source_classes()
    assert GGUFSource in classes and SafetensorsSource in classes
    assert all(hasattr(c, "can_open") for c in classes)


def test_sources_registered_by_a_plugin_are_used(tmp_path, monkeypatch):
    """A third-party source registered through the register_weight_sources hook is asked first."""
    import ktcore.registry
    import ktcore.weights as weights
    from ktcore.hookspecs import hookimpl

    class TextSource:
        def __init__(self, path, model_path=None):
            self.path = str(path)

        @staticmethod
        def can_open(path):
            return str(path).endswith(".txt")

    class Plugin:
        @hookimpl
        def register_weight_sources(self, register):
            register(TextSource)

    registry = ktcore.registry.Registry(entrypoints=False, plugins={"text": Plugin()})
    monkeypatch.setattr(ktcore.registry, "get_registry", lambda: registry)
    notes = tmp_path / "weights.txt"
    notes.write_text("x")
    assert isinstance(weights.open_source(notes), TextSource)
    assert GGUFSource in weights._registered_source_classes()  # the built-in plugin registers its own


def test_deepseek_mla_split_kv_b_is_rebuilt(tmp_path):
    """Newer llama.cpp conversions store kv_b_proj as attn_k_b (transposed) + attn_v_b and state the MLA
    dims in *_mla keys (head_count_kv 1); the source rebuilds kv_b_proj and the config is unchanged."""
    import gguf

    model = tiny_model("deepseek_v2", seed=4)
    c = model.config
    plain = tmp_path / "plain.gguf"
    write_gguf(model, plain, qtypes="F32")
    reader = gguf.GGUFReader(plain)
    split = tmp_path / "split.gguf"
    w = gguf.GGUFWriter(str(split), "deepseek2")
    replaced = {"deepseek2.attention.head_count_kv": 1, "deepseek2.attention.key_length": c.kv_lora_rank + c.qk_rope_head_dim,
                "deepseek2.attention.value_length": c.kv_lora_rank}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        w.add_key_value(key, replaced.get(key, field.contents()), vtype,
                        sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    w.add_key_length_mla(c.qk_nope_head_dim + c.qk_rope_head_dim)
    w.add_value_length_mla(c.v_head_dim)
    for t in reader.tensors:
        if t.name.endswith("attn_kv_b.weight"):
            kv_b = torch.from_numpy(np.array(t.data)).view(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, -1)
            k_b, v_b = torch.split(kv_b, [c.qk_nope_head_dim, c.v_head_dim], dim=1)
            blk = t.name.rsplit(".", 2)[0]
            w.add_tensor(f"{blk}.attn_k_b.weight", k_b.transpose(1, 2).contiguous().numpy())
            w.add_tensor(f"{blk}.attn_v_b.weight", v_b.contiguous().numpy())
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    source = open_source(split)
    assert source.missing() == []
    assert source.config().to_dict() == open_source(plain).config().to_dict()
    for layer in range(c.num_hidden_layers):
        name = f"model.layers.{layer}.self_attn.kv_b_proj.weight"
        assert torch.equal(source.get(name).dequantize(), model.state_dict()[name])
