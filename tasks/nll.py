"""Per-sample response negative log-likelihood, the primitive under every score, evaluation and training step.

`l_i` is the mean NLL over the response tokens of sample i (prompt and padding masked). Batched model losses
average over all tokens of the batch, which gives one number per batch and weights long samples more; here
each row is reduced on its own. The LM head is applied only at response positions, in chunks, and in fp32:
full-vocabulary logits for a whole batch (B x T x 49k floats) are mostly prompt and padding.

Out of memory: a batch that does not fit is retried in halves, and later batches keep the smaller size, down
to one sample; a single sample that still does not fit raises OutOfMemoryAtBatchSizeOne naming it. Halving
changes which rows share a padded batch, not any row's value (padding is masked).
"""
from __future__ import annotations

import gc
import logging
import math
from collections import deque
from typing import Callable

import numpy as np

from tasks.tokens import Encoded, collate, length_batches

HEAD_CHUNK = 1024  # response positions projected to the vocabulary at a time
log = logging.getLogger(__name__)


class OutOfMemoryAtBatchSizeOne(RuntimeError):
    """Not even one item fits in memory. Deterministic (the same item fails again), so never retried."""


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, the CPU allocator's RuntimeError, or Python's MemoryError."""
    import torch

    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    message = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in message.lower() or "can't allocate memory" in message)


def _release_memory() -> None:
    import torch

    gc.collect()  # the failed batch's tensors are unreachable once the exception is dropped
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_halving_on_oom(batches: list[list[int]], run: Callable[[list[int]], None],
                       describe: Callable[[list[int]], str]) -> None:
    """Call `run(batch)` for each batch of item indices. A batch that runs out of memory is split in half and
    retried, and every later batch is cut to that size as well, down to one item; an item that fails alone
    raises OutOfMemoryAtBatchSizeOne with `describe([item])` in the message. `run` must store its results
    only once it has succeeded, so a failed attempt leaves nothing half done."""
    pending = deque(batches)
    cap = None  # most items per batch since the last out-of-memory error
    while pending:
        batch = pending.popleft()
        if cap is not None and len(batch) > cap:
            pending.extendleft(reversed([batch[i: i + cap] for i in range(0, len(batch), cap)]))
            continue
        try:
            run(batch)
            continue
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            # only the message leaves this block: the exception's traceback holds the failed batch's tensors
            failure = str(exc)
        _release_memory()
        if len(batch) == 1:
            raise OutOfMemoryAtBatchSizeOne(
                f"out of memory on {describe(batch)} even at batch size 1: lower model.max_seq_len, use "
                f"model.dtype bf16, or free memory on the device ({failure})")
        cap = (len(batch) + 1) // 2
        log.warning("out of memory on a batch of %d; retrying in batches of %d", len(batch), cap)
        pending.extendleft(reversed([batch[i: i + cap] for i in range(0, len(batch), cap)]))


def _decoder_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT keeps LoRA inside
    return base.get_decoder(), base.get_output_embeddings()


def batch_nll(model, input_ids, attention_mask, loss_mask):
    """(sum of response-token NLL, number of response tokens) per row; differentiable."""
    import torch
    import torch.nn.functional as F

    decoder, head = _decoder_and_head(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    # position t predicts token t+1: shift once, here and nowhere else
    targets_mask = loss_mask[:, 1:]
    rows = torch.arange(input_ids.shape[0]).unsqueeze(1).expand_as(targets_mask)[targets_mask]
    states = hidden[:, :-1][targets_mask]
    targets = input_ids[:, 1:][targets_mask]
    token_nll = []
    for start in range(0, states.shape[0], HEAD_CHUNK):
        logits = head(states[start: start + HEAD_CHUNK]).float()
        token_nll.append(F.cross_entropy(logits, targets[start: start + HEAD_CHUNK], reduction="none"))
    token_nll = torch.cat(token_nll) if token_nll else hidden.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    sums = sums.index_add(0, rows.to(sums.device), token_nll)
    return sums, targets_mask.sum(dim=1)


def response_nll(model, encoded: list[Encoded], pad_id: int, batch_tokens: int = 4096, progress=None):
    """Mean response NLL per sample (fp32, NaN when nothing of the response is left) and token counts."""
    import torch

    losses = np.full(len(encoded), math.nan, dtype=np.float32)
    counts = np.zeros(len(encoded), dtype=np.int64)
    scorable = [i for i, e in enumerate(encoded) if e.response_ids]
    device = next(model.parameters()).device

    def score(index: list[int]) -> None:
        input_ids, attention, loss_mask = (t.to(device) for t in collate([encoded[i] for i in index], pad_id))
        sums, n = batch_nll(model, input_ids, attention, loss_mask)
        losses[index] = (sums / n.clamp(min=1)).cpu().numpy()
        counts[index] = n.cpu().numpy()
        if progress is not None:
            progress.update(len(index))

    batches = [[scorable[j] for j in batch] for batch in length_batches([encoded[i].length for i in scorable],
                                                                        batch_tokens)]
    with torch.inference_mode():
        run_halving_on_oom(batches, score, lambda index: f"scoring row {index[0]} of {len(encoded)} "
                                                         f"({encoded[index[0]].length} tokens)")
    return losses, counts
