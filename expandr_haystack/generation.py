"""
Local sampling for causal LMs: batched, length-sorted, one random stream per row.

Each generated row (query x sample index) has its own seed and temperature, so a row's text does not depend on
which other rows share its batch, on the batch size, or on which rows were already cached. This is what makes
"same seed => same expansions" hold across cache hits and reruns.

The loop is the plain KV-cached decode of ``transformers.generate`` with nucleus sampling, written out so that
per-row seeds and temperatures are possible. It computes only the last position's logits at prefill, prefills a
prompt once however many samples it has, and finds the nucleus among the top 256 tokens (exact: rows whose top 256
hold less than `top_p` fall back to a full sort).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm


def sample_rows(logits: torch.Tensor, temperatures: torch.Tensor, top_p: float, generators: list,
                preselect: int = 256) -> torch.Tensor:
    """
    One token per row by temperature + nucleus (top-p) sampling, each row drawing from its own generator.

    The nucleus is found among the `preselect` most likely tokens; a row whose top `preselect` tokens hold less than
    `top_p` of the mass falls back to a full sort, so the result is exactly nucleus sampling. Temperature 0 = greedy.
    """
    greedy = temperatures <= 0
    probs = (logits / torch.where(greedy, 1.0, temperatures).unsqueeze(-1)).softmax(dim=-1)
    top_probs, top_ids = probs.topk(min(preselect, probs.shape[-1]), dim=-1)
    tokens = torch.empty(len(generators), dtype=torch.long, device=logits.device)
    for r, g in enumerate(generators):
        if greedy[r]:
            tokens[r] = top_ids[r, 0]
            continue
        p, ids = top_probs[r], top_ids[r]
        if top_p >= 1.0 or float(p.sum()) < top_p:
            p, ids = probs[r].sort(descending=True)
        if top_p < 1.0:
            p = p.masked_fill(p.cumsum(-1) - p >= top_p, 0.0)  # keep tokens until the mass before them >= top_p
        tokens[r] = ids[torch.multinomial(p, 1, generator=g)[0]]
    return tokens


class LocalSampler:
    """
    Batched sampling from a ``transformers`` causal LM with per-row seeds and temperatures.

    Usage:
    ```python
    sampler = LocalSampler(model, tokenizer)
    texts = sampler.sample(["<chat prompt 1>", "<chat prompt 2>"], seeds=[1, 2], temperatures=[1.0, 0.8],
                           top_p=0.9, max_new_tokens=64, batch_size=16)
    ```
    """

    def __init__(self, model, tokenizer, max_prompt_tokens: int = 1024):
        self.model = model
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_ids = torch.tensor(sorted(eos_ids), dtype=torch.long)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # transformers >= 5.2x names the KV cache `cache`; earlier releases `past_key_values`
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of already-templated prompts (the chat template adds its own special tokens)."""
        return [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]

    @torch.inference_mode()
    def sample(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        temperatures: Sequence[float],
        top_p: float,
        max_new_tokens: int,
        batch_size: int = 16,
        progress_bar: bool = False,
        desc: str = "Generating",
    ) -> list[str]:
        """One completion per prompt; ``seeds[i]`` and ``temperatures[i]`` (0 = greedy) drive row ``i``."""
        token_ids = self.tokenize(prompts)
        # length-sorted (less padding); identical prompts adjacent (shared prefill)
        order = sorted(range(len(prompts)), key=lambda i: (len(token_ids[i]), token_ids[i]))
        results: list[str] = [""] * len(prompts)
        bar = tqdm(total=len(prompts), desc=desc, unit="text", disable=not progress_bar)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            texts = self._sample_batch([token_ids[i] for i in rows], [seeds[i] for i in rows],
                                       [temperatures[i] for i in rows], top_p, max_new_tokens)
            for i, text in zip(rows, texts):
                results[i] = text
            bar.update(len(rows))
        bar.close()
        return results

    def _sample_batch(self, ids, seeds, temperatures, top_p, max_new_tokens) -> list[str]:
        device = self.device
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        for r, row in enumerate(ids):
            input_ids[r, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention[r, width - len(row) :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        gen_device = "cpu" if device.type == "mps" else device
        generators = [torch.Generator(device=gen_device).manual_seed(int(s) % (2**63)) for s in seeds]
        temps = torch.tensor(temperatures, dtype=torch.float32, device=device)
        eos_ids = self.eos_ids.to(device)

        # identical prompts in the batch (several samples of one query) are prefilled once, their cache shared
        unique: dict[tuple, int] = {}
        source = [unique.setdefault(tuple(row), len(unique)) for row in ids]
        firsts = [source.index(u) for u in range(len(unique))]
        out = self.model(input_ids=input_ids[firsts], attention_mask=attention[firsts], position_ids=positions[firsts],
                         use_cache=True, logits_to_keep=1)
        past = _returned_cache(out)
        select = torch.tensor(source, device=device)
        if len(firsts) < len(ids):
            past.batch_select_indices(select)
        logits = out.logits[:, -1, :].float()[select]
        finished = torch.zeros(len(ids), dtype=torch.bool, device=device)
        generated = []
        next_pos = positions[:, -1:] + 1
        for _ in range(max_new_tokens):
            next_tokens = sample_rows(logits, temps, top_p, generators)
            next_tokens = torch.where(finished, torch.full_like(next_tokens, self.pad_id), next_tokens)
            generated.append(next_tokens)
            finished |= torch.isin(next_tokens, eos_ids)
            if bool(finished.all()):
                break
            attention = torch.cat([attention, torch.ones((len(ids), 1), dtype=attention.dtype, device=device)], -1)
            out = self.model(input_ids=next_tokens[:, None], attention_mask=attention, position_ids=next_pos,
                             use_cache=True, **{self._cache_arg: past})
            past = _returned_cache(out)
            logits = out.logits[:, -1, :].float()
            next_pos = next_pos + 1
        tokens = torch.stack(generated, dim=1).cpu().tolist() if generated else [[] for _ in ids]
        texts = []
        eos_set = set(self.eos_ids.tolist())
        for row in tokens:
            cut = next((k for k, t in enumerate(row) if t in eos_set), len(row))
            texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True))
        return texts


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
