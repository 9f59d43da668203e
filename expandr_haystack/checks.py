"""
Argument checks shared by components, configs and command lines: one wording for each rule, naming the argument.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def check_int(value: Any, argument: str, minimum: int = 1) -> int:
    """`value` as an int >= `minimum` (bools refused), else a ValueError naming `argument`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"`{argument}` must be an integer >= {minimum}; got {value!r}.")
    return value


def check_number(value: Any, argument: str, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    """`value` as a finite float in [low, high] (or (low, high] with `low_open`), else a ValueError naming it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        if low is not None and high is not None:
            expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"
        elif low is not None:
            expected = f"a number {'>' if low_open else '>='} {low:g}"
        elif high is not None:
            expected = f"a number <= {high:g}"
        else:
            expected = "a finite number"
        raise ValueError(f"`{argument}` must be {expected}; got {value!r}.")
    return float(value)


def check_choice(value: Any, argument: str, choices: tuple[str, ...]) -> str:
    """`value` if it is one of `choices`, else a ValueError listing them."""
    if value not in choices:
        raise ValueError(f"`{argument}` must be one of {', '.join(map(repr, choices))}; got {value!r}.")
    return value


def looks_like_local_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else with a path shape is meant as a local directory."""
    return name.startswith((".", "/", "~")) or name.count("/") >= 2 or "\\" in name


def check_model_name(model: Any, argument: str = "model") -> None:
    """None (bundled default), a hub id, or an existing local directory; a missing local path names `argument`."""
    if model is None:
        return
    if not isinstance(model, str) or not model.strip():
        raise ValueError(f"`{argument}` must be None (bundled default), a Hugging Face model id or a local path; "
                         f"got {model!r}.")
    if looks_like_local_path(model) and not Path(model).expanduser().exists():
        raise FileNotFoundError(f"`{argument}`: no model directory at {model!r}.")


#: The first bytes of a GGUF file (llama.cpp's format, which transformers dequantises on load; the bundled LLM is one).
GGUF_MAGIC = b"GGUF"


def is_gguf(path: str | Path) -> bool:
    """Whether `path` is a GGUF file (by its magic bytes, not its name)."""
    try:
        with open(Path(path).expanduser(), "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def check_llm_name(model: Any, argument: str = "model") -> None:
    """
    `check_model_name`, and a local path must be a causal LM transformers can load: a folder with config.json (a
    Hugging Face checkpoint) or a GGUF file. Anything else is a ValueError (a file) / FileNotFoundError (a folder)
    naming `argument` and what was expected, before transformers' own JSON or tokenizer errors.
    """
    check_model_name(model, argument)
    local = None if model is None else Path(model).expanduser()
    expected = "expected a Hugging Face model folder (config.json, weights, tokenizer files), a .gguf file or a hub id"
    if local is not None and local.is_file() and not is_gguf(local):
        raise ValueError(f"`{argument}`: {model!r} is a file but not a GGUF model file; {expected}.")
    if local is not None and local.is_dir() and not (local / "config.json").is_file():
        ggufs = sorted(local.glob("*.gguf"))
        hint = (f" It holds {ggufs[0].name}: pass that file as `{argument}`." if ggufs else
                f" It holds adapter_config.json: pass it as `adapter`, its base model as `{argument}`."
                if is_adapter_dir(local) else "")
        raise FileNotFoundError(f"`{argument}`: the folder {model!r} has no config.json; {expected}.{hint}")


def check_hub_model(model_id: str, argument: str = "model", token: str | None = None, revision: str | None = None,
                    cache_dir: str | None = None, local_files_only: bool = False) -> None:
    """
    Whether transformers can get the hub model `model_id`, asked once and without its download retries (offline,
    a missing model costs an error that never names the argument; with the hub unreachable, about 50 s of retries
    first): fine when the local Hugging Face cache has its config.json. Else, with downloads off (`HF_HUB_OFFLINE`,
    `TRANSFORMERS_OFFLINE` or `local_files_only`), a FileNotFoundError naming `argument`; online, one request for
    the config (no retry): the hub unreachable is an OSError, a repository it does not know a FileNotFoundError,
    both naming `argument`; any other answer (gated, a missing file, ...) is left to transformers to report.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError

    try:
        if isinstance(try_to_load_from_cache(model_id, "config.json", cache_dir=cache_dir, revision=revision), str):
            return
        url = hf_hub_url(model_id, "config.json", revision=revision)
    except HFValidationError as exc:
        raise ValueError(f"`{argument}`: {model_id!r} is neither an existing local path nor a valid Hugging Face "
                         f"model id ({exc}).") from exc
    where = f"is not in the local Hugging Face cache ({cache_dir or constants.HF_HUB_CACHE})"
    fix = f"download it where the hub is reachable (`hf download {model_id}`) or pass a local model folder"
    if local_files_only or constants.is_offline_mode():
        raise FileNotFoundError(f"`{argument}`: {model_id!r} {where} and downloads are off (HF_HUB_OFFLINE, "
                                f"TRANSFORMERS_OFFLINE or local_files_only): {fix}.")
    try:
        get_hf_file_metadata(url, token=token, timeout=10)
    except RepositoryNotFoundError as exc:
        if isinstance(exc, GatedRepoError):
            return
        raise FileNotFoundError(f"`{argument}`: {model_id!r} is neither a local path nor a model the Hugging Face "
                                f"hub knows (or it is private: pass a `token`).") from exc
    except HfHubHTTPError:
        return
    except Exception as exc:  # the HTTP client's connection and timeout errors
        raise OSError(f"`{argument}`: cannot reach the Hugging Face hub to download {model_id!r} "
                      f"({type(exc).__name__}: {exc}), and it {where}: {fix}, or set HF_HUB_OFFLINE=1 to use cached "
                      "models only.") from exc


def is_adapter_dir(path: str | Path | None) -> bool:
    """Whether `path` is a PEFT adapter folder (it holds ``adapter_config.json``)."""
    return path is not None and (Path(path).expanduser() / "adapter_config.json").exists()


def check_adapter_dir(adapter: Any, argument: str = "adapter") -> None:
    """None, or a PEFT adapter folder; anything else is a FileNotFoundError naming `argument`."""
    if adapter is not None and not is_adapter_dir(adapter):
        raise FileNotFoundError(f"`{argument}`: {adapter!r} is not a PEFT adapter directory "
                                f"(no adapter_config.json there).")


__all__ = ["GGUF_MAGIC", "check_adapter_dir", "check_choice", "check_hub_model", "check_int", "check_llm_name",
           "check_model_name", "check_number", "is_adapter_dir", "is_gguf", "looks_like_local_path"]
