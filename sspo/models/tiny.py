"""Tiny but real diffusers components: the shapes world's "Stable Diffusion", built offline.

Every component is a stock diffusers / transformers class with small sizes, so that
``StableDiffusionPipeline.from_pretrained(folder)`` loads the result with no sspo import, and
every code path of the trainer is exercised exactly as with SD-1.5.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from sspo.config import check

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread for a while: tiny models gain little from more, on a small shared CPU threads
    spinning against other processes slow them many times over, and float sums split over threads
    differ from machine to machine, so one thread also makes a result the same everywhere."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclasses.dataclass
class TinySize:
    """Sizes of the tiny model. ``default`` is the demo's base model; ``quick`` is for tests;
    ``64px`` is ``default`` at 64x64 pixels, whose 16x16 latents average a per-sample error over
    4x more elements (SD-1.5's are 64x64)."""

    image_size: int = 32
    text_hidden: int = 64
    text_layers: int = 2
    # 3 blocks: 32x32 images -> 8x8 latents; 64 channels at 8x8 sharpen the round trip for ~30% more compute
    vae_channels: tuple[int, ...] = (16, 32, 64)
    unet_channels: tuple[int, ...] = (32, 64)
    unet_layers_per_block: int = 1
    latent_channels: int = 8  # 8x8x4 latents round-trip shapes too softly; 8 channels keep more

    def __post_init__(self) -> None:
        check(self.image_size % 2 ** (len(self.vae_channels) - 1) == 0, "image_size", "must divide by the VAE's downsampling")
        check(self.text_hidden % 16 == 0, "text_hidden", "must be a multiple of 16")

    @classmethod
    def preset(cls, name: str) -> TinySize:
        presets = {
            "default": cls(),
            "quick": cls(text_hidden=32, vae_channels=(8, 16, 16), unet_channels=(16, 32)),
            "64px": cls(image_size=64),
        }
        check(name in presets, "size", f"got {name!r}, expected one of {', '.join(presets)}")
        return presets[name]


def write_word_tokenizer(folder: str | Path, words: Sequence[str], max_length: int = 16):
    """Write a CLIP tokenizer (vocab.json + merges.txt) in which every world word is one token.

    The merges are byte-pair merges learned on the words with CLIP's ``</w>`` end-of-word
    suffix, so stock ``CLIPTokenizer`` reproduces them exactly.
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet, merges = _learn_bpe(words)
    merged = list(dict.fromkeys(a + b for a, b in merges))
    vocab = {token: i for i, token in enumerate([BOS, EOS, *alphabet, *merged])}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"),
        bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS, model_max_length=max_length,
    )
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        check(len(ids) == 1, "tokenizer", f"world word {word!r} tokenizes to {len(ids)} tokens, expected 1")
    tokenizer.save_pretrained(folder)
    return tokenizer


def write_t5_tokenizer(folder: str | Path, words: Sequence[str], max_length: int = 16):
    """Write a T5 tokenizer (``tokenizer.json``) in which every world word is one token.

    A SentencePiece-style unigram vocabulary of the words (with and without the word-start marker)
    and their characters, so any text still tokenizes; stock ``T5TokenizerFast.from_pretrained``
    loads it, as FLUX's and SD3's pipelines do.
    """
    from transformers import T5TokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    words = sorted(set(words))
    characters = sorted({c for word in words for c in word})
    # Whole words score above their pieces, so the unigram model keeps each word one token.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(f"\u2581{word}", -1.0) for word in words] + [(word, -1.5) for word in words] + [(c, -10.0) for c in characters]
    tokenizer = T5TokenizerFast(vocab=list(dict.fromkeys(vocab)), extra_ids=0, model_max_length=max_length)
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        check(len(ids) == 1, "tokenizer", f"world word {word!r} tokenizes to {len(ids)} tokens, expected 1")
    tokenizer.save_pretrained(folder)
    return T5TokenizerFast.from_pretrained(folder)


def _learn_bpe(words: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Byte-pair encoding learned on ``words`` until each is one token: (alphabet, merges).

    Written out rather than taken from ``tokenizers``, whose trainer breaks ties between equally
    frequent pairs in hash-map order: its merges, token ids and so the built models changed from
    run to run. Here ties go to the alphabetically first pair.
    """
    pieces = [tuple(word[:-1]) + (word[-1] + "</w>",) for word in sorted(set(words))]
    alphabet = sorted({piece for word in pieces for piece in word})
    merges = []
    while True:
        counts = Counter(pair for word in pieces for pair in zip(word, word[1:]))
        if not counts:
            return alphabet, merges
        pair = min(counts, key=lambda p: (-counts[p], p))
        merges.append(pair)
        pieces = [_merge_pair(word, pair) for word in pieces]


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def build_components(size: TinySize, tokenizer, words: Sequence[str], seed: int = 0) -> dict:
    """A fixed word-table text encoder, randomly initialised VAE and UNet, and the scheduler.

    The UNet also reads a pooled text embedding (``addition_embed_type="text"``: attention pooling
    of the encoder's hidden states, added to the time embedding), so the prompt reaches every
    ResNet block, not only the cross-attention layers; stock ``StableDiffusionPipeline`` needs
    nothing extra for it.
    """
    text_encoder = word_table_text_encoder(text_encoder_for(size, tokenizer), tokenizer, words, seed)
    vae = vae_for(size)
    unet = unet_for(
        size,
        cross_attention_dim=size.text_hidden,
        addition_embed_type="text",
        addition_embed_type_num_heads=max(1, size.text_hidden // 16),
    )
    return {"text_encoder": text_encoder, "vae": vae, "unet": unet, "scheduler": scheduler_for(zero_terminal_snr=True)}


def word_table_text_encoder(text_encoder, tokenizer, words: Sequence[str], seed: int = 0, positions: bool = False):
    """Make a stock ``CLIPTextModel`` a fixed table of orthogonal word vectors (not trained).

    A text encoder co-trained with the tiny UNet collapses the prompts ('left' and 'right' end up
    at cosine 0.998), and a random frozen one mixes tokens through its causal attention, so the
    UNet cannot tell the attributes apart. Here every world word (and BOS/EOS) gets its own
    orthogonal, zero-mean vector of norm sqrt(d), and every layer's ``out_proj`` and ``fc2`` are
    zeroed: each residual layer is then the identity and the final LayerNorm leaves a zero-mean
    vector of norm sqrt(d) unchanged, so the hidden state of a token *is* its word's vector.

    Without ``positions`` the prompt is a bag of words, which the image world's attributes are.
    "moving from left to right" and "from right to left" are the same bag: with ``positions``
    every position gets its own vector too, orthogonal to the words', and a token's hidden state
    is ``(word + position) / sqrt(2)``.
    """
    import torch

    hidden = text_encoder.config.hidden_size
    ids = sorted({tokenizer.convert_tokens_to_ids(t) for t in tokenizer.tokenize(" ".join(words))} | {tokenizer.bos_token_id, tokenizer.eos_token_id})
    places = tokenizer.model_max_length if positions else 0
    check(len(ids) + places < hidden, "text_hidden", f"needs more than {len(ids) + places} dimensions for orthogonal word (and position) vectors")
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(hidden, hidden, generator=generator)
    basis -= basis.mean(dim=0, keepdim=True)  # columns in the zero-mean subspace
    q, _ = torch.linalg.qr(basis[:, : len(ids) + places])  # the words' columns do not depend on `places`
    with torch.no_grad():
        model = getattr(text_encoder, "text_model", text_encoder)  # CLIPTextModelWithProjection wraps a CLIPTextModel
        embeddings = model.embeddings
        embeddings.token_embedding.weight.zero_()
        embeddings.token_embedding.weight[ids] = q[:, : len(ids)].T * hidden**0.5
        embeddings.position_embedding.weight.zero_()
        embeddings.position_embedding.weight[:places] = q[:, len(ids) :].T * hidden**0.5
        for layer in model.encoder.layers:
            for linear in (layer.self_attn.out_proj, layer.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
    return text_encoder.requires_grad_(False).eval()


def video_size(preset: str) -> TinySize:
    """Sizes of the moving-shapes world's models: both worlds' words need more orthogonal word
    vectors than the quick preset's 32 dimensions hold."""
    return dataclasses.replace(TinySize.preset(preset), text_hidden=64)


def motion_adapter_for(unet, max_frames: int = 32, heads: int = 4, seed: int = 0, identity: bool = True):
    """AnimateDiff motion modules that fit ``unet`` (``identity``: leaving it unchanged at first).

    Channels, layers and norm groups are the UNet's (diffusers checks none of them; a mismatch
    fails deep in a forward, or silently for the norm groups). A fresh ``MotionAdapter`` is not
    zero-initialised: with ``identity`` its ``proj_out`` layers are zeroed, so every motion module
    starts as the identity and the video model equals the image model frame by frame. (A LoRA on
    the motion attention of such an adapter cannot learn: no gradient passes a zero ``proj_out``.
    A pretrained adapter, as AnimateDiff's, has none.)
    """
    import torch
    from diffusers import MotionAdapter

    torch.manual_seed(seed)
    config = unet.config
    adapter = MotionAdapter(
        block_out_channels=tuple(config.block_out_channels), motion_layers_per_block=config.layers_per_block,
        motion_norm_num_groups=config.norm_num_groups, motion_num_attention_heads=heads, motion_max_seq_length=max_frames,
    )
    with torch.no_grad():
        for name, module in adapter.named_modules():
            if identity and name.endswith("proj_out"):
                module.weight.zero_()
                module.bias.zero_()
    return adapter


def video_components(size: TinySize, text_encoder, seed: int = 0) -> tuple[dict, object]:
    """The components of a tiny AnimateDiff model around ``text_encoder`` (a randomly initialised
    video denoiser, its motion modules the identity, and the rescaled v-prediction schedule), and
    the motion adapter the denoiser was made with (:func:`video_pipeline` saves the trained one)."""
    from diffusers import UNetMotionModel

    image_denoiser = unet_for(size, cross_attention_dim=size.text_hidden)
    adapter = motion_adapter_for(image_denoiser, seed=seed)
    denoiser = UNetMotionModel.from_unet2d(image_denoiser, adapter)
    return {"text_encoder": text_encoder, "unet": denoiser, "scheduler": scheduler_for(zero_terminal_snr=True)}, adapter


def video_pipeline(vae, tokenizer, adapter, components: dict):
    """The ``AnimateDiffPipeline`` of :func:`video_components` as trained: its ``motion_adapter``
    holds the denoiser's motion modules as they are now."""
    from diffusers import AnimateDiffPipeline

    from sspo.models.families.animatediff import motion_adapter_of

    return AnimateDiffPipeline(vae=vae, tokenizer=tokenizer, motion_adapter=motion_adapter_of(adapter, components["unet"]), **components)


def text_encoder_for(size: TinySize, tokenizer, with_projection: bool = False):
    """A randomly initialised CLIP text encoder of ``size`` over ``tokenizer``'s words (``with_projection``: SDXL's second)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.text_hidden,
        intermediate_size=size.text_hidden * 4,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_hidden // 16,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=size.text_hidden,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def vae_for(size: TinySize):
    """A randomly initialised ``AutoencoderKL`` of ``size``."""
    from diffusers import AutoencoderKL

    n_vae = len(size.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_vae,
        up_block_types=("UpDecoderBlock2D",) * n_vae,
        block_out_channels=size.vae_channels,
        layers_per_block=1,
        latent_channels=size.latent_channels,
        norm_num_groups=min(size.vae_channels) // 2,
        sample_size=size.image_size,
    )


def unet_for(size: TinySize, cross_attention_dim: int, **extra):
    """A randomly initialised ``UNet2DConditionModel`` of ``size`` (``extra``: more of its config)."""
    from diffusers import UNet2DConditionModel

    n_unet = len(size.unet_channels)
    return UNet2DConditionModel(
        sample_size=size.image_size // 2 ** (len(size.vae_channels) - 1),
        in_channels=size.latent_channels,
        out_channels=size.latent_channels,
        block_out_channels=size.unet_channels,
        layers_per_block=size.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (n_unet - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n_unet - 1),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=min(size.unet_channels) // 2,
        **extra,
    )


def scheduler_for(zero_terminal_snr: bool = False):
    """SD-1.5's noise schedule with DDIM, or (``zero_terminal_snr``) the tiny worlds' rescaled v-prediction one."""
    from diffusers import DDIMScheduler

    # SD-1.5's noise schedule; DDIM is its usual fast sampler.
    sd15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False)
    if zero_terminal_snr:
        # SD-1.5's schedule leaves signal at t=T (alpha_bar 0.005). On an 8x8 latent the initial
        # noise's per-channel mean (std 1/8) is then mistaken for that signal: samples took
        # their background from the seed, not the prompt. Rescaled to zero terminal SNR, with
        # v-prediction and trailing timesteps (Lin et al. 2024; SD-2.1's prediction type).
        return DDIMScheduler(**sd15, prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return DDIMScheduler(**sd15, steps_offset=1, prediction_type="epsilon")
