"""A second tiny Lynx of other dimensions (tests/random_fixture.py): the config, not the shared fixture's values,
decides how files load and how answers are decoded."""
import pytest
import torch

from conftest import eval_dataset
from configs.schema import config_from_dict
from dataset.batching import Collator, batches_by_media
from dataset.records import read_jsonl
from models.build import build_lynx
from state_files import read_state_file
from models.vision_encoder import resize_pos_embed
from random_fixture import LLM, NUM_FRAMES, VIT, config, write_random_fixture
from reference import reference_greedy


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    root = write_random_fixture(tmp_path_factory.mktemp("other"))
    import os

    cwd = os.getcwd()
    os.chdir(root)  # media paths in the jsonl are relative to the fixture root
    try:
        cfg = config_from_dict(config(root))
        model, tokenizer = build_lynx(cfg, "cpu")
        yield root, cfg, model, tokenizer
    finally:
        os.chdir(cwd)


def test_every_file_tensor_lands_where_it_belongs(other):
    root, cfg, model, _ = other
    state = model.state_dict()
    assert len(model.adapter_layers) == LLM["num_hidden_layers"]  # adapter_freq 1: every layer
    assert state["absolute_frame_pos_embed"].shape == (1, NUM_FRAMES, 1, VIT["embed_dim"])
    for key, value in read_state_file(str(root / "data" / "finetune_lynx.pt"), "checkpoint")["model"].items():
        assert torch.equal(state[key], value), key
    eva = read_state_file(str(root / "data" / "eva_vit_g.pth"), "vit")
    assert len(model.vision_encoder.blocks) == VIT["depth"]
    for key in ("blocks.2.attn.qkv.weight", "blocks.0.attn.q_bias", "blocks.1.mlp.fc1.weight", "cls_token"):
        assert torch.equal(state["vision_encoder." + key], eva[key].float()), key
    torch.testing.assert_close(state["vision_encoder.pos_embed"], resize_pos_embed(eva["pos_embed"], 4))


@pytest.mark.parametrize("kind,batch_size", [("image", 3), ("image", 1), ("video", 3), ("video", 1)])
def test_right_padded_greedy_follows_the_rule(other, kind, batch_size):
    root, cfg, model, tokenizer = other
    cfg.vision_prompt_dict, cfg.batch_size_test = kind, batch_size
    data = "Open_VQA_images_tiny.jsonl" if kind == "image" else "Open_VQA_videos_tiny.jsonl"
    records = read_jsonl(str(root / "data" / data))
    dataset = eval_dataset(records, cfg, tokenizer)
    collate = Collator(tokenizer.pad_id, left_pad=False)
    from configs.decoding import DecodingSettings
    from decoding import HFDecoder

    decoder, settings = HFDecoder(model.LLM, tokenizer), DecodingSettings.from_config(cfg)
    for positions in batches_by_media(records, list(range(len(records))), kind, batch_size)[:2]:
        batch = collate([dataset[p] for p in positions])
        if kind == "video":
            assert batch.pixel_values.shape[1] == NUM_FRAMES
        with torch.no_grad():
            embeds, mask = model.fuse(model.encode_media(batch.pixel_values), batch.input_ids, batch.attention_mask)
            ids = decoder.generate(embeds, mask, settings)
        assert [tokenizer.decode(r) for r in ids.tolist()] == reference_greedy(model, tokenizer, cfg, batch)
