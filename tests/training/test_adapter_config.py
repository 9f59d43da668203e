"""
A saved LoRA adapter's bytes must not depend on the process: PEFT keeps `target_modules` as a set and writes it in the
string-hash order of the process (PYTHONHASHSEED), and the adapter's fingerprint keys the expansion cache and the
rows' seeds. Two tiny-cpu runs of one config once sampled different round-2 expansions from identical weights for
this reason; `sort_adapter_config` (called by `train_dpo` after saving) makes the file canonical.
"""

import json
import os
import subprocess
import sys

from expandr_haystack.models import fingerprint
from expandr_haystack.training.dpo import sort_adapter_config

SAVE = """
import sys
from peft import LoraConfig
LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM",
           base_model_name_or_path="base").save_pretrained(sys.argv[1])
"""


def test_sorted_adapter_config_is_the_same_bytes_whatever_the_hash_seed(tmp_path):
    folders, orders = [], set()
    for hash_seed in ("1", "2", "3", "4"):
        folder = tmp_path / f"adapter-{hash_seed}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-c", SAVE, str(folder)], check=True, env=env, timeout=300)
        orders.add(tuple(json.loads((folder / "adapter_config.json").read_text())["target_modules"]))
        sort_adapter_config(folder)
        folders.append(folder)
    saved = [json.loads((f / "adapter_config.json").read_text()) for f in folders]
    assert all(s["target_modules"] == ["o_proj", "q_proj", "v_proj"] for s in saved)
    assert len({(f / "adapter_config.json").read_bytes() for f in folders}) == 1
    assert len({fingerprint(f) for f in folders}) == 1
    assert all(set(order) == {"o_proj", "q_proj", "v_proj"} for order in orders)  # only the order could differ
    assert len(orders) > 1  # the hash seeds did write different orders: the sorting is what made them equal
    assert all(f.joinpath("adapter_config.json").stat().st_mode & 0o777 == 0o644 for f in folders)  # PEFT's mode


def test_sort_adapter_config_keeps_everything_else(tmp_path):
    config = {"r": 8, "target_modules": ["v_proj", "q_proj"], "modules_to_save": None, "layers_to_transform": [3, 1],
              "exclude_modules": ["b", "a"], "peft_type": "LORA"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "ref").mkdir()  # TRL saves the reference adapter inside the trained one: part of its fingerprint
    (tmp_path / "ref" / "adapter_config.json").write_text(json.dumps(config))
    assert sort_adapter_config(tmp_path) == [tmp_path / "adapter_config.json", tmp_path / "ref" / "adapter_config.json"]
    assert json.loads((tmp_path / "ref" / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    rewritten = json.loads((tmp_path / "adapter_config.json").read_text())
    assert rewritten == {**config, "target_modules": ["q_proj", "v_proj"], "exclude_modules": ["a", "b"]}
    assert rewritten["layers_to_transform"] == [3, 1]  # an ordered list is not a set: left as it is
    assert sort_adapter_config(tmp_path / "missing") == []  # no adapter_config.json: nothing to do, no error
