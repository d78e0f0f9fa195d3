import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sspo.io import sort_safetensors_metadata

METADATA = {"format": "pt", "lora_adapter_metadata": json.dumps({"r": 4, "target_modules": ["to_k", "to_q"]}, indent=2)}
TENSORS = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.weight": torch.ones(3, dtype=torch.float16)}


def with_metadata_in_order(path, keys) -> None:
    """Rewrite ``path``'s header with its metadata in the order ``keys``, as another process's save may list it."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = {key: header["__metadata__"][key] for key in keys}
    text = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    path.write_bytes(data[:8] + text + data[8 + length :])


def test_two_saves_listing_the_metadata_in_different_orders_become_the_same_bytes(tmp_path):
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    for path, order in ((first, ["format", "lora_adapter_metadata"]), (second, ["lora_adapter_metadata", "format"])):
        save_file(TENSORS, str(path), metadata=METADATA)
        with_metadata_in_order(path, order)
    assert first.read_bytes() != second.read_bytes()
    for path in (first, second):
        sort_safetensors_metadata(path)
    assert first.read_bytes() == second.read_bytes()
    with safe_open(str(first), framework="pt") as f:
        assert f.metadata() == METADATA
    loaded = load_file(str(first))
    assert all(torch.equal(loaded[key], tensor) for key, tensor in TENSORS.items())


def test_sorting_an_already_sorted_header_changes_no_byte(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(TENSORS, str(path), metadata=METADATA)
    with_metadata_in_order(path, sorted(METADATA))
    written = path.read_bytes()
    sort_safetensors_metadata(path)
    assert path.read_bytes() == written
