import json
import subprocess
import sys


from sspo.base import BaseConfig, build_base


def test_quick_base_is_cached_and_deterministic_config(quick_base):
    again = build_base(BaseConfig.preset("quick"))
    assert str(again) == quick_base  # the second call reuses the cache
    info = json.loads((again / "sspo_base.json").read_text())
    assert info["config"]["size"] == "quick"
    assert BaseConfig.preset("quick").cache_key() != BaseConfig().cache_key()


def test_base_loads_with_plain_diffusers_and_no_sspo_import(quick_base):
    code = (
        "import sys, torch\n"
        "from diffusers import StableDiffusionPipeline\n"
        f"pipe = StableDiffusionPipeline.from_pretrained({quick_base!r})\n"
        "out = pipe('a large red circle on the left, white background', num_inference_steps=2, output_type='np').images\n"
        "assert out.shape == (1, 32, 32, 3), out.shape\n"
        "assert not any(m == 'sspo' or m.startswith('sspo.') for m in sys.modules)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok" in result.stdout


def test_world_words_are_single_tokens(quick_base):
    from transformers import CLIPTokenizer

    from sspo.worlds.shapes import vocabulary

    tokenizer = CLIPTokenizer.from_pretrained(quick_base, subfolder="tokenizer")
    for word in vocabulary():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    ids = tokenizer("a small red circle on the left, white background").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.eos_token_id not in ids[1:-1]  # the comma is a real token, not unknown
