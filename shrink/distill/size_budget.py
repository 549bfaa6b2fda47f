"""Size-budgeted students: `--max-size-mb N [--quant Q] [--embedding-type E]` or `--for-target NAME`.

The run chooses the student's layers and hidden size so that its GGUF export at the
budget's type fits N MB (10^6 bytes), from the exact byte cost of every tensor
(shrink.quantize.gguf_size: the type llama.cpp's quantizer gives it, and that type's
bytes) plus the file's key-values (shrink.export.gguf_layout: measured by letting the
converter write them for the teacher, the vocabulary cut to the rows the student keeps
under --prune-vocab). A device target (`--for-target phone`) gives its max_size_mb and the
first GGUF type of its ladder, the largest one: every rung of `shrink export --target`
then fits too (with the target's `embedding_type`, when it names one). `--embedding-type
E` sizes the file with the token embedding in type E, as `shrink export --embedding-type
E` writes it; hidden sizes whose rows E's blocks do not fit are left out.

Candidates: every layer count from the teacher's down to 1, and every hidden size from
the teacher's down to 256 in multiples of 256 (shrink.distill.hidden_width; only the
given one with --hidden-size/--hidden-ratio; only the teacher's for a family hidden
pruning does not support). --ffn-ratio and --heads-ratio narrow every candidate as they
narrow the student. The rule: the most layers, then the widest hidden size. Minitron
(Muralidharan et al., 2024) found width pruning better than depth pruning at the same
size, and in a small student the embedding matrix, which only a narrower hidden size
makes smaller, is most of the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shrink.errors import ShrinkError

DEFAULT_QUANT = "Q4_K_M"
RULE = "the most layers, then the widest hidden size"


@dataclass(frozen=True)
class Budget:
    limit_bytes: int
    quant: str  # the GGUF type the student is sized for
    imatrix: bool  # the export will quantize with an importance matrix (a target's `imatrix`)
    target: str | None  # the device target it comes from
    origin: str  # the options that set it, for messages
    embedding: str | None = None  # the token embedding's own type (--embedding-type), else llama.cpp's choice


def shipped_gguf(cfg) -> tuple[str, str | None]:
    """(GGUF file type, token embedding type or None) of the file the student is made
    for: the size budget's, else --quant (default Q4_K_M) and --embedding-type."""
    budget = budget_of(cfg)
    if budget is not None:
        return budget.quant, budget.embedding
    quant = cfg.quant or DEFAULT_QUANT
    if cfg.embedding_type is None:
        return quant, None
    from shrink.quantize.gguf_types import embedding_type

    return quant, embedding_type(cfg.embedding_type, quant)


def export_types(model, arch_dir: Path, ftype: str, embedding: str | None = None) -> dict[str, str]:
    """{parameter name: the ggml type its tensor gets in a `ftype` GGUF of `model`} for
    every 2-D weight llama.cpp quantizes (a tied output head is its embedding's)."""
    from shrink.export.gguf_layout import tensor_shapes
    from shrink.quantize.gguf_size import tensor_costs

    text = model.config.get_text_config()
    gqa = text.num_attention_heads // (getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
    costs = tensor_costs(tensor_shapes(model, arch_dir), ftype, text.num_hidden_layers, gqa, embedding=embedding)
    tied = not any(c.name == "output.weight" for c in costs)
    keys = [k for k in model.state_dict() if not (tied and k == "lm_head.weight")]  # tensor_shapes' order
    return {key: c.type for key, c in zip(keys, costs) if c.type != "F32"}


def budget_of(cfg) -> Budget | None:
    """The budget the options ask for, checked (None without --max-size-mb/--for-target)."""
    from shrink.quantize.gguf_size import SIZED, UNQUANTIZED

    if cfg.max_size_mb is None and cfg.for_target is None:
        if cfg.quant is not None and not cfg.qat:
            raise ShrinkError("--quant: only with --max-size-mb or --qat (the GGUF type the student is sized or "
                              "trained for)")
        if cfg.targets_file is not None:
            raise ShrinkError("--targets: only with --for-target")
        if cfg.embedding_type is not None and not cfg.qat:
            raise ShrinkError("--embedding-type: only with --max-size-mb or --qat (the GGUF file the student is "
                              "sized or trained for)")
        return None
    if cfg.max_size_mb is not None and cfg.for_target is not None:
        raise ShrinkError("--max-size-mb and --for-target cannot be used together")
    flag = "--max-size-mb" if cfg.max_size_mb is not None else "--for-target"
    if cfg.layers is not None:
        raise ShrinkError(f"--layers and {flag} cannot be used together: the size budget chooses the layers")
    if cfg.student is not None:
        raise ShrinkError(f"{flag}: not with --student (the student's size is that model's)")
    if cfg.max_size_mb is not None:
        if cfg.max_size_mb <= 0:
            raise ShrinkError(f"--max-size-mb must be positive, got {cfg.max_size_mb}")
        quant = cfg.quant or DEFAULT_QUANT
        origin = f"--max-size-mb {cfg.max_size_mb:g} --quant {quant}"
        embedding = None
        if cfg.embedding_type is not None:
            from shrink.quantize.gguf_types import embedding_type

            embedding = embedding_type(cfg.embedding_type, quant)
            origin += f" --embedding-type {embedding}"
        return Budget(round(cfg.max_size_mb * 1e6), quant, False, None, origin, embedding)
    if cfg.quant is not None:
        raise ShrinkError("--quant: not with --for-target (the target's ladder names the GGUF type)")
    if cfg.embedding_type is not None:
        raise ShrinkError("--embedding-type: not with --for-target (the target's ladder decides the GGUF types)")
    from shrink.targets import DEFAULT_FILE, load_targets

    targets = load_targets(cfg.targets_file)
    name = cfg.for_target
    if name not in targets:
        raise ShrinkError(f"--for-target {name}: no such target in {cfg.targets_file or DEFAULT_FILE} "
                          f"(targets: {', '.join(targets)})")
    target = targets[name]
    rungs = [q for fmt, q in target.ladder() if fmt == "gguf"]
    if not rungs:
        raise ShrinkError(f"--for-target {name}: it is served as {', '.join(target.formats)}, not GGUF; "
                          "a size budget is for GGUF files")
    if "max_size_mb" not in target.constraints:
        raise ShrinkError(f"--for-target {name}: the target sets no max_size_mb to size the student for")
    from shrink.quantize.gguf_types import quant_type

    quant = quant_type(rungs[0]).name
    if quant not in SIZED:
        raise ShrinkError(f"--for-target {name}: its first GGUF type {quant} is not one the size budget models "
                          f"({', '.join(SIZED)})")
    limit = target.constraints["max_size_mb"]
    embedding = target.embedding_type if quant not in UNQUANTIZED else None  # as the export's rung writes it
    return Budget(round(limit * 1e6), quant, target.imatrix, name,
                  f"--for-target {name} (max_size_mb {limit:g}, {quant}"
                  + (f", embedding_type {embedding})" if embedding else ")"), embedding)


class Candidates:
    """The students a budget can choose from: `hiddens` (widest first) and any layer count;
    `size(layers, hidden)` is the GGUF file's bytes at the budget's type, tensor by tensor."""

    def __init__(self, budget: Budget, cfg, teacher, teacher_dir: Path, plan=None):
        from shrink.distill.hidden_width import STEP, target_hidden, unknown_hidden_weights
        from shrink.export.gguf_layout import metadata_bytes

        width = teacher.config.get_text_config().hidden_size
        if cfg.hidden_size is not None or cfg.hidden_ratio is not None:
            self.hiddens = [target_hidden(width, cfg.hidden_size, cfg.hidden_ratio)]
        elif unknown_hidden_weights(teacher):
            self.hiddens = [width]  # a family hidden pruning cannot narrow
        else:
            self.hiddens = [width] + [h for h in range(width // STEP * STEP, STEP - 1, -STEP) if h < width]
        if budget.embedding is not None:  # export refuses rows the type's blocks do not fit
            from shrink.quantize.gguf_types import embedding_fits, embedding_type

            fits = [h for h in self.hiddens if embedding_fits(budget.embedding, h)]
            if not fits:
                what = "--embedding-type" if budget.target is None else f"--for-target {budget.target}: embedding_type"
                embedding_type(budget.embedding, budget.quant, self.hiddens[0], what)  # raises, naming the types that fit
            self.hiddens = fits
        self.budget = budget
        self.rows = len(plan.kept) if plan else teacher.get_input_embeddings().weight.shape[0]
        self.metadata = metadata_bytes(teacher_dir, plan.kept if plan else None)
        self._shapes = {h: _shapes(teacher, teacher_dir, cfg, h, self.rows) for h in self.hiddens}

    def size(self, layers: int, hidden: int):
        """(file bytes, each tensor's TensorCost) of a student of `layers` layers, `hidden` wide."""
        from shrink.quantize.gguf_size import file_bytes, tensor_costs

        outside, per_layer, gqa = self._shapes[hidden]
        tensors = outside + [(f"blk.{i}.{name}", shape) for i in range(layers) for name, shape in per_layer]
        costs = tensor_costs(tensors, self.budget.quant, layers, gqa, self.budget.imatrix, self.budget.embedding)
        return file_bytes(self.metadata, costs), costs


def choose_size(budget: Budget, cfg, teacher, teacher_dir: Path, teacher_layers: int, plan=None) -> tuple[int, int, dict]:
    """(layers, hidden size, the manifest's size_budget record) of the student that fits
    `budget` under RULE; ShrinkError saying the smallest size when none does. `plan`:
    the vocabulary pruning (its kept rows are the student's)."""
    found = Candidates(budget, cfg, teacher, teacher_dir, plan)
    narrowest = found.hiddens[-1]
    for layers in range(teacher_layers, 0, -1):
        if found.size(layers, narrowest)[0] > budget.limit_bytes:
            continue  # no width fits this many layers
        for hidden in found.hiddens:
            total, costs = found.size(layers, hidden)
            if total <= budget.limit_bytes:
                record = {"limit_bytes": budget.limit_bytes, "quant": budget.quant, "imatrix": budget.imatrix,
                          "embedding_type": budget.embedding,
                          "target": budget.target, "rule": RULE, "layers": layers, "hidden_size": hidden,
                          "vocab_rows": found.rows, "metadata_bytes": found.metadata, "predicted_bytes": total,
                          "tensors": [[c.name, c.type, c.bytes] for c in costs]}
                return layers, hidden, record
    smallest = found.size(1, narrowest)[0]
    hint = "" if plan else "; --prune-vocab keeps only the task's tokens"
    raise ShrinkError(f"{budget.origin}: no student fits {budget.limit_bytes / 1e6:.2f} MB: the smallest, 1 layer "
                      f"with hidden size {narrowest} and {found.rows:,} vocabulary rows, is {smallest / 1e6:.2f} MB{hint}")


def _shapes(teacher, teacher_dir: Path, cfg, hidden: int, rows: int):
    """(tensors outside the layers, one layer's tensors named without their blk.N.
    prefix, query heads per key/value head) of a student `hidden` wide with `rows`
    vocabulary rows, widths narrowed as --ffn-ratio/--heads-ratio/--head-dim narrow them: read from
    a one-layer model of that config on the meta device (names and shapes, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from shrink.distill.width import target_widths, widths_of
    from shrink.export.gguf_layout import tensor_shapes

    widths = target_widths(widths_of(teacher), cfg.ffn_ratio, cfg.heads_ratio, cfg.head_dim)
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    text = config.get_text_config()
    text.num_hidden_layers = 1
    if getattr(text, "layer_types", None):
        text.layer_types = text.layer_types[:1]
    text.hidden_size, text.vocab_size, text.head_dim = hidden, rows, widths.head_dim
    text.intermediate_size, text.num_attention_heads, text.num_key_value_heads = widths.intermediate, widths.heads, widths.kv_heads
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = tensor_shapes(model, teacher_dir)
    outside = [(n, s) for n, s in shapes if not n.startswith("blk.")]
    per_layer = [(n.removeprefix("blk.0."), s) for n, s in shapes if n.startswith("blk.0.")]
    return outside, per_layer, widths.heads // widths.kv_heads
