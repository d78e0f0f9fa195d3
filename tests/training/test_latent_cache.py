"""data.cache_latents: rows encoded once into safetensors shards train exactly like live encoding."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sspo.config import apply_overrides, from_dict
from sspo.errors import ConfigError
from sspo.io import DamagedFileError
from sspo.models.families import family_of
from sspo.models.pipeline import load_pipeline
from sspo.training import latent_cache
from sspo.training.config import TrainConfig
from sspo.training.latent_cache import FORMAT_VERSION, LatentCache, cache_key, data_digest, default_dir, encode_rows
from sspo.training.trainer import open_dataset, train

from test_trainer import metrics, tiny_config


@pytest.mark.parametrize("method", ["sspo", "dpo"])  # dpo: dataset losers come from the cache too
def test_cached_run_trains_like_an_uncached_one_and_encodes_once(method, quick_base, tmp_path, monkeypatch):
    cache = tmp_path / "latents"
    runs = {}
    for name, extra in (("live", []), ("cached", ["data.cache_latents=true", f"data.cache_dir={cache}"])):
        final = train(tiny_config(tmp_path / name, quick_base, f"method={method}", *extra))
        runs[name] = (metrics(tmp_path / name), load_file(final / "pytorch_lora_weights.safetensors"))
    assert json.loads((cache / "index.json").read_text())["rows"] == 64
    (rows_live, weights_live), (rows_cached, weights_cached) = runs["live"], runs["cached"]
    assert [r["step"] for r in rows_cached] == [1, 2, 3, 4]
    for a, b in zip(rows_live, rows_cached):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    for key in weights_live:
        torch.testing.assert_close(weights_live[key], weights_cached[key], rtol=1e-4, atol=1e-5)

    def no_encoding(*args, **kwargs):
        raise AssertionError("a complete latent cache was encoded again")

    monkeypatch.setattr(latent_cache, "encode_images", no_encoding)
    monkeypatch.setattr(latent_cache, "encode_rows", no_encoding)  # the rows' prompts and images; the empty prompt is encoded at start
    train(tiny_config(tmp_path / "again", quick_base, f"method={method}", "data.cache_latents=true", f"data.cache_dir={cache}"))
    assert metrics(tmp_path / "again") == rows_cached


def cache_of_24_rows(quick_base, tmp_path) -> dict:
    """``LatentCache.build``'s arguments for 24 rows of the quick world in ``tmp_path / "c"``, 10 rows a shard."""
    cfg = tiny_config(tmp_path / "run", quick_base, "data.max_samples=24")
    family = family_of(load_pipeline(quick_base))
    dataset = open_dataset(cfg)
    key = cache_key(cfg, quick_base, family, len(dataset), data_digest(cfg))
    return {"family": family, "dataset": dataset, "key": key, "root": tmp_path / "c", "device": "cpu", "batch_size": 8, "resolution": 32, "shard_rows": 10}


def count_encoded_rows(monkeypatch) -> list[int]:
    """The row indices the cache encodes from now on, in order (encoding itself unchanged)."""
    encoded = []

    def counting(family, items, *args, **kwargs):
        encoded.extend(item["index"] for item in items)
        return encode_rows(family, items, *args, **kwargs)

    monkeypatch.setattr(latent_cache, "encode_rows", counting)
    return encoded


def test_interrupted_build_resumes_at_the_missing_shards(quick_base, tmp_path, monkeypatch):
    build = cache_of_24_rows(quick_base, tmp_path)
    family, dataset = build["family"], build["dataset"]
    full = LatentCache.build(**build).rows(range(24))
    (tmp_path / "c" / "index.json").unlink()  # as if killed while writing the last shard
    (tmp_path / "c" / "shard-00002.safetensors").unlink()
    encoded = count_encoded_rows(monkeypatch)
    cache = LatentCache.build(**build)
    assert encoded == [20, 21, 22, 23]
    prompts, cond, winners, losers = cache.rows([23, 0, 11])
    assert prompts == [full[0][i] for i in (23, 0, 11)]
    assert torch.equal(winners, full[2][[23, 0, 11]]) and torch.equal(losers, full[3][[23, 0, 11]])
    assert torch.equal(cond.embeds, full[1].embeds[[23, 0, 11]])
    # Live encoding of the same rows gives the same tensors (up to batch rounding).
    live = encode_rows(family, [dataset[i] for i in (23, 0, 11)], "cpu", 32)
    assert live[0] == prompts
    torch.testing.assert_close(live[2], winners, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(live[1].embeds, cond.embeds, rtol=1e-4, atol=1e-5)


def test_damaged_shards_and_index_are_encoded_and_written_again(quick_base, tmp_path, monkeypatch, caplog):
    build = cache_of_24_rows(quick_base, tmp_path)
    full = LatentCache.build(**build).rows(range(24))
    shard = tmp_path / "c" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # cut short
    (tmp_path / "c" / "index.json").write_text("[]")
    encoded = count_encoded_rows(monkeypatch)
    cache = LatentCache.build(**build)
    assert encoded == list(range(10, 20))
    assert f"latent cache shard {shard} is damaged" in caplog.text and "the latent cache index" in caplog.text
    again = cache.rows(range(24))
    assert again[0] == full[0] and torch.equal(again[2], full[2]) and torch.equal(again[1].embeds, full[1].embeds)

    (tmp_path / "c" / "index.json").unlink()
    (tmp_path / "c" / "key.json").write_bytes(b"\x00garbage")
    with pytest.raises(DamagedFileError, match=rf"the latent cache key {tmp_path / 'c' / 'key.json'} is damaged \(.*\); delete {tmp_path / 'c'} to encode"):
        LatentCache.build(**build)


def test_a_folder_that_is_not_a_latent_cache_is_refused_and_left_as_it_was(quick_base, tmp_path):
    """Its index.json and shard-*.safetensors are a user's files, not damaged ones of the cache."""
    build = cache_of_24_rows(quick_base, tmp_path)
    folder = build["root"]
    folder.mkdir()
    (folder / "index.json").write_text('{"pages": ["home"]}\n')
    (folder / "shard-00000.safetensors").write_bytes(b"a user's weights")
    (folder / "notes.txt").write_text("my notes\n")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ConfigError, match=r"holds files that are not a latent cache \(index.json, notes.txt, shard-00000.safetensors; no key.json\); "
                                          "choose an empty or new folder"):
        LatentCache.build(**build)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_cache_dir_of_other_data_is_refused(quick_base, tmp_path):
    family = family_of(load_pipeline(quick_base))
    cfg = tiny_config(tmp_path / "run", quick_base, "data.max_samples=4")
    dataset = open_dataset(cfg)
    LatentCache.build(family, dataset, cache_key(cfg, quick_base, family, 4, data_digest(cfg)), tmp_path / "c", "cpu", 4, 32)
    other = tiny_config(tmp_path / "run", quick_base, "data.max_samples=4", "data.mode=random")
    with pytest.raises(ConfigError, match=r"data.cache_dir.*data.mode"):
        LatentCache.build(family, dataset, cache_key(other, quick_base, family, 4, data_digest(other)), tmp_path / "c", "cpu", 4, 32)
    index = json.loads((tmp_path / "c" / "index.json").read_text())
    index["key"]["version"] -= 1  # written by another version of sspo, which may have encoded the images otherwise
    (tmp_path / "c" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=rf"holds latents another version of sspo encoded \(format {FORMAT_VERSION - 1}, this one writes {FORMAT_VERSION}\); delete it"):
        LatentCache.build(family, dataset, cache_key(cfg, quick_base, family, 4, data_digest(cfg)), tmp_path / "c", "cpu", 4, 32)


def test_default_dir_is_shared_by_runs_that_encode_the_same_rows(quick_base, tmp_path):
    family = family_of(load_pipeline(quick_base))

    def folder(*overrides):
        cfg = tiny_config(tmp_path / "run", quick_base, *overrides)
        return default_dir(cache_key(cfg, quick_base, family, 64, data_digest(cfg)))

    assert folder("method=sft", "output_dir=a", "optim.learning_rate=0.1") == folder("method=sspo", "output_dir=b")
    assert folder() == folder("data.num_workers=2", "data.prefetch_factor=4")  # a resume may change how rows are read
    assert folder() != folder("data.resolution=16") and folder() != folder("data.mode=random")


@pytest.mark.parametrize("component", ["vae", "text_encoder", "text_encoder_3", "tokenizer_2"])
def test_editing_any_encoder_or_tokenizer_of_a_local_model_changes_the_key(component, tmp_path):
    from types import SimpleNamespace

    model = tmp_path / "model"
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3", "transformer"):
        (model / name).mkdir(parents=True)
        (model / name / "weights.safetensors").write_bytes(b"0")
    family = SimpleNamespace(vae=SimpleNamespace(dtype=torch.float32))
    cfg = tiny_config(tmp_path / "run", str(model))
    before = cache_key(cfg, str(model), family, 4, data_digest(cfg))
    (model / "transformer" / "weights.safetensors").write_bytes(b"trained")  # what training changes keeps the key
    assert cache_key(cfg, str(model), family, 4, data_digest(cfg)) == before
    (model / component / "weights.safetensors").write_bytes(b"edited")
    assert cache_key(cfg, str(model), family, 4, data_digest(cfg)) != before


@pytest.mark.parametrize("edited", ["metadata.jsonl", "an image", "a caption file"])
def test_editing_any_file_of_local_data_in_place_changes_the_key(edited, tmp_path):
    """The images and captions too, not only the tables: a cache keyed on metadata alone served an
    image edited in place (same name, same row) with its old latents."""
    from types import SimpleNamespace

    data = tmp_path / "data"
    data.mkdir()
    for name, content in (("metadata.jsonl", '{"file_name": "a.png", "text": "x"}\n'), ("a.png", "png"), ("a.txt", "x")):
        (data / name).write_text(content)
    family = SimpleNamespace(vae=SimpleNamespace(dtype=torch.float32))
    cfg = tiny_config(tmp_path / "run", "model", "data.source=imagefolder", f"data.path={data}")
    before = cache_key(cfg, "model", family, 1, data_digest(cfg))
    target = {"metadata.jsonl": "metadata.jsonl", "an image": "a.png", "a caption file": "a.txt"}[edited]
    (data / target).write_text((data / target).read_text() + " edited")
    assert cache_key(cfg, "model", family, 1, data_digest(cfg)) != before


@pytest.mark.parametrize("cache_dir", [None, "latents"])
def test_a_run_or_cache_folder_under_the_data_leaves_the_key_alone(cache_dir, tmp_path, monkeypatch):
    """A save, a cache build or a world base built into sspo's cache there changes files under
    data.path, but no data (with data.cache_dir set too: a base may be built after the start)."""
    from types import SimpleNamespace

    data = tmp_path / "data"
    data.mkdir()
    (data / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    monkeypatch.setenv("SSPO_CACHE", str(data / "cache"))
    family = SimpleNamespace(vae=SimpleNamespace(dtype=torch.float32))
    cfg = tiny_config(data / "run", "model", "data.source=imagefolder", f"data.path={data}",
                      *([f"data.cache_dir={data / cache_dir}"] if cache_dir else []))
    before = cache_key(cfg, "model", family, 1, data_digest(cfg))
    for folder in ("run", "cache", *([cache_dir] if cache_dir else [])):
        (data / folder).mkdir()
        (data / folder / "state.json").write_text("{}")
    assert cache_key(cfg, "model", family, 1, data_digest(cfg)) == before
    (data / "b.png").write_text("png")
    assert cache_key(cfg, "model", family, 1, data_digest(cfg)) != before


@pytest.mark.parametrize("setting, named", [("data.random_flip=true", "data.random_flip"), ("data.center_crop=false", "data.center_crop")])
def test_cache_with_augmentation_is_a_config_error(setting, named):
    data = apply_overrides({}, ["data.cache_latents=true", setting])
    with pytest.raises(ConfigError, match=rf"data.cache_latents.*{named}"):
        from_dict(TrainConfig, data)


def test_rows_skipped_while_the_cache_is_encoded_are_totalled_at_the_end(quick_base, tmp_path, caplog, monkeypatch):
    import logging

    from sspo.worlds.shapes.world import make_split, write_imagefolder

    folder = write_imagefolder(tmp_path / "images", make_split().train[:6])
    (folder / "00002.png").write_bytes(b"garbage")
    run = ["method=sft", "data.source=imagefolder", f"data.path={folder}", "data.cache_latents=true", f"data.cache_dir={tmp_path / 'latents'}"]
    digests = []  # each one stats every data file: a start takes one, for the cache key and the resume check
    monkeypatch.setattr(latent_cache, "local_files_digest", lambda *a, **k: digests.append(1) or "digest")
    with caplog.at_level(logging.WARNING, logger="sspo"):
        train(tiny_config(tmp_path / "run", quick_base, *run))
    assert "1 unreadable row was skipped in this run" in caplog.text
    assert len(digests) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sspo"):
        train(tiny_config(tmp_path / "again", quick_base, *run))  # the cache is read, no image
    assert "unreadable" not in caplog.text
