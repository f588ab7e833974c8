"""The model's parts against the original's tensors, and the prefix / padding / position rules."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import FIXTURE, build_tiny_lynx, eval_dataset
from dataset.batching import Collator
from dataset.records import read_jsonl
from models.lynx import positions_from_mask
from models.vision_encoder import resize_pos_embed
from reference import reference_greedy


@pytest.fixture(scope="module")
def tiny():
    """(config, model, tokenizer) of the fixture; tests may change the config."""
    return build_tiny_lynx()


def batch_of(cfg, tokenizer, kind, positions):
    """A collated batch of fixture records (as the original batched them) and their expected tensors."""
    data = "Open_VQA_images_tiny.jsonl" if kind == "images" else "Open_VQA_videos_tiny.jsonl"
    cfg.vision_prompt_dict = "image" if kind == "images" else "video"
    records = read_jsonl(f"./data/{data}")
    dataset = eval_dataset(records, cfg, tokenizer)
    batch = Collator(tokenizer.pad_id, cfg.use_left_pad)([dataset[p] for p in positions])
    return records, batch, load_file(FIXTURE / "expected" / f"{kind}_tensors.safetensors")


@pytest.mark.parametrize("kind", ["images", "videos"])
def test_every_stage_matches_the_original_tensors(tiny, kind, in_fixture):
    cfg, model, tokenizer = tiny
    records, batch, expected = batch_of(cfg, tokenizer, kind, [0, 1, 2])
    with torch.no_grad():
        pixels = batch.pixel_values
        flat = pixels.flatten(0, 1) if pixels.ndim == 5 else pixels
        vit = model.vision_encoder.forward_features(flat).view(*pixels.shape[:-3], -1, 64)
        visual = model.encode_media(pixels)
        embeds, mask = model.fuse(visual, batch.input_ids, batch.attention_mask)
        logits = model.LLM(inputs_embeds=embeds, attention_mask=mask,
                           position_ids=positions_from_mask(mask)).logits[:, -1]
    for row, position in enumerate(batch.positions):
        key = f"{records[position].index}/"
        assert torch.equal(pixels[row], expected[key + "pixel_values"])
        assert torch.equal(batch.input_ids[row], expected[key + "input_ids"])
        assert torch.equal(batch.attention_mask[row], expected[key + "attention_mask"])
        torch.testing.assert_close(vit[row], expected[key + "vision_encoder_out"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(visual[row], expected[key + "v2t_feats"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits[row], expected[key + "first_step_logits"], atol=1e-4, rtol=1e-4)


def test_pads_sit_between_the_visual_prefix_and_the_text(tiny):
    _, model, _ = tiny
    visual = torch.randn(2, 32, 64)
    ids = torch.tensor([[5, 6, 7], [1000, 1000, 8]])
    text_mask = torch.tensor([[1, 1, 1], [0, 0, 1]])
    embeds, mask = model.fuse(visual, ids, text_mask)
    assert embeds.shape == (2, 35, 64)
    assert torch.equal(embeds[:, :32], visual)
    assert mask[1].tolist() == [1] * 32 + [0, 0, 1]
    assert torch.equal(embeds[1, 34], model.LLM.get_input_embeddings().weight[8])


def test_positions_count_attended_tokens_and_pads_get_one():
    mask = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 0, 0]])
    assert positions_from_mask(mask).tolist() == [[0, 1, 1, 1, 2, 3], [0, 1, 2, 3, 1, 1]]


def test_pad_rows_are_the_mean_of_the_vocabulary(tiny):
    _, model, _ = tiny
    for weight in (model.LLM.get_input_embeddings().weight, model.LLM.get_output_embeddings().weight):
        assert weight.shape[0] == 1001
        torch.testing.assert_close(weight[1000], weight[:1000].mean(0))


def test_position_grid_resize_is_bicubic_on_patches_and_keeps_cls():
    table = torch.randn(1, 1 + 16, 8, dtype=torch.float16)
    resized = resize_pos_embed(table, 6)
    assert resized.shape == (1, 37, 8) and resized.dtype == torch.float32
    assert torch.equal(resized[:, 0], table[:, 0].float())
    grid = table[:, 1:].float().reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    direct = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(resized[:, 1:], direct.permute(0, 2, 3, 1).reshape(1, 36, 8))


def test_vision_encoder_has_no_final_norm_and_the_configured_depth(tiny):
    _, model, _ = tiny
    vit = model.vision_encoder
    assert isinstance(vit.norm, torch.nn.Identity) and isinstance(vit.fc_norm, torch.nn.Identity)
    assert len(vit.blocks) == 2
    assert vit.blocks[0].mlp.fc1.out_features == 279  # int(64 * 4.3637)
    assert all(torch.count_nonzero(b.attn.k_bias) == 0 for b in vit.blocks)


def generated_ids(model, tokenizer, cfg, batch):
    from configs.decoding import DecodingSettings
    from decoding import HFDecoder

    embeds, mask = model.fuse(model.encode_media(batch.pixel_values), batch.input_ids, batch.attention_mask)
    ids = HFDecoder(model.LLM, tokenizer).generate(embeds, mask, DecodingSettings.from_config(cfg))
    return [tokenizer.decode(row) for row in ids.tolist()]


@pytest.mark.parametrize("left_pad", [True, False])
def test_greedy_generation_equals_the_written_out_rule(tiny, in_fixture, left_pad):
    """Right padding puts pads after the text, so the first new token is read at a pad; the original numbers
    every position by the count of attended tokens, and so must every decoding step here."""
    cfg, model, tokenizer = tiny
    cfg.num_beams, cfg.use_nucleus_sampling, cfg.use_left_pad = 1, False, left_pad
    _, batch, _ = batch_of(cfg, tokenizer, "images", [0, 1, 2])
    padded_rows = (batch.attention_mask[:, 0 if left_pad else -1] == 0).sum()
    assert padded_rows == 2  # two rows really are padded on the tested side
    with torch.no_grad():
        assert generated_ids(model, tokenizer, cfg, batch) == reference_greedy(model, tokenizer, cfg, batch)
    cfg.use_left_pad = True


def test_bfloat16_model_keeps_exact_rotary_frequencies(in_fixture):
    """Only the parameters go to bfloat16: the rotary frequencies stay float32, as transformers loads them."""
    _, model, _ = build_tiny_lynx(dtype="bfloat16")
    rotary = model.LLM.model.rotary_emb
    head_dim = 16
    exact = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    assert rotary.inv_freq.dtype == torch.float32 and torch.equal(rotary.inv_freq, exact)
    params = dict(model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    assert "LLM.model.layers.0.output_adapter.scaling" in params
