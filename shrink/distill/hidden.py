"""Hidden-state alignment (`--hidden-weight W`): a cut student's layer i is pulled towards
the output of the teacher layer it was copied from.

    term = mean over kept layers of mean over loss positions of (1 - cos(h_student, h_teacher))

Cosine, not MSE: the residual stream's norm grows with depth and differs by orders of
magnitude between models (Gemma's runs in the hundreds), so an MSE term would be ruled
by the deepest layers and W would mean something else for every teacher. The cosine
distance lies in [0, 2] in every layer of every model, and it is the direction of the
stream that the next layer's RMSNorm passes on. DistilBERT aligns hidden states the
same way.

Positions: the loss positions (those whose next token is a completion token, and with
--loss-on all a prompt token too), not every non-pad token. They are where the student
is trained to match the teacher anyway. With --teacher-prefix the teacher's positions
are the student's shifted by the prefix length, which the two masks already encode
(shrink.distill.batches matches them token by token); at the completion's positions
both models have read the same prompt, at the prompt's own positions the teacher has
read the few-shot examples before it, and the student learns to be there without them.

The hidden states are caught by forward hooks on the decoder layers during the forward
passes training already makes, so nothing else in the loop changes. The teacher must
then run every batch: the precomputed teacher outputs hold logits only.

`--hidden-targets 0,1,3,4,6,8` pairs student layer i with another teacher layer than the
one it was copied from (TinyBERT's layer mapping), say deeper ones, so that a cut of the
first layers learns what the teacher's later layers hold; '-' leaves a layer unpaired.
"""

from __future__ import annotations

from shrink.errors import ShrinkError


def parse_targets(text: str, student_layers: int, teacher_layers: int) -> list[int | None]:
    """--hidden-targets: one teacher layer index (or '-', none) per student layer."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != student_layers:
        raise ShrinkError(f"--hidden-targets {text!r}: {len(parts)} entries for a student of {student_layers} layers "
                          "(one teacher layer, or '-', per student layer)")
    targets: list[int | None] = []
    for p in parts:
        if p == "-":
            targets.append(None)
        elif p.isdigit() and int(p) < teacher_layers:
            targets.append(int(p))
        else:
            raise ShrinkError(f"--hidden-targets {text!r}: {p!r} is not a teacher layer (0 to {teacher_layers - 1}) "
                              "or '-'")
    if all(t is None for t in targets):
        raise ShrinkError(f"--hidden-targets {text!r}: no layer is paired; leave --hidden-weight at 0 instead")
    return targets


class HiddenAlignment:
    """Forward hooks on the student's decoder layers and on the teacher layers they came
    from (`pairs[i]`: the teacher layer of student layer i, or None: not aligned); `loss`
    reads the latest forward pass of each. `channels`: for a student of a narrower hidden size
    (shrink.distill.hidden_width), the teacher channel each of its channels came from:
    the teacher's hidden states are compared on those."""

    def __init__(self, student, teacher, pairs: list[int | None], channels: list[int] | None = None):
        from shrink.distill.layers import decoder_layers

        self.pairs = [(i, j) for i, j in enumerate(pairs) if j is not None]
        self.channels = channels
        self.student_out: dict[int, object] = {}
        self.teacher_out: dict[int, object] = {}
        s_layers, t_layers = decoder_layers(student), decoder_layers(teacher)
        self._handles = [s_layers[i].register_forward_hook(self._keep(self.student_out, i)) for i, _ in self.pairs]
        self._handles += [t_layers[j].register_forward_hook(self._keep(self.teacher_out, j))
                          for j in {j for _, j in self.pairs}]

    @staticmethod
    def _keep(store: dict, index: int):
        def hook(module, args, output):
            store[index] = output[0] if isinstance(output, tuple) else output  # (batch, seq, d)
        return hook

    def loss(self, student_mask, teacher_mask):
        """The alignment term for the last forward passes, whose loss positions are
        `student_mask` and `teacher_mask` (batch, seq). A teacher run with a shared-prefix
        cache only computed its last positions; the masks are cut to match."""
        import torch

        terms = []
        for i, j in self.pairs:
            s, t = self.student_out[i], self.teacher_out[j]
            s_sel = s[student_mask[:, student_mask.shape[1] - s.shape[1]:]].float()  # (n, d)
            t_sel = t[teacher_mask[:, teacher_mask.shape[1] - t.shape[1]:]].float()  # (n, d)
            if self.channels is not None:
                t_sel = t_sel[:, self.channels]  # (n, the student's d)
            terms.append(1 - torch.nn.functional.cosine_similarity(s_sel, t_sel, dim=-1).mean())
        return torch.stack(terms).mean()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self.student_out.clear()
        self.teacher_out.clear()
