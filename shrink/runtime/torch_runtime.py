"""PyTorch runtime for Hugging Face model folders (fp32 on the CPU, bf16 on CUDA), GPTQ
checkpoints included (transformers hands their layers to GPTQModel's kernels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shrink.errors import ShrinkError
from shrink.hf import load_causal_lm, load_tokenizer, quantization_method, resolve_device
from shrink.kv_cache import cache_kwargs, returned_cache
from shrink.runtime.base import EMPTY_PROMPT, Runtime, context_of, end_of_generation, greedy_generate, stop_ids


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, path: Path, device: str = "auto"):
        import torch

        self.device = resolve_device(device)
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = load_causal_lm(Path(path), self.device, dtype)
        if quantization_method(Path(path)) == "gptq":
            self.name = "torch+gptqmodel"  # GPTQModel's kernels inside transformers
        self.tokenizer = load_tokenizer(Path(path))
        self.stop_ids = stop_ids(Path(path), self.tokenizer)
        self.context_length = context_of(self.model.config.to_dict())

    @classmethod
    def from_model(cls, model, tokenizer, device: str) -> "TorchRuntime":
        """Wrap a model already in memory (the student right after training)."""
        rt = cls.__new__(cls)
        rt.model, rt.tokenizer, rt.device = model, tokenizer, device
        generation = getattr(model, "generation_config", None)
        rt.stop_ids = end_of_generation(getattr(generation, "eos_token_id", None), tokenizer)
        rt.context_length = context_of(model.config.to_dict())
        return rt

    def encode(self, text: str, special: bool = False) -> list[int]:
        # Special-token strings in user text stay text, as in llama.cpp with special=False.
        return list(self.tokenizer(text, split_special_tokens=not special).input_ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _forward(self, ids: list[int]):
        import torch

        with torch.inference_mode():
            x = torch.tensor([ids], device=self.device)
            return self.model(input_ids=x).logits[0].float()  # (seq, vocab)

    def logits(self, ids: list[int]) -> np.ndarray:
        return self._forward(ids).cpu().numpy()

    def share_prefix(self, ids: list[int]) -> None:
        """Run a prefix every following prompt starts with once (few-shot examples,
        instructions) and reuse its keys and values, as llama.cpp reuses its KV cache."""
        from shrink.prefix import PrefixCache

        self.prefix = PrefixCache(self.model, ids, self.device) if len(ids) >= PrefixCache.MIN_TOKENS else None

    def _last_hidden(self, ids, mask, first_needed: int):
        """(batch, seq - skipped, d) hidden states and how many leading positions the
        shared prefix skipped (only when no needed position lies inside it)."""
        prefix = getattr(self, "prefix", None)
        n = len(prefix) if prefix is not None else 0
        if n and first_needed >= n and ids[0, :n].tolist() == prefix.ids:
            return prefix.hidden(self.model, ids, mask), n
        return self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state, 0

    def _head(self, h):
        from shrink.logits import head_logits

        return head_logits(self.model, h)

    def score_continuations(self, prompt_ids: list[int], conts: list[list[int]]) -> list[float]:
        """Single-token choices need one forward pass of the prompt; longer ones are run
        as one right-padded batch. Only the positions that are scored reach the head."""
        import torch

        if not prompt_ids:
            raise ShrinkError(EMPTY_PROMPT)
        with torch.inference_mode():
            if all(len(c) == 1 for c in conts):
                ids = torch.tensor([prompt_ids], device=self.device)
                hidden, _ = self._last_hidden(ids, torch.ones_like(ids), len(prompt_ids) - 1)
                logp = self._head(hidden[0, -1:]).float().log_softmax(-1)[0]  # (vocab,)
                return [logp[c[0]].item() for c in conts]
            seqs = [prompt_ids + c for c in conts]
            width = max(map(len, seqs))
            pad = self.tokenizer.pad_token_id or 0
            ids = torch.tensor([q + [pad] * (width - len(q)) for q in seqs], device=self.device)
            mask = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in seqs], device=self.device)
            hidden, skipped = self._last_hidden(ids, mask, len(prompt_ids) - 1)
            n = len(prompt_ids) - 1 - skipped  # first scored position, in `hidden`
            scores = []
            for row, cont in enumerate(conts):
                logp = self._head(hidden[row, n : n + len(cont)]).float().log_softmax(-1)  # (len(cont), vocab)
                scores.append(logp[torch.arange(len(cont)), torch.tensor(cont, device=self.device)].sum().item())
            return scores

    def generate(self, prompt: str | list[int], max_tokens: int, stop: tuple[str, ...] = (),
                 stop_ids: frozenset[int] = frozenset(), sampler=None) -> str:
        """Greedy decoding with a KV cache (shrink.runtime.base.greedy_generate)."""
        import torch

        def next_logits(ids: list[int], past):
            x = torch.tensor([ids], device=self.device)
            res = self.model(input_ids=x, **cache_kwargs(self.model, past), use_cache=True, logits_to_keep=1)
            return res.logits[0, -1], returned_cache(res)  # (vocab,)

        with torch.inference_mode():
            return greedy_generate(self, prompt, max_tokens, stop, next_logits, stop_ids, sampler)

    def generate_batch(self, prompts: list[list[int]], max_tokens: int, stops: list[tuple[str, ...]],
                       stop_ids: list[frozenset[int]]) -> list[str]:
        """Greedy answers to many prompts (token ids) in one left-padded batch, with
        transformers' own generate: what `generate` gives each, but the batch shares every
        forward pass (shrink label's torch teachers, on CUDA above all). Each answer ends
        at its first stop id, and before its first stop string."""
        import torch

        from shrink.runtime.base import cut_at_stop

        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else min(self.stop_ids, default=0)
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        ends = set(self.stop_ids).union(*stop_ids)
        budget = max_tokens if not self.context_length else max(0, min(max_tokens, self.context_length - width))
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(budget, 1),
                                      do_sample=False, eos_token_id=sorted(ends), pad_token_id=pad,
                                      top_p=None, top_k=None, temperature=None)[:, width:].tolist()
        texts = []
        for prompt, new, stop, extra in zip(prompts, out, stops, stop_ids):
            cut = next((i for i, t in enumerate(new) if t in self.stop_ids or t in extra), len(new))
            new = new[:cut] if budget else []
            texts.append(cut_at_stop(self.decode(prompt + new)[len(self.decode(prompt)):], stop))
        return texts

    def close(self) -> None:
        self.model = None

