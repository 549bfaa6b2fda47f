"""`--width-scores fisher`: rank MLP channels and attention heads by what the teacher's
answer needs, not by how loud they are.

Minitron's scores (shrink.distill.width.activation_scores) keep the channels with the
largest mean activation. A task-specific student needs the channels its answer depends
on, which may be quiet ones. Kwon et al. (2022, "A Fast Post-Training Pruning Framework
for Transformers") score a structure by the Fisher information of a mask variable m on
it: the structure's output is multiplied by m (1 in the model as it is), and

    fisher(c) = sum over examples of (d log p(completion | prompt) / d m_c)^2

where d/d m_c = sum over the example's positions of g_c * a_c, a_c being the
structure's output and g_c the gradient of the log-likelihood with respect to it. For
an MLP channel a_c is its entry of down_proj's input; for an attention head, its slice
of o_proj's input (summed over the head's values). A structure whose removal would not
move the answer's likelihood on any example scores 0, however large its activations.

The scores come from the whole teacher reading the student's prompts (no few-shot
prefix: the student will not have one) and the training completions: the student's layer
i is the teacher's layer keep[i], so the teacher's channel scores are the student's. The
layers after the cut still read what the kept layers write; the score asks which of the
kept layers' channels the teacher's own answer relies on. No weight gradient is
computed: the weights are frozen while it runs, and the embedding's output is made the
graph's only leaf.
"""

from __future__ import annotations

from shrink.distill.importance import BATCH, SAMPLE


def fisher_scores(teacher, keep: list[int], tokenizer, examples: list, max_length: int = 512,
                  n: int = SAMPLE) -> list[dict]:
    """Per student layer (the teacher's layer keep[i]): {"ffn": (intermediate,), "heads":
    (heads,)} float64 Fisher scores of a mask on each MLP channel and attention query head,
    over `n` training examples spread through `examples`."""
    import torch

    from shrink.console import progress
    from shrink.distill.batches import collate, encode_examples
    from shrink.distill.layers import decoder_layers
    from shrink.distill.width import check_layout, widths_of
    from shrink.logits import head_logits
    from shrink.tasks import spread

    check_layout(teacher)
    w = widths_of(teacher)
    layers = decoder_layers(teacher)
    device = next(teacher.parameters()).device
    seqs = encode_examples(tokenizer, spread(examples, n), max_length)
    sums = [{"ffn": torch.zeros(w.intermediate, dtype=torch.float64),
             "heads": torch.zeros(w.heads, dtype=torch.float64)} for _ in keep]
    current = {}

    def capture(slot, name):
        def record(module, args):
            a = args[0]
            if a.requires_grad:  # the backward pass hands its gradient to `accumulate`
                a.register_hook(accumulate(slot, name, a.detach()))
        return record

    def accumulate(slot, name, a):
        def on_grad(g):
            valid = current["attn"].unsqueeze(-1)  # (batch, seq, 1)
            # (batch, width): d loglik / d mask, one row per example; summed in float32 (a bf16 teacher's too)
            per_example = (g.float() * a.float() * valid).sum(1).double()
            if name == "heads":
                per_example = per_example.view(per_example.shape[0], w.heads, w.head_dim).sum(-1)
            sums[slot][name] += per_example.pow(2).sum(0).cpu()
        return on_grad

    def as_leaf(module, args, output):
        return output.detach().requires_grad_(True)  # the graph starts here: no weight gradients

    handles = [teacher.get_input_embeddings().register_forward_hook(as_leaf)]
    for slot, index in enumerate(keep):
        layer = layers[index]
        handles.append(layer.get_submodule("mlp.down_proj").register_forward_pre_hook(capture(slot, "ffn")))
        handles.append(layer.get_submodule("self_attn.o_proj").register_forward_pre_hook(capture(slot, "heads")))
    was_training = teacher.training
    teacher.eval()
    trainable = [p for p in teacher.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)  # the backward pass then computes activation gradients only
    try:
        with torch.enable_grad(), progress("ex") as bar:
            task = bar.add_task("Fisher scores (teacher forward + backward)", total=len(seqs))
            for i in range(0, len(seqs), BATCH):
                chunk = seqs[i : i + BATCH]
                ids, attn, mask = collate(chunk, tokenizer.pad_token_id, device)
                current["attn"] = attn
                hidden = teacher.base_model(input_ids=ids, attention_mask=attn).last_hidden_state
                logits = head_logits(teacher, hidden[mask]).float()  # (positions, vocab)
                targets = ids[:, 1:][mask[:, :-1]]  # position p predicts token p + 1
                loglik = -torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
                loglik.backward()  # each example's gradient stays in its own rows
                bar.advance(task, len(chunk))
    finally:
        for h in handles:
            h.remove()
        teacher.train(was_training)
        for p in trainable:
            p.requires_grad_(True)
    return [{"ffn": s["ffn"] / len(seqs), "heads": s["heads"] / len(seqs)} for s in sums]
