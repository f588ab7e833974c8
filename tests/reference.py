"""Decoding written out the slow, obvious way, to check the model's generate against the original's rule."""
import torch

from models.lynx import positions_from_mask


@torch.no_grad()
def reference_greedy(model, tokenizer, cfg, batch):
    """The original's greedy decoding written out without a KV cache: every step recomputes the whole sequence
    with positions from the mask, takes the last position's logits, bans EOS before min_length and repeated
    n-grams of generated tokens."""
    visual = model.encode_media(batch.pixel_values)
    embeds, mask = model.fuse(visual, batch.input_ids, batch.attention_mask)
    embed = model.LLM.get_input_embeddings()
    rows = [[] for _ in range(len(batch))]
    done = [False] * len(batch)
    n = cfg.no_repeat_ngram_size
    for step in range(cfg.max_new_tokens):
        logits = model.LLM(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        scores = logits[:, -1].log_softmax(-1)
        if step < cfg.min_length - 1:
            scores[:, tokenizer.eos_id] = -float("inf")
        for r, row in enumerate(rows):
            for i in range(len(row) - n + 1 if n else 0):
                if row[i:i + n - 1] == row[len(row) - n + 1:]:
                    scores[r, row[i + n - 1]] = -float("inf")
        next_ids = scores.argmax(-1).tolist()
        for r in range(len(rows)):
            token = tokenizer.pad_id if done[r] else next_ids[r]
            if not done[r]:
                rows[r].append(token)
                done[r] = token == tokenizer.eos_id
            next_ids[r] = token
        if all(done):
            break
        embeds = torch.cat([embeds, embed(torch.tensor(next_ids))[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], dim=1)
    return [tokenizer.decode(row) for row in rows]
