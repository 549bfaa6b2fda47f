"""PyTorch runtime for Hugging Face model folders (fp32 on the CPU, bf16 on CUDA)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shrink.hf import load_causal_lm, load_tokenizer, resolve_device


class TorchRuntime:
    name = "torch"

    def __init__(self, path: Path, device: str = "auto"):
        import torch

        self.device = resolve_device(device)
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = load_causal_lm(Path(path), self.device, dtype)
        self.tokenizer = load_tokenizer(Path(path))
        self.eos_id = self.tokenizer.eos_token_id

    @classmethod
    def from_model(cls, model, tokenizer, device: str) -> "TorchRuntime":
        """Wrap a model already in memory (the student right after training)."""
        rt = cls.__new__(cls)
        rt.model, rt.tokenizer, rt.device, rt.eos_id = model, tokenizer, device, tokenizer.eos_token_id
        return rt

    def encode(self, text: str) -> list[int]:
        # Special-token strings in user text stay text, as in llama.cpp with special=False.
        return list(self.tokenizer(text, split_special_tokens=True).input_ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _forward(self, ids: list[int]):
        import torch

        with torch.inference_mode():
            x = torch.tensor([ids], device=self.device)
            return self.model(input_ids=x).logits[0].float()  # (seq, vocab)

    def logits(self, ids: list[int]) -> np.ndarray:
        return self._forward(ids).cpu().numpy()

    def score_continuations(self, prompt_ids: list[int], conts: list[list[int]]) -> list[float]:
        """One padded batch for all continuations; right padding keeps positions intact."""
        import torch

        seqs = [prompt_ids + c for c in conts]
        width = max(map(len, seqs))
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=self.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=self.device)
        with torch.inference_mode():
            logp = self.model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        n = len(prompt_ids)
        scores = []
        for row, cont in enumerate(conts):
            pos = torch.arange(n - 1, n - 1 + len(cont), device=self.device)
            target = torch.tensor(cont, device=self.device)
            scores.append(logp[row, pos, target].sum().item())  # logp: (batch, seq, vocab)
        return scores

    def generate(self, prompt: str, max_tokens: int, stop: tuple[str, ...] = ()) -> str:
        """Greedy decoding with a KV cache, checking stop strings as text grows."""
        import torch

        ids = self.encode(prompt)
        out: list[int] = []
        past = None
        x = torch.tensor([ids], device=self.device)
        with torch.inference_mode():
            for _ in range(max_tokens):
                res = self.model(input_ids=x, past_key_values=past, use_cache=True)
                past = res.past_key_values
                nxt = int(res.logits[0, -1].argmax())
                if nxt == self.eos_id:
                    break
                out.append(nxt)
                text = self.decode(out)
                if any(s in text for s in stop):
                    break
                x = torch.tensor([[nxt]], device=self.device)
        return _cut_at_stop(self.decode(out), stop)

    def close(self) -> None:
        self.model = None


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return text if cut < 0 else text[:cut]
