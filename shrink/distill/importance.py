"""Which teacher layers a cut student keeps: `--layer-selection importance`.

Each decoder layer adds its output to the residual stream. A layer that barely turns
that stream (its output points where its input did) does little, and removing it costs
little. ShortGPT (Men et al., 2024) measures this as Block Influence; we use its angular
form (Gromov et al., 2024):

    distance(layer) = mean over tokens of arccos(cos(x_in, x_out)) / pi     in [0, 1]

over the non-pad tokens of a sample of the task's prompt + completion texts, and keep
the layers with the largest distance, in their original order.

The first and the last layer are always kept. The first turns token embeddings into the
representation every later layer reads, and the last turns the stream into what the
final norm and the output head expect; both interfaces are copied from the teacher
unchanged, so keeping those two layers keeps the student's embeddings and head working
from step 0 (cut_student's even spacing keeps them for the same reason). Gromov et al.
never drop the final layer either. A layer-local score cannot see this: it measures how
much a layer turns the stream, not that the head reads the last layer's output directly.
"""

from __future__ import annotations

import math

SAMPLE = 128  # task texts read to score layers and channels
BATCH = 8  # texts per forward pass while scoring


def task_batches(tokenizer, examples: list, device: str, max_length: int = 512, n: int = SAMPLE):
    """(ids, attention mask) batches of the sampled prompt + completion (+ EOS) texts."""
    from shrink.distill.batches import collate, encode_examples
    from shrink.tasks import spread

    seqs = encode_examples(tokenizer, spread(examples, n), max_length)
    for i in range(0, len(seqs), BATCH):
        ids, attn, _ = collate(seqs[i : i + BATCH], tokenizer.pad_token_id, device)
        yield ids, attn


def layer_distances(model, batches) -> list[float]:
    """Mean angular distance between each decoder layer's input and output hidden state,
    over the non-pad tokens of `batches` ((ids, attention mask) pairs)."""
    import torch

    from shrink.distill.layers import decoder_layers

    layers = decoder_layers(model)
    sums = [0.0] * len(layers)
    count = 0
    current = {}

    def hook(index):
        def record(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]  # (batch, seq, d)
            x_out = output[0] if isinstance(output, tuple) else output
            valid = current["attn"].bool()  # (batch, seq)
            cos = torch.nn.functional.cosine_similarity(x_in[valid].double(), x_out[valid].double(), dim=-1)
            sums[index] += (torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi).sum().item()
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for ids, attn in batches:
                current["attn"] = attn
                model.base_model(input_ids=ids, attention_mask=attn)
                count += int(attn.sum())
    finally:
        for h in handles:
            h.remove()
    return [s / max(count, 1) for s in sums]


def important_layers(distances: list[float], keep: int) -> list[int]:
    """The first and the last layer, then the `keep - 2` others with the largest
    distance, in their original order (ties go to the earlier layer)."""
    from shrink.distill.layers import check_keep

    total = len(distances)
    check_keep(total, keep)
    if keep == 1:
        return [0]
    middle = sorted(range(1, total - 1), key=lambda i: (-distances[i], i))[: keep - 2]
    return sorted({0, total - 1, *middle})
