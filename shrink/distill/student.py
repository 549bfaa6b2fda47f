"""The student: the teacher with fewer decoder layers (evenly spaced, or chosen by
importance: shrink.distill.importance; as many as a size budget allows:
shrink.distill.size_budget), optionally narrowed (shrink.distill.width,
shrink.distill.hidden_width), or an existing smaller model that reads the teacher's
token ids (--student)."""

from __future__ import annotations

from dataclasses import replace

from shrink.distill.layers import LAYER_KEY, check_keep, model_from_state
from shrink.errors import ModelError


def even_layers(total: int, keep: int) -> list[int]:
    """`keep` evenly spaced layer indices out of `total`, always the first and the last."""
    check_keep(total, keep)
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def first_layers(total: int, keep: int) -> list[int]:
    """The first `keep` layer indices: the teacher's computation up to layer `keep`,
    unbroken (a linear probe on Gemma 3 270M's layer-8 state reads the demo's sentiment
    better than the teacher answers it; bench/RESULTS.md)."""
    check_keep(total, keep)
    return list(range(keep))


def cut_student(teacher, keep: list[int]):
    """A new model built from the teacher's config with only the layers in `keep`,
    their weights copied (so layer-index bookkeeping such as KV-cache slots is right)."""
    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    text_config = config.get_text_config()
    text_config.num_hidden_layers = len(keep)
    if getattr(text_config, "layer_types", None):
        text_config.layer_types = [text_config.layer_types[i] for i in keep]
    new_index = {old: new for new, old in enumerate(keep)}

    state = {}
    for key, tensor in teacher.state_dict().items():
        m = LAYER_KEY.match(key)
        if m is None:
            state[key] = tensor
        elif int(m.group(2)) in new_index:
            state[f"{m.group(1)}{new_index[int(m.group(2))]}{m.group(3)}"] = tensor
    if not any(LAYER_KEY.match(k) for k in teacher.state_dict()):
        raise ModelError(
            f"cannot cut layers from {type(teacher).__name__}: its weights are not under model.layers.N"
        )

    return model_from_state(config, state, "cut")


def build_student(cfg, teacher, tokenizer, examples, teacher_layers: int, device: str, teacher_dir=None, plan=None):
    """The student before vocabulary pruning, on the CPU or `device`: the model in
    `cfg.student`, or the teacher cut to `cfg.layers` layers (`cfg.layer_selection`; with
    --max-size-mb/--for-target, the layers and hidden size shrink.distill.size_budget
    chooses for the vocabulary `plan` keeps), then narrowed when `cfg.ffn_ratio` or
    `cfg.heads_ratio` is below 1 or `cfg.head_dim` is set and to the hidden size asked for
    (shrink.distill.hidden_width). Returns (student, the teacher layer each student layer
    was copied from (None for --student), settings to record in the manifest)."""
    from shrink.console import console
    from shrink.distill.hidden_width import channel_scores, hidden_size_of, prune_hidden, target_hidden
    from shrink.distill.importance import important_layers, layer_distances, task_batches
    from shrink.distill.size_budget import budget_of, choose_size
    from shrink.distill.width import check_widths, prune_width, widths_of
    from shrink.hf import load_causal_lm

    info: dict = {}
    layers, hidden = cfg.layers, None
    budget = budget_of(cfg)
    if budget is not None:
        layers, hidden, info["size_budget"] = choose_size(budget, cfg, teacher, teacher_dir, teacher_layers, plan)
        console.print(f"size budget: {layers} of {teacher_layers} layers, hidden size {hidden}: "
                      f"{info['size_budget']['predicted_bytes'] / 1e6:.2f} MB at {budget.quant}"
                      f"{f' (embedding {budget.embedding})' if budget.embedding else ''}, "
                      f"within {budget.limit_bytes / 1e6:.2f} MB ({budget.origin})")
    if cfg.student is not None:
        student, keep = load_causal_lm(cfg.student), None
    elif cfg.layer_selection == "importance":
        distances = layer_distances(teacher, task_batches(tokenizer, examples, device, cfg.max_length))
        keep = important_layers(distances, layers)
        info["layer_scores"] = [round(d, 6) for d in distances]  # angular distance of every teacher layer
        console.print("layer importance (angular distance): " + " ".join(f"{i}:{d:.3f}" for i, d in enumerate(distances)))
    elif cfg.layer_selection == "first":
        keep = first_layers(teacher_layers, layers)
    else:
        keep = even_layers(teacher_layers, layers)
    if cfg.student is None:
        student = cut_student(teacher, keep)

    if cfg.ffn_ratio < 1.0 or cfg.heads_ratio < 1.0 or cfg.head_dim is not None:
        now = widths_of(student)
        target = check_widths(student, cfg.ffn_ratio, cfg.heads_ratio, cfg.head_dim)  # before the scores' pass, not at save
        # --prune-gradually: the MLP channels go during training (shrink.distill.gradual), the heads now
        cut_to = replace(target, intermediate=now.intermediate) if cfg.prune_gradually else target
        if cut_to != now:
            student = student.to(device).eval()
            scores = width_scores(student, teacher, keep, tokenizer, examples, device, cfg.max_length,
                                  cfg.width_scores, cfg.ffn_refit, target.head_dim != now.head_dim)
            student = prune_width(student, cut_to, scores)
        info["widths"] = {"intermediate_size": [now.intermediate, target.intermediate],
                          "attention_heads": [now.heads, target.heads],
                          "kv_heads": [now.kv_heads, target.kv_heads],
                          "head_dim": [now.head_dim, target.head_dim]}  # [before, after]
        mlp = (f"MLP {now.intermediate} -> {target.intermediate} channels during training (--prune-gradually)"
               if cfg.prune_gradually else f"MLP {now.intermediate} -> {target.intermediate} channels"
               + (" (down projection re-fitted)" if cfg.ffn_refit else ""))
        console.print(f"width pruned ({cfg.width_scores} scores): {mlp}, "
                      f"attention heads {now.heads} -> {target.heads} (key/value {now.kv_heads} -> {target.kv_heads})"
                      + (f", {now.head_dim} -> {target.head_dim} dimensions each" if target.head_dim != now.head_dim else ""))
    width = hidden_size_of(student)
    hidden = hidden or target_hidden(width, cfg.hidden_size, cfg.hidden_ratio)
    if hidden < width:
        student = student.to(device).eval()
        scores = channel_scores(student, task_batches(tokenizer, examples, device, cfg.max_length))
        student, channels = prune_hidden(student, hidden, scores)
        info.setdefault("widths", {})["hidden_size"] = [width, hidden]  # [before, after]
        info["hidden_channels_kept"] = channels  # the teacher's channel each student channel was copied from
        console.print(f"hidden size pruned: {width} -> {hidden} channels")
    inherit_generation(student, teacher)
    return student, keep, info


def width_scores(student, teacher, keep, tokenizer, examples, device: str, max_length: int, method: str,
                 refit: bool, head_dims: bool = False) -> list[dict]:
    """What prune_width ranks the cut `student`'s channels and heads by (`method`, --width-scores):
    its own mean activations (shrink.distill.width), or the Fisher scores of the teacher
    layers `keep` it was cut from (shrink.distill.fisher); with `refit`, the student's Gram
    matrices for --ffn-refit too, and with `head_dims` (--head-dim) its value dimensions'
    activations, which rank them under either method. The student's activation pass runs
    only when one of them needs it."""
    from shrink.distill.fisher import fisher_scores
    from shrink.distill.importance import task_batches
    from shrink.distill.width import activation_scores

    own = None
    if method == "activation" or refit or head_dims:
        own = activation_scores(student, task_batches(tokenizer, examples, device, max_length), gram=refit)
    if method == "activation":
        return own
    fisher = fisher_scores(teacher, keep, tokenizer, examples, max_length)
    return fisher if own is None else [{**s, **f} for s, f in zip(own, fisher)]


def inherit_generation(student, teacher) -> None:
    """The student ends its generations where the teacher does: the teacher's generation
    config (its EOS list: Gemma's <eos> and <end_of_turn>), which a model built from the
    config alone would lose. Its config keeps no `auto_map`: the student is always a
    built-in transformers class, and must never point at custom code."""
    import copy

    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = _savable(copy.deepcopy(teacher.generation_config))
    for config in {id(c): c for c in (student.config, student.config.get_text_config())}.values():
        if getattr(config, "auto_map", None) is not None:
            del config.auto_map


def student_eos(teacher, tokenizer, examples) -> list[int]:
    """The ids that will end the student's generations, before it exists: the teacher's
    EOS list (inherit_generation copies it) and the chat rows' end of turn
    (stop_at_end_of_turn adds it)."""
    eos = _ids(teacher.generation_config.eos_token_id)
    return eos + [i for i in end_of_turn_ids(tokenizer, examples) if i not in eos]


def end_of_turn_ids(tokenizer, examples) -> list[int]:
    """The ids of the tokens that close a turn in the chat rows' template."""
    ends = {ex.end_of_turn for ex in examples if ex.chat}
    ids = [tokenizer.convert_tokens_to_ids(end) for end in ends if end]
    return [i for i in ids if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id]


def stop_at_end_of_turn(student, tokenizer, examples) -> list[int]:
    """A chat student stops where its template closes a turn: the chat rows' end-of-turn
    token (Gemma's <end_of_turn>, ChatML's <|im_end|>) joins its generation config's EOS
    list (which every export's stop ids come from), when the teacher's did not list it.
    Returns the ids added."""
    config = student.generation_config
    eos = _ids(config.eos_token_id)
    added = [i for i in end_of_turn_ids(tokenizer, examples) if i not in eos]
    if added:
        config.eos_token_id = eos + added
    return added


def _ids(eos) -> list[int]:
    return list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])


def keep_end_of_turn(path, eos_token_id) -> None:
    """Write the student's EOS list (with its end of turn) into the generation_config.json
    copied from the teacher, which lists only the teacher's."""
    import json
    from pathlib import Path

    path = Path(path)
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config["eos_token_id"] = eos_token_id
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _savable(generation_config):
    """The generation config, or its token ids alone when transformers would refuse to save
    it (a Hub file may set top_p without do_sample: loading lets it pass, saving does not,
    once an id has been changed, as --prune-vocab does). The teacher's file itself is kept
    as it was (shrink.distill.tokenizer_files)."""
    from transformers import GenerationConfig

    try:
        generation_config.validate(strict=True)
    except ValueError:
        ids = ("bos_token_id", "eos_token_id", "pad_token_id")
        return GenerationConfig(**{k: getattr(generation_config, k) for k in ids
                                   if getattr(generation_config, k, None) is not None})
    return generation_config


def check_student_folder(student_dir, teacher_dir, examples, texts: int = 300) -> None:
    """--student DIR must read the teacher's token ids: the same vocabulary size (the
    logits are compared column by column), the same EOS, and the same ids for the first
    `texts` task texts."""
    import json
    from pathlib import Path

    from shrink.errors import ShrinkError
    from shrink.hf import load_tokenizer

    def vocab_size(folder):
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        return config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")

    why = None
    s_vocab, t_vocab = vocab_size(student_dir), vocab_size(teacher_dir)
    if s_vocab != t_vocab:
        why = f"vocabulary size {s_vocab} against the teacher's {t_vocab}"
    else:
        try:
            s_tok = load_tokenizer(Path(student_dir))
        except (OSError, ValueError) as e:
            raise ShrinkError(f"--student {student_dir}: cannot load its tokenizer ({e})") from None
        t_tok = load_tokenizer(Path(teacher_dir))
        if s_tok.eos_token_id != t_tok.eos_token_id:
            why = f"EOS token id {s_tok.eos_token_id} against the teacher's {t_tok.eos_token_id}"
        for ex in examples[:texts]:
            if why:
                break
            text = ex.prompt + ex.completion
            if s_tok(text, split_special_tokens=True).input_ids != t_tok(text, split_special_tokens=True).input_ids:
                why = f"other token ids for {text[:60]!r}"
    if why:
        raise ShrinkError(f"--student {student_dir} does not share the tokenizer of the teacher {teacher_dir}: {why}")
