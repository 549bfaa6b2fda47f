"""The offline teacher-logit cache: the teacher run once, its top-k next-token log-probs kept.

    shrink teacher-cache --teacher ./teacher --data train.jsonl --top-k 64 --out teacher-cache
    shrink distill --teacher ./teacher --teacher-cache teacher-cache --data train.jsonl ...

Distillation needs the teacher's distribution at every loss position (the positions
`batches.collate` marks and `logits.selected_logits` computes: the completion's, and
with `--loss-on all` the prompt's too, as distill's --loss-on; the manifest records
which). A cache keeps, for each of those positions:

    top_ids       int32 (positions, K)   the K most likely next tokens, most likely first
    top_logprobs  float16 (positions, K) their log-probabilities (log-softmax at T = 1)
    rest_logprob  float32 (positions,)   log of the probability of every other token
                                         together (-inf when K is the vocabulary)

in safetensors files, one per process that built it (`part-RRRRR-of-WWWWW.safetensors`,
each holding a contiguous run of examples: `example_index`, and `offsets` into the
position arrays), with `manifest.json` written last (kind "teacher-cache"). float16 for
the log-probabilities: they are the bulk of the file (K of them per position, against
one rest value), float16 keeps them to 3 significant digits, an error of at most
|log p| / 2048 (0.05% of a top token's probability at log p = -1), below the noise of
bf16 training, and the ids take int32 because vocabularies exceed 65,536. The rest is
one float32 per position: it can be tiny, and it costs nothing.

Training from the cache turns each position back into the dense log-probabilities the
loss takes: the K log-probs at their ids, and the rest spread evenly over the other
V - K ids (each gets rest / (V - K)). That is an approximation of the tail: its total
mass is right, its shape is flat. The loss then applies the temperature to these
log-probs exactly as to logits (softmax(log p / T) is softmax(logits / T), the two
differing by a constant per position), so at T > 1 the flat tail counts for somewhat
more than the true one would (spreading a mass evenly maximises the sum of p^(1/T)).
With K = V nothing is approximated: training from the cache gives the online losses up
to the float16 rounding (tests/test_teacher_cache.py measures it). With --prune-vocab
the ids are mapped to the student's (the plan's id map), ids outside the kept set are
dropped, and the loss's softmax renormalises over the kept set, which is what the online
teacher, read on the kept rows only, does too.

The cache is checked against the run before anything is loaded: the same data (sha256),
the same teacher (config.json, tokenizer files and weight files, all by sha256: see
shrink.distill.input_hashes), the same --teacher-prefix (sha256), the same
--max-length and the same --loss-on; and every example must have as many cached
positions as the run has loss positions.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shrink import artifact
from shrink.distill import distributed, input_hashes
from shrink.errors import ArtifactError, ShrinkError
from shrink.manifest import Manifest

KIND = "teacher-cache"
FORMAT_VERSION = 2  # of the safetensors layout above and the manifest's teacher fingerprint; bump on any change
# 2: the teacher's weight files identified by sha256 (1: by size)
LOGPROB_DTYPE = "float16"
FLOOR = -1e4  # log-prob given to tokens with no mass: exp() is 0, and 0 * FLOOR is no NaN
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json")


@dataclass(frozen=True)
class CacheConfig:
    teacher: Path  # Hugging Face model folder or GGUF file
    data: Path  # task JSONL, the same file distill will train on
    out: Path  # cache folder to write
    top_k: int = 64  # next tokens kept per position
    batch_size: int = 8  # sequences per teacher forward pass
    max_length: int = 512  # as distill's --max-length: tokens per sequence
    teacher_prefix: Path | None = None  # as distill's --teacher-prefix
    loss_on: str = "completion"  # as distill's --loss-on: completion | all
    device: str = "auto"  # auto | cpu | cuda
    force: bool = False


def shard_name(rank: int, world_size: int) -> str:
    return f"part-{rank:05d}-of-{world_size:05d}.safetensors"


def teacher_fingerprint(folder: Path, weights_sha256: dict[str, str]) -> dict[str, Any]:
    """What identifies a teacher: its folder's config.json and tokenizer files by sha256,
    and `weights_sha256` (input_hashes.weights_sha256 of the teacher as given: the
    folder's safetensors files, or the GGUF file)."""
    folder = Path(folder)
    return {
        "config_sha256": artifact.sha256_file(folder / "config.json"),
        "tokenizer_sha256": {n: artifact.sha256_file(folder / n) for n in TOKENIZER_FILES if (folder / n).is_file()},
        "weights_sha256": weights_sha256,
    }


def build_cache(cfg: CacheConfig) -> Manifest | None:
    """Run the teacher over the data and write the cache; returns its manifest (None on
    ranks other than 0 under torchrun: each writes its own shard, rank 0 the manifest)."""
    with distributed.process_group(cfg.device) as ranks:
        manifest = _build(cfg, ranks)
        ranks.barrier()
    return manifest


def _validate(cfg: CacheConfig):
    from shrink.distill.batches import LOSS_ON
    from shrink.hf import check_model_dir
    from shrink.tasks import load_task_for
    from shrink.teacher_gguf import resolve_teacher

    teacher_path = Path(cfg.teacher)
    if teacher_path.is_file() and teacher_path.suffix != ".gguf":
        raise ShrinkError(f"teacher {teacher_path} is a file but not .gguf (expected a model folder or a GGUF file)")
    if not teacher_path.is_file():
        check_model_dir(teacher_path, "teacher")
    if cfg.top_k < 1:
        raise ShrinkError(f"--top-k must be at least 1, got {cfg.top_k}")
    if cfg.batch_size < 1:
        raise ShrinkError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if cfg.max_length < 2:
        raise ShrinkError(f"--max-length must be at least 2, got {cfg.max_length}")
    if cfg.teacher_prefix is not None and not Path(cfg.teacher_prefix).is_file():
        raise ShrinkError(f"--teacher-prefix: no such file {cfg.teacher_prefix}")
    if cfg.loss_on not in LOSS_ON:
        raise ShrinkError(f"--loss-on must be one of {', '.join(LOSS_ON)}, got {cfg.loss_on!r}")
    examples = load_task_for(cfg.data, teacher_path)  # chat rows: the teacher's template, as distill reads them
    artifact.check_output_free(Path(cfg.out), cfg.force)
    return examples, resolve_teacher(teacher_path)


def _build(cfg: CacheConfig, ranks) -> Manifest | None:
    import torch

    from shrink.console import console, spinner
    from shrink.distill.batches import check_aligned, encode_examples, loss_positions
    from shrink.hf import load_causal_lm, load_tokenizer, resolve_device
    from shrink.prefix import PrefixCache, usable_prefix
    from shrink.tasks import with_prefix

    examples, folder = distributed.main_first(ranks, _validate, cfg)
    device = resolve_device(cfg.device)
    with spinner() as sp:
        sp.add_task(f"loading teacher {cfg.teacher}", total=None)
        teacher = load_causal_lm(folder, device, torch.bfloat16 if device == "cuda" else torch.float32)
        tokenizer = load_tokenizer(folder)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    top_k = min(cfg.top_k, vocab)
    if top_k < cfg.top_k:
        console.print(f"--top-k {cfg.top_k} is more than the teacher's {vocab:,} tokens: keeping all {vocab:,}")

    seqs = t_seqs = encode_examples(tokenizer, examples, cfg.max_length)
    if cfg.teacher_prefix:  # the teacher reads the prefix; positions are the student's
        prefix_text = Path(cfg.teacher_prefix).read_text(encoding="utf-8")
        t_seqs = encode_examples(tokenizer, with_prefix(examples, prefix_text), cfg.max_length)
        check_aligned(seqs, t_seqs, cfg.data)
    _, seqs = loss_positions(seqs, t_seqs, cfg.loss_on, cfg.data)  # the teacher's, as distill marks them
    shared = usable_prefix([s.ids for s in seqs], min(s.loss_from for s in seqs) - 1)
    prefix = PrefixCache(teacher, shared, device) if shared else None

    lo, hi = ranks.rank * len(seqs) // ranks.world_size, (ranks.rank + 1) * len(seqs) // ranks.world_size
    started = time.perf_counter()
    tensors = _run_teacher(teacher, seqs, range(lo, hi), top_k, cfg.batch_size, tokenizer.pad_token_id, device, prefix)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    name = shard_name(ranks.rank, ranks.world_size)
    meta = {"format": KIND, "version": str(FORMAT_VERSION), "rank": str(ranks.rank), "world_size": str(ranks.world_size)}

    from safetensors.torch import save_file

    if not ranks.is_main:
        tmp = _shared_path(ranks, None)
        save_file(tensors, str(tmp / name), metadata=meta)
        ranks.barrier()  # every shard written
        return None
    with artifact.staged_folder(Path(cfg.out), cfg.force, "the teacher cache") as tmp:
        _shared_path(ranks, tmp)
        save_file(tensors, str(tmp / name), metadata=meta)
        ranks.barrier()  # every shard written
        seconds = time.perf_counter() - started  # the whole job's teacher pass
        positions = sum(s.positions for s in seqs)
        settings = {
            "teacher": str(cfg.teacher),
            "teacher_folder": str(Path(folder).resolve()),
            "teacher_fingerprint": teacher_fingerprint(folder, input_hashes.weights_sha256(cfg.teacher)),
            "tokenizer": type(tokenizer).__name__,
            "vocab_size": vocab,
            "data": str(cfg.data),
            "data_sha256": artifact.sha256_file(Path(cfg.data)),
            "top_k": top_k,
            "max_length": cfg.max_length,
            "loss_on": cfg.loss_on,
            "teacher_prefix": str(cfg.teacher_prefix) if cfg.teacher_prefix else None,
            "teacher_prefix_sha256": artifact.sha256_file(Path(cfg.teacher_prefix)) if cfg.teacher_prefix else None,
            "logprob_dtype": LOGPROB_DTYPE,
            "format_version": FORMAT_VERSION,
            "shards": [shard_name(r, ranks.world_size) for r in range(ranks.world_size)],
            "examples": len(seqs),
            "positions": positions,
            "device": device,
            "teacher_dtype": str(teacher.dtype).removeprefix("torch."),
            "batch_size": cfg.batch_size,
        }
        tokens = sum(len(s.ids) for s in seqs)  # of every process
        metrics = {"teacher_seconds": round(seconds, 2), "teacher_tokens_per_s": round(tokens / seconds, 1) if seconds else None}
        manifest = artifact.finish(tmp, kind=KIND, format="safetensors", source=Path(cfg.teacher),
                                   settings=settings, metrics=metrics)
    return manifest


def _shared_path(ranks, path: Path | None) -> Path:
    """Rank 0's staging folder, told to every rank (it must be on a filesystem they all
    see: on several nodes, a shared one)."""
    if not ranks.enabled:
        return path
    import torch.distributed as dist

    box = [str(path) if path is not None else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def _run_teacher(teacher, seqs, indices, top_k: int, batch_size: int, pad: int, device: str, prefix) -> dict:
    """The shard's tensors for the examples `indices` (in that order)."""
    import torch

    from shrink.console import progress
    from shrink.distill.batches import collate
    from shrink.logits import selected_logits

    indices = list(indices)
    ids_out, logp_out, rest_out, counts = [], [], [], []
    with progress("ex") as bar, torch.no_grad():
        task = bar.add_task("teacher pass", total=len(indices))
        for i in range(0, len(indices), batch_size):
            part = [seqs[j] for j in indices[i : i + batch_size]]
            ids, attn, mask = collate(part, pad, device)
            logp = selected_logits(teacher, ids, attn, mask, prefix=prefix).float().log_softmax(-1)  # (n, vocab)
            top_logp, top_ids = logp.topk(top_k, dim=-1, sorted=True)  # (n, K)
            if top_k < logp.shape[-1]:
                rest = logp.scatter(1, top_ids, float("-inf")).logsumexp(-1)  # (n,) log of the other ids' mass
            else:
                rest = torch.full((logp.shape[0],), float("-inf"), device=logp.device)
            ids_out.append(top_ids.to(torch.int32).cpu())
            logp_out.append(top_logp.to(torch.float16).cpu())
            rest_out.append(rest.float().cpu())
            counts += [q.positions for q in part]
            bar.advance(task, len(part))
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    empty_ids, empty_logp = torch.zeros((0, top_k), dtype=torch.int32), torch.zeros((0, top_k), dtype=torch.float16)
    return {
        "example_index": torch.tensor(indices, dtype=torch.int64),
        "offsets": offsets,
        "top_ids": torch.cat(ids_out) if ids_out else empty_ids,
        "top_logprobs": torch.cat(logp_out) if logp_out else empty_logp,
        "rest_logprob": torch.cat(rest_out) if rest_out else torch.zeros(0),
    }


# --- reading the cache for training -----------------------------------------------------


def read_cache_manifest(folder: Path) -> Manifest:
    folder = Path(folder)
    if not folder.is_dir():
        raise ShrinkError(f"--teacher-cache: no such folder {folder}")
    manifest = Manifest.read(folder)
    if manifest.kind != KIND:
        raise ArtifactError(f"--teacher-cache: {folder} is a {manifest.kind!r} artifact, not a teacher cache")
    settings = manifest.settings
    if settings.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"--teacher-cache: {folder} has format version {settings.get('format_version')!r}, "
                            f"this shrink reads {FORMAT_VERSION}; rebuild it with shrink teacher-cache")
    missing = [s for s in settings.get("shards", []) if not (folder / s).is_file()]
    if missing or not settings.get("shards"):
        raise ArtifactError(f"--teacher-cache: {folder} is missing {', '.join(missing) or 'its shards'}")
    return manifest


def check_matches(cfg, teacher_folder: Path, inputs: list[dict[str, str]]) -> None:
    """Refuse a cache made for another run: distill's `cfg` (a DistillConfig) and its
    `inputs` (input_hashes.distill_inputs) against the cache's manifest. Called before any
    model is loaded."""
    if getattr(cfg, "teacher_cache", None) is None:
        return
    folder = Path(cfg.teacher_cache)
    s = read_cache_manifest(folder).settings
    rebuild = f"; rebuild it: shrink teacher-cache --teacher {cfg.teacher} --data {cfg.data} --out DIR"
    if getattr(cfg, "hidden_weight", 0):
        raise ShrinkError("--hidden-weight needs the teacher's hidden states every batch; a --teacher-cache holds "
                          "its output distributions only")
    data_sha = input_hashes.sha256_of(inputs, "data")
    if s.get("data_sha256") != data_sha:
        raise ShrinkError(f"--teacher-cache {folder} was made from other data ({s.get('data')}, sha256 "
                          f"{str(s.get('data_sha256'))[:12]}...), not {cfg.data} (sha256 {data_sha[:12]}...){rebuild}")
    weights = {Path(e["path"]).name: e["sha256"] for e in input_hashes.of_roles(inputs, "teacher-weights")}
    cached, now = s.get("teacher_fingerprint") or {}, teacher_fingerprint(teacher_folder, weights)
    parts = [name for key, name in (("config_sha256", "config.json"), ("tokenizer_sha256", "tokenizer files"),
                                    ("weights_sha256", "weight files")) if cached.get(key) != now[key]]
    if parts:
        raise ShrinkError(f"--teacher-cache {folder} was made with another teacher ({s.get('teacher')}): "
                          f"not the same {' and '.join(parts)} as {cfg.teacher} (sha256){rebuild}")
    prefix_sha = input_hashes.sha256_of(inputs, "teacher-prefix")
    if s.get("teacher_prefix_sha256") != prefix_sha:
        made = f"--teacher-prefix {s.get('teacher_prefix')}" if s.get("teacher_prefix") else "no --teacher-prefix"
        given = f"--teacher-prefix {cfg.teacher_prefix}" if cfg.teacher_prefix else "none"
        raise ShrinkError(f"--teacher-cache {folder} was made with {made}; this run has {given}{rebuild}")
    if s.get("max_length") != cfg.max_length:
        raise ShrinkError(f"--teacher-cache {folder} was made with --max-length {s.get('max_length')}; this run has "
                          f"--max-length {cfg.max_length}")
    made = s.get("loss_on", "completion")  # caches from before --loss-on hold the completion's positions
    if made != cfg.loss_on:
        raise ShrinkError(f"--teacher-cache {folder} was made with --loss-on {made}; this run has --loss-on "
                          f"{cfg.loss_on}{rebuild} --loss-on {cfg.loss_on}")


class CachedTeacher:
    """The teacher's outputs read from a cache: `cache[i]` is example i's (positions,
    vocab_out) dense log-probabilities (float32, on `device`), in the form distill's loss
    takes the teacher's logits. Shards are opened lazily (safetensors memory maps), so
    the cache can be larger than memory."""

    def __init__(self, folder: Path, counts: list[int], device: str, id_map=None):
        """`counts[i]`: the loss positions the run has for example i. `id_map`: with
        --prune-vocab, teacher id -> student id (-1 where dropped)."""
        from safetensors import safe_open

        folder = Path(folder)
        settings = read_cache_manifest(folder).settings
        self.vocab, self.top_k, self.device = settings["vocab_size"], settings["top_k"], device
        self.id_map = None if id_map is None else id_map.to(device)
        self.out_vocab = self.vocab if id_map is None else int((id_map >= 0).sum())
        self._where: dict[int, tuple[Any, int, int]] = {}  # example -> (shard handle, first, end)
        self._handles = []
        for name in settings["shards"]:
            handle = safe_open(str(folder / name), framework="pt", device="cpu")
            self._handles.append(handle)
            index, offsets = handle.get_tensor("example_index").tolist(), handle.get_tensor("offsets").tolist()
            for k, example in enumerate(index):
                self._where[example] = (handle, offsets[k], offsets[k + 1])
        if sorted(self._where) != list(range(len(counts))):
            raise ShrinkError(f"--teacher-cache {folder} holds {len(self._where)} examples, the data has {len(counts)}")
        for example, n in enumerate(counts):
            _, first, end = self._where[example]
            if end - first != n:
                raise ShrinkError(f"--teacher-cache {folder}: example {example + 1} has {end - first} cached positions, "
                                  f"the run has {n} (another tokenizer or --max-length?)")

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, example: int):
        handle, first, end = self._where[example]
        ids = handle.get_slice("top_ids")[first:end].to(self.device)  # (n, K)
        logp = handle.get_slice("top_logprobs")[first:end].to(self.device)  # (n, K)
        rest = handle.get_slice("rest_logprob")[first:end].to(self.device)  # (n,)
        return dense_logprobs(ids, logp, rest, self.vocab, self.id_map)


def dense_logprobs(top_ids, top_logprobs, rest_logprob, vocab: int, id_map=None):
    """(n, vocab_out) log-probabilities from the cached top-K ids (n, K), their log-probs
    (n, K) and the log of the remaining mass (n,): the remaining mass is spread evenly over
    the V - K other ids. With `id_map` (teacher id -> student id, -1 dropped), only the
    kept ids are returned, in the student's order; the loss's softmax renormalises them."""
    import torch

    n, k = top_ids.shape
    out_vocab = vocab if id_map is None else int((id_map >= 0).sum())
    if k < vocab:
        fill = (rest_logprob.float() - math.log(vocab - k)).clamp_min(FLOOR)  # (n,) each other id's share
    else:
        fill = torch.full((n,), FLOOR, device=top_ids.device)
    dense = fill[:, None].expand(n, out_vocab).clone()  # (n, vocab_out)
    ids = top_ids.long()
    values = top_logprobs.float().clamp_min(FLOOR)
    if id_map is None:
        return dense.scatter_(1, ids, values)
    ids = id_map[ids]  # (n, K) student ids, -1 where dropped
    kept = ids >= 0
    rows = torch.arange(n, device=ids.device)[:, None].expand(n, k)
    dense[rows[kept], ids[kept]] = values[kept]
    return dense


def describe(manifest: Manifest) -> str:
    s = manifest.settings
    where = " (prompts and completions)" if s.get("loss_on") == "all" else ""
    return (f"teacher cache: {s['examples']:,} examples, {s['positions']:,} positions{where}, top {s['top_k']} of "
            f"{s['vocab_size']:,} tokens, {len(s['shards'])} shard(s)")

