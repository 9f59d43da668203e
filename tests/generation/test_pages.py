"""Handing back the clean file-mapped pages of weights once the packed decoder holds its own copy (issue 15)."""

import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from expandr_haystack.generation.local import default_decoder
from expandr_haystack.generation.pages import Mapping, read_mappings, release_clean_file_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux's")


def mapping_of(tensor):
    address = tensor.untyped_storage().data_ptr()
    return next(m for m in read_mappings() if m.start <= address < m.end)


def mapped_tensor(tmp_path, n=1 << 20):
    values = torch.randn(n)
    path = tmp_path / "weights.bin"
    values.numpy().tofile(path)
    return values, torch.from_file(str(path), shared=False, size=n, dtype=torch.float32)


def test_clean_file_pages_are_handed_back_and_read_again(tmp_path):
    values, mapped = mapped_tensor(tmp_path)
    assert torch.equal(mapped, values)  # every page read: resident
    assert mapping_of(mapped).rss >= 3 << 20
    freed = release_clean_file_pages([mapped])
    assert freed >= 3 << 20
    assert mapping_of(mapped).rss < 1 << 20
    assert torch.equal(mapped, values)  # the same bytes, faulted back in from the file


def test_written_pages_and_anonymous_tensors_are_left_alone(tmp_path):
    values, mapped = mapped_tensor(tmp_path)
    mapped[10] = 123.0  # a weight changed in place: its page is a private copy that only memory holds
    assert release_clean_file_pages([mapped]) == 0
    assert mapped[10].item() == 123.0 and torch.equal(mapped[11:], values[11:])
    anonymous = torch.randn(1 << 20)
    before = anonymous.clone()
    assert release_clean_file_pages([anonymous]) == 0
    assert torch.equal(anonymous, before)


@torch.inference_mode()
def test_packing_a_memory_mapped_model_hands_its_pages_back_and_the_model_still_runs(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=131, hidden_size=64, intermediate_size=4096, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path)  # ~9 MB of weights in one safetensors file
    model = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[5, 9, 17, 33, 40]])
    reference = model(input_ids=ids).logits  # reads every weight
    weights = mapping_of(model.model.layers[0].mlp.up_proj.weight)
    assert weights.path.endswith(".safetensors") and weights.rss >= 4 << 20
    default_decoder(model, "packed")
    assert mapping_of(model.model.layers[0].mlp.up_proj.weight).rss < weights.rss // 4
    assert torch.equal(model(input_ids=ids).logits, reference)


def test_smaps_entries_are_read_and_only_clean_private_regular_files_count_as_clean(tmp_path):
    spaced = tmp_path / "a folder" / "weights.safetensors"
    spaced.parent.mkdir()
    spaced.write_bytes(b"0" * 8192)
    entry = """{range} {perms} 00000000 fe:00 123                        {path}
Size:                  8 kB
Rss:                   8 kB
Anonymous:             {anonymous} kB
Swap:                  {swap} kB
Private_Hugetlb:       0 kB
VmFlags: rd mr mw me{flags}
"""
    smaps = tmp_path / "smaps"
    smaps.write_text(
        entry.format(range="1000-3000", perms="rw-p", path=spaced, anonymous=0, swap=0, flags="")  # clean
        + entry.format(range="3000-5000", perms="rw-p", path=spaced, anonymous=4, swap=0, flags="")  # written
        + entry.format(range="5000-7000", perms="rw-p", path=spaced, anonymous=0, swap=4, flags="")  # swapped
        + entry.format(range="7000-9000", perms="rw-s", path=spaced, anonymous=0, swap=0, flags="")  # shared
        + entry.format(range="9000-b000", perms="rw-p", path=spaced, anonymous=0, swap=0, flags=" io")  # device
        + entry.format(range="b000-d000", perms="rw-p", path=f"{spaced} (deleted)", anonymous=0, swap=0, flags="")
        + "d000-f000 rw-p 00000000 00:00 0 \nRss: 8 kB\nAnonymous: 8 kB\n"  # anonymous memory
        + f"f000-11000 r--p 00000000 fe:00 123 {spaced}\nRss: 8 kB\n"  # smaps without the other fields
    )
    mappings = read_mappings(str(smaps))
    assert [(m.start, m.end) for m in mappings][:2] == [(0x1000, 0x3000), (0x3000, 0x5000)]
    assert mappings[0].path == str(spaced) and mappings[0].rss == 8192 and "me" in mappings[0].flags
    assert [m.clean_file_mapping for m in mappings] == [True] + [False] * 7
    assert not Mapping(0, 1, "r--p", str(spaced)).clean_file_mapping  # nothing known: never clean
