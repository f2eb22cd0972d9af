"""Greedy generation in left-padded batches, and Rouge-L of it against reference responses
(evaluate's prompt/response metric)."""

from __future__ import annotations

import numpy as np
import torch


def prompt_end(loss_mask: np.ndarray) -> int:
    """Length of the prompt: the positions up to the first whose next token is a target."""
    return int(np.argmax(loss_mask)) + 1 if loss_mask.any() else len(loss_mask)


def cut_after_eos(ids: list[int], eos: set[int]) -> list[int]:
    """What one-at-a-time generate returns: up to the first EOS, included (a batch pads after it)."""
    end = next((i + 1 for i, token in enumerate(ids) if token in eos), len(ids))
    return ids[:end]


@torch.no_grad()
def greedy_continuations(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int,
                         batch_size: int) -> list[list[int]]:
    """Greedy continuation of each prompt, ``batch_size`` prompts per left-padded ``generate``:
    equal to one prompt at a time up to ties (the padding is masked out of attention)."""
    eos_id = model.generation_config.eos_token_id
    eos = set(eos_id if isinstance(eos_id, list) else [] if eos_id is None else [eos_id])
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids_BL = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask_BL = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, prompt in enumerate(chunk):
            ids_BL[row, width - len(prompt):] = torch.as_tensor(prompt)
            mask_BL[row, width - len(prompt):] = 1
        gen = model.generate(ids_BL.to(model.device), attention_mask=mask_BL.to(model.device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
        out.extend(cut_after_eos(row, eos) for row in gen[:, width:].tolist())
    return out


def rouge_l(model, tokenizer, ds, n: int, max_new_tokens: int, batch_size: int = 8) -> float:
    """Mean Rouge-L F1 of greedy generations from the prompt part against the reference response."""
    from rouge_score import rouge_scorer

    rows = list(ds.select(range(min(n, len(ds)))))
    if not rows:
        return float("nan")
    ends = [prompt_end(np.asarray(row["loss_mask"])) for row in rows]
    prompts = [np.asarray(row["input_ids"])[:end].tolist() for row, end in zip(rows, ends)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    generated = greedy_continuations(model, prompts, max_new_tokens, pad_id, batch_size)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = []
    for row, end, gen in zip(rows, ends, generated):
        ref = tokenizer.decode(np.asarray(row["input_ids"])[end:], skip_special_tokens=True)
        scores.append(scorer.score(ref, tokenizer.decode(gen, skip_special_tokens=True))["rougeL"].fmeasure)
    return float(np.mean(scores))
