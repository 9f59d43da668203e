"""
Local sampling for causal LMs: batched, length-sorted, one random stream per row.

Each generated row (query x sample index) has its own seed and temperature, so in float32 (the CPU default) a row's
text does not depend on which other rows share its batch, on the batch size, or on which rows were already cached.
This is what makes "same seed => same expansions" hold across cache hits and reruns. In bfloat16/float16 on CUDA
the padded batch changes a row's logits by more than rounding can hide, so there a row's text can depend on its
batch (same batch => same text; ``batch_size=1`` or float32 avoid it): the precise contract is in
`expandr_haystack.generation`'s docstring.

The loop is the plain KV-cached decode of ``transformers.generate`` with nucleus sampling, written out so that
per-row seeds and temperatures are possible; its forward passes come from a decoder (`TransformersDecoder`, or the
faster `packed_llama.PackedLlamaDecoder`). A prompt is prefilled once however many samples it has, only the last
position's logits are computed at prefill, and the nucleus is found among the top 256 tokens, widened for the rows
that need it (exact; see `sample_rows`).
"""

from __future__ import annotations

import inspect
import logging
import threading
import weakref
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from expandr_haystack.checks import check_choice
from expandr_haystack.models import return_freed_memory
from expandr_haystack.options import WEIGHT_PRECISIONS

logger = logging.getLogger(__name__)

#: A prompt: a templated string, or chat messages (``[{"role": ..., "content": ...}]``) templated by the tokenizer.
Prompt = str | list[dict[str, str]]


def template(tokenizer, prompt: Prompt) -> str:
    """The model's input text for `prompt`: its chat template with the generation prompt (a plain "system\n\nuser"
    layout for tokenizers without one); a str is taken as already templated."""
    if isinstance(prompt, str):
        return prompt
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in prompt) + "\n"


#: End-of-generation special tokens stopped at wherever the vocabulary has them, besides the model's EOS (the names
#: llama.cpp treats as end of generation): SmolLM2's turns end with <|im_end|>, its EOS, but its vocabulary also has
#: <|endoftext|>, which ends a text; llama.cpp stops there and so do our engines (on the 225 Cranfield rows of the
#: llama.cpp quality check no row reached it, so no text changed; docs/benchmarks.md "llama.cpp's text").
END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
              "</s>")
#: Suffix of the cache engine name of a sampler that stops at more tokens than the model's EOS: texts of rows that
#: emitted one changed when these stops came (2026-12-05), so they are cached apart from the earlier texts.
END_TOKENS_ENGINE = "+eog"


def end_token_ids(tokenizer, model=None) -> tuple[list[int], list[int]]:
    """``(all, extra)``: the token ids a generation stops at (the model's generation-config EOS, the tokenizer's EOS
    and the special tokens of `END_TOKENS` it has) and those of them beyond the two EOS (what changed texts)."""
    eos = model.generation_config.eos_token_id if model is not None and model.generation_config is not None else None
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    special = set(getattr(tokenizer, "all_special_tokens", ())) | set(getattr(tokenizer, "added_tokens_encoder", {}))
    ends = {tokenizer.convert_tokens_to_ids(name) for name in END_TOKENS if name in special}
    ends = {i for i in ends if isinstance(i, int) and i >= 0}
    return sorted(ids | ends), sorted(ends - ids)


#: The int8 path's name in cache keys: bump it when int8's math changes (its text changes with it). ".2": the
#: norms factored into the row scales (2026-11-27), the same quantization with other rounding, so other text; ".3":
#: the KV cache in float16 (2026-12-05, `packed_llama.KV_DTYPES`).
INT8_ENGINE = "int8-smoothed.3"

#: (question, passage) pairs the int8 path calibrates its smoothing on (`calibration_ids`): several fields, in the
#: expansion prompt's chat form, so the activation ranges are those of prompts and of the passages written after them.
CALIBRATION_TEXTS = (
    ("what is the boundary layer on an aircraft wing",
     ("The boundary layer is the thin region of air next to the wing surface where viscosity slows the flow from "
      "the free-stream velocity to zero at the wall. It starts laminar near the leading edge and becomes turbulent "
      "downstream, which raises skin friction drag and heat transfer.")),
    ("does vitamin D supplementation reduce the risk of fractures in older adults",
     ("Randomized controlled trials of vitamin D given with calcium to adults over 65 reported a modest reduction in "
      "hip and non-vertebral fractures, mostly in people with low baseline serum 25-hydroxyvitamin D; vitamin D alone "
      "showed no significant effect on fracture risk.")),
    ("how does a hash table handle collisions",
     ("When two keys hash to the same bucket, a hash table either chains them in a list stored at that bucket or "
      "probes other slots (linear probing, quadratic probing, double hashing) until it finds a free one. Lookups "
      "stay O(1) on average as long as the load factor is kept low by resizing.")),
    ("why did the Roman Empire split into eastern and western halves",
     ("In 285 AD Diocletian divided the administration of the empire to make it governable: its size, frontier wars "
      "on several fronts and slow communication meant one emperor could not respond everywhere. After Theodosius I "
      "died in 395 the division became permanent, with capitals at Rome (later Ravenna) and Constantinople.")),
    ("what causes the seasons on Earth",
     ("Seasons are caused by the 23.4 degree tilt of Earth's axis relative to its orbit. As Earth orbits the Sun, "
      "each hemisphere in turn leans toward the Sun, receiving more direct sunlight and longer days (summer), then "
      "away from it (winter). The distance to the Sun changes by only 3% and is not the cause.")),
    ("which proteins regulate apoptosis in cancer cells",
     ("Apoptosis is controlled by the BCL-2 family: anti-apoptotic BCL-2, BCL-XL and MCL-1 hold back the pro-apoptotic "
      "BAX and BAK, which permeabilize the mitochondrial membrane and release cytochrome c to activate caspase-9 and "
      "caspase-3. Many tumours overexpress BCL-2 or lose p53, which induces PUMA and NOXA.")),
)


def calibration_ids(tokenizer) -> list[list[int]]:
    """`CALIBRATION_TEXTS` as the model sees them: each question in `EXPANSION_PROMPT`, templated as a chat turn
    (`template`), followed by its passage; the token id lists the packed int8 decoder calibrates on."""
    from expandr_haystack.core.text import EXPANSION_PROMPT

    return [tokenizer(template(tokenizer, [{"role": "user", "content": EXPANSION_PROMPT.format(query=question)}])
                      + passage, add_special_tokens=False)["input_ids"] for question, passage in CALIBRATION_TEXTS]


def truncate_tokens(tokenizer, text: str, limit: int, argument: str = "query") -> str:
    """`text` cut to `limit` tokens of `tokenizer` (with a warning naming `argument` when it is cut)."""
    if len(text) < limit:  # fewer characters than tokens allowed: cannot be too long
        return text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= limit:
        return text
    logger.warning("`%s` of %d tokens truncated to max_prompt_tokens=%d.", argument, len(ids), limit)
    return tokenizer.decode(ids[:limit], skip_special_tokens=True)


def sample_rows(logits: torch.Tensor, temperatures: torch.Tensor, top_p: float, generators: list,
                preselect: int = 256, fused: bool = False) -> torch.Tensor:
    """
    One token per row by temperature + nucleus (top-p) sampling, each row drawing from its own generator.

    The nucleus is found among the `preselect` most likely tokens; rows whose top `preselect` tokens hold less than
    `top_p` of the mass (flat distributions) look again among the top ``16 * preselect``, then the full sorted
    vocabulary, so the result is exactly nucleus sampling. Temperature 0 = greedy.

    The draw is ``torch.multinomial(p, 1, generator)`` row by row, done for all rows of a candidate width at once:
    for one sample multinomial takes ``argmax(p / e)`` with ``e`` exponential draws from its generator, one per
    candidate (the "exponential race"), so each row fills its ``e`` from its own generator and the divisions and
    argmaxes run as one batch: the same tokens and the same generator states as the row-by-row calls (tested), in
    a handful of calls instead of ~6 per row.

    `fused` (CPU logits, the fused kernels loaded: `kernels`): the same sampling in one kernel call
    (``expandr::sample_nucleus``): the nucleus found from a histogram of the probabilities instead of a softmax and a
    topk over the vocabulary (together ~15% of an int8 decode step at 16 rows), the race's draws from one 64-bit seed
    that each row's generator gives per step. The same distribution, other tokens than the unfused path's for a
    seed; still one generator per row, so a row's text does not depend on the other rows.
    """
    if fused:
        seeds = torch.stack([torch.empty((), dtype=torch.long).random_(generator=g) for g in generators])
        return torch.ops.expandr.sample_nucleus(logits.float().contiguous(), temperatures.float().contiguous(),
                                                float(top_p), seeds)
    greedy = temperatures <= 0
    if bool((temperatures != 1.0).any()):  # (a division by 1 changes nothing: skipped)
        logits = logits / torch.where(greedy, 1.0, temperatures).unsqueeze(-1)
    probs = logits.softmax(dim=-1)
    vocab = probs.shape[-1]
    top_probs, top_ids = probs.topk(min(preselect, vocab), dim=-1)
    tokens = top_ids[:, 0].clone()  # greedy rows keep this
    sampled = (~greedy).nonzero().flatten()
    if len(sampled) == 0:
        return tokens
    if top_p >= 1.0:  # the whole vocabulary is the nucleus
        candidates = [(sampled, *probs.index_select(0, sampled).sort(-1, descending=True))]
    else:  # widen the candidate set only for the rows that need it (exact: the nucleus is inside it)
        candidates = []
        rows, p, ids = sampled, top_probs.index_select(0, sampled), top_ids.index_select(0, sampled)
        for wider in (min(16 * preselect, vocab), vocab):
            short = p.sum(-1) < top_p
            if p.shape[-1] == vocab or not bool(short.any()):
                break
            candidates.append((rows[~short], p[~short], ids[~short]))  # these rows' nucleus is in p already
            rows = rows[short]
            p, ids = (probs.index_select(0, rows).topk(wider, dim=-1) if wider < vocab else
                      probs.index_select(0, rows).sort(-1, descending=True))
        candidates.append((rows, p, ids))
    for rows, p, ids in candidates:
        if len(rows) == 0:
            continue
        if top_p < 1.0:
            p = p.masked_fill(p.cumsum(-1) - p >= top_p, 0.0)  # keep tokens until the mass before them >= top_p
        order = rows.tolist()
        race = torch.empty(p.shape, device=generators[order[0]].device)  # where the generators draw (CPU on MPS)
        for j, r in enumerate(order):
            race[j].exponential_(1, generator=generators[r])
        tokens[rows] = ids.gather(1, p.div(race.to(p.device)).argmax(-1, keepdim=True)).squeeze(1)
    return tokens


_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {precision: its PackedLlamaDecoder}
_LOCK = threading.Lock()


class TransformersDecoder:
    """Prefill / decode steps through the model's own ``forward`` and KV cache (any ``transformers`` causal LM)."""

    def __init__(self, model, pad_id: int = 0):
        self.model = model
        self.pad_id = pad_id
        # transformers >= 5.2x names the KV cache `cache`; earlier releases `past_key_values`
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def prefill(self, prompts: list[list[int]], select: torch.Tensor, max_new_tokens: int):
        """Run the unique prompts (left-padded); return next-token logits for every row (row i continues prompt
        select[i]) and the decoding state."""
        input_ids, attention = left_padded(prompts, self.pad_id, select.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                         logits_to_keep=1)
        past = _returned_cache(out)
        if select.tolist() != list(range(len(input_ids))):  # rows repeat or reorder the prompts
            past.batch_select_indices(select)
        state = {"past": past, "attention": attention.index_select(0, select),
                 "next_position": positions.index_select(0, select)[:, -1:] + 1}
        return out.logits[:, -1, :].float().index_select(0, select), state

    def decode(self, state, tokens):
        """Feed one token per row; return the next-token logits."""
        attention = state["attention"]
        attention = torch.cat([attention, attention.new_ones((len(tokens), 1))], -1)
        out = self.model(input_ids=tokens[:, None], attention_mask=attention, position_ids=state["next_position"],
                         use_cache=True, **{self._cache_arg: state["past"]})
        state.update(past=_returned_cache(out), attention=attention, next_position=state["next_position"] + 1)
        return out.logits[:, -1, :].float()


def default_decoder(model, engine: str = "auto", pad_id: int = 0, weight_precision: str = "float32",
                    calibration: list[list[int]] | None = None):
    """
    The decoder for `engine`: "auto" (the packed decoder where the model allows it, else transformers), "packed"
    (fail if the model does not allow it) or "transformers"; `weight_precision` is the packed decoder's
    (`quantize.PRECISIONS`: "int8" and "bfloat16" need the packed decoder, "auto" is float32 where it cannot
    run); `calibration` (token id lists, `calibration_ids`) is what int8 smooths its layers by. One packed copy per
    model and resolved precision, however many samplers share it.
    """
    from expandr_haystack.generation.kernels import unavailable_reason
    from expandr_haystack.generation.packed_llama import PackedLlamaDecoder, unsupported_reason
    from expandr_haystack.generation.pages import release_clean_file_pages
    from expandr_haystack.generation.quantize import auto_precision, resolve_precision

    if engine not in ("auto", "packed", "transformers"):
        raise ValueError(f"`engine` must be 'auto', 'packed' or 'transformers'; got {engine!r}.")
    check_choice(weight_precision, "weight_precision", WEIGHT_PRECISIONS)
    reason = "engine 'transformers'" if engine == "transformers" else unsupported_reason(model)
    if reason is not None:
        if engine == "packed":
            raise ValueError(f"`engine`='packed' cannot run this model: {reason}. Use 'auto' or 'transformers'.")
        if weight_precision in ("int8", "bfloat16"):
            raise ValueError(f"`weight_precision`={weight_precision!r} needs the packed decoder, which cannot run "
                             f"here: {reason}. Use weight_precision 'float32' or 'auto'.")
        return TransformersDecoder(model, pad_id)
    resolved = resolve_precision(weight_precision)
    with _LOCK:  # one packed copy per model and precision (the candidates and the answers share it)
        decoders = _PACKED.setdefault(model, {})
        if resolved not in decoders:
            decoders[resolved] = decoder = PackedLlamaDecoder(model, resolved,
                                                              calibration if resolved == "int8" else None)
            if weight_precision == "auto":
                kernels = "" if resolved != "int8" else (
                    "; its fused CPU kernels run" if decoder.kernels
                    else f"; without its fused CPU kernels ({unavailable_reason()})")
                logger.info("weight_precision='auto' chose %s: %s%s (weight_precision='float32' is the exact "
                            "reference).", *auto_precision(), kernels)
            # the packed copy is what decodes now: the model's weights, read once from their memory-mapped file
            # to pack them, go back to the OS (re-read from the file if the model's own forward runs again)
            freed = release_clean_file_pages(model.parameters())
            if freed:
                logger.info("Packed decoder built; %d MiB of the model's file-mapped weights handed back.",
                            freed >> 20)
        return decoders[resolved]


class LocalSampler:
    """
    Batched sampling from a ``transformers`` causal LM with per-row seeds and temperatures.

    The sampling loop is shared; the forward passes come from a decoder: `PackedLlamaDecoder` (fast CPU path for
    Llama-architecture models; float32, or int8/bfloat16 weights with `weight_precision`) or `TransformersDecoder` (any
    model, any device).

    `weight_precision` ("float32" default, "int8", "bfloat16", "auto": `quantize.resolve_precision`) is the packed
    decoder's weight precision. In int8 the text differs from the float32 text where a draw falls near a boundary
    (logits differ by quantization rounding) and, like bfloat16 on CUDA, a row's text can depend on its batch
    (same batch => same text); `engine` names the precision ("packed-int8-smoothed.3") so the expander caches it
    apart. int8 smooths its layers on a few built-in prompts (`calibration_ids`, once per model).

    Usage:
    ```python
    sampler = LocalSampler(model, tokenizer)
    texts = sampler.sample(["<chat prompt 1>", "<chat prompt 2>"], seeds=[1, 2], temperatures=[1.0, 0.8],
                           top_p=0.9, max_new_tokens=64, batch_size=16)
    ```
    """

    def __init__(self, model, tokenizer, max_prompt_tokens: int = 1024, decoder=None, engine: str = "auto",
                 weight_precision: str = "float32"):
        self.model = model
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        stops, self.extra_stops = end_token_ids(tokenizer, model)
        self.eos_ids = torch.tensor(stops, dtype=torch.long)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if decoder is None:
            calibration = calibration_ids(tokenizer) if weight_precision not in ("float32", "bfloat16") else None
            decoder = default_decoder(model, engine, self.pad_id, weight_precision, calibration)
        self.decoder = decoder
        self.tokens_generated = 0  # running count of sampled tokens (an EOS counts, padding after it does not)

    @property
    def backend(self) -> str:
        """Name of the decoder in use: "packed" or "transformers"."""
        return "transformers" if isinstance(self.decoder, TransformersDecoder) else "packed"

    @property
    def precision(self) -> str:
        """Weight precision of the decoder: the packed decoder's ("float32", "int8", "bfloat16"), else "model"
        (the model's own dtype)."""
        return getattr(self.decoder, "precision", "model") if self.backend == "packed" else "model"

    @property
    def engine(self) -> str:
        """The engine as the expander's cache keys name it: `backend`, with the precision when it is not float32
        ("packed-int8-smoothed.3"; with 7-bit weights, on CPUs without VNNI, "packed-int8-smoothed.3-w64"; with the
        fused kernels, `kernels`, "-fused" after it): texts of another precision or arithmetic are never served for
        these. `INT8_ENGINE` changes with int8's arithmetic: the rows cached by
        the earlier int8 paths ("packed-int8": two input levels; "packed-int8-smoothed": the norms applied to the
        inputs) are other text and are not served. `END_TOKENS_ENGINE` is added where the tokenizer has end tokens
        besides its EOS (the bundled SmolLM2: "packed+eog"): the texts written before the sampler stopped there are
        not served either."""
        name = self.backend
        if self.backend == "packed" and self.precision == "int8":
            levels = getattr(self.decoder, "int8_levels", 127)
            name = (f"packed-{INT8_ENGINE}" + ("" if levels == 127 else f"-w{levels}")
                    + ("-fused" if getattr(self.decoder, "kernels", False) else ""))
        elif self.backend == "packed" and self.precision != "float32":
            name = f"packed-{self.precision}"
        return name + (END_TOKENS_ENGINE if self.extra_stops else "")

    def truncate(self, text: str, argument: str = "query") -> str:
        """`text` cut to `max_prompt_tokens` tokens (with a warning naming `argument` when it is cut)."""
        return truncate_tokens(self.tokenizer, text, self.max_prompt_tokens, argument)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Token ids of prompts, templated first when given as chat messages (the template adds its own special
        tokens)."""
        return [self.tokenizer(template(self.tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]

    @torch.inference_mode()
    def sample(
        self,
        prompts: Sequence[Prompt],
        seeds: Sequence[int],
        temperatures: Sequence[float],
        top_p: float,
        max_new_tokens: int,
        batch_size: int = 16,
        progress_bar: bool = False,
        desc: str = "Generating",
    ) -> list[str]:
        """One completion per prompt (a templated string or chat messages); ``seeds[i]`` and ``temperatures[i]``
        (0 = greedy) drive row ``i``."""
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
        return_freed_memory()  # the batches' KV caches, freed into the C heap, go back to the OS
        return results

    def _sample_batch(self, ids, seeds, temperatures, top_p, max_new_tokens) -> list[str]:
        device = self.device
        # identical prompts in the batch (several samples of one query) are prefilled once
        unique: dict[tuple, int] = {}
        source = [unique.setdefault(tuple(row), len(unique)) for row in ids]
        gen_device = "cpu" if device.type == "mps" else device
        generators = [torch.Generator(device=gen_device).manual_seed(int(s) % (2**63)) for s in seeds]
        temps = torch.tensor(temperatures, dtype=torch.float32, device=device)
        eos_ids = self.eos_ids.to(device)
        select = torch.tensor(source, device=device)
        logits, state = self.decoder.prefill([list(p) for p in unique], select, max_new_tokens)
        finished = torch.zeros(len(ids), dtype=torch.bool, device=device)
        generated = []
        fused = bool(getattr(self.decoder, "kernels", False))  # its fused kernels sample too (`sample_rows`)
        for step in range(max_new_tokens):
            next_tokens = sample_rows(logits, temps, top_p, generators, fused=fused)
            next_tokens = torch.where(finished, torch.full_like(next_tokens, self.pad_id), next_tokens)
            generated.append(next_tokens)
            finished |= torch.isin(next_tokens, eos_ids)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            logits = self.decoder.decode(state, next_tokens)
        tokens = torch.stack(generated, dim=1).cpu().tolist() if generated else [[] for _ in ids]
        texts = []
        eos_set = set(self.eos_ids.tolist())
        for row in tokens:
            cut = next((k for k, t in enumerate(row) if t in eos_set), len(row))
            self.tokens_generated += min(cut + 1, len(row))
            texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True))
        return texts


def left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as a left-padded id tensor and its attention mask."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, row in enumerate(prompts):
        input_ids[r, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attention[r, width - len(row) :] = 1
    return input_ids.to(device), attention.to(device)


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
