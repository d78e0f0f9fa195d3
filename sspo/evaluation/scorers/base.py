"""What every scorer shares: the batching ``score`` loop, optional imports and weight-file loading."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from sspo.errors import ModelError, SSPOError

_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".json")


class Scorer:
    """Scores (image, prompt) pairs; higher is better.

    Subclasses implement :meth:`_score_batch`; :meth:`score` validates the inputs, batches them and
    runs without autograd, so every scorer returns a float32 CPU tensor of shape ``[N]``.
    """

    name = "scorer"

    input_type: type = Image.Image  # what it scores: images (clips for the moving-shapes world)

    def __init__(self, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 16):
        if batch_size < 1:
            raise SSPOError(f"{self.name}: batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        images, prompts = list(images), list(prompts)
        if len(images) != len(prompts):
            raise SSPOError(
                f"{self.name}: got {len(images)} images but {len(prompts)} prompts; pass one prompt per image"
            )
        for i, image in enumerate(images):
            if not isinstance(image, self.input_type):
                raise SSPOError(f"{self.name}: image {i} is a {type(image).__name__}, expected a {self.input_type.__module__.split('.')[0]}.{self.input_type.__name__}")
        scores = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                stop = start + self.batch_size
                batch = self._score_batch([im.convert("RGB") if isinstance(im, Image.Image) else im for im in images[start:stop]], prompts[start:stop])
                scores.append(batch.detach().float().reshape(-1).cpu())
        return torch.cat(scores) if scores else torch.empty(0)

    def score_parts(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The score (key ``""``) and, for a scorer made of parts, each part by name."""
        return {"": self.score(images, prompts)}

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device}, dtype={self.dtype}, batch_size={self.batch_size})"


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency, or fail with the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SSPOError(f"{purpose} needs the '{module}' package: pip install 'sspo[{extra}]'") from None


def _looks_local(path_or_id: str) -> bool:
    # Hub ids are "org/name"; anything path-like or naming a weight file is meant to be on disk.
    return path_or_id.startswith(("/", ".", "~")) or path_or_id.lower().endswith(_WEIGHT_SUFFIXES)


def _probe_hub(path_or_id: str) -> None:
    """For a hub id (neither on disk nor path-like): one probe of the hub, not a minute of retries per file."""
    if not Path(path_or_id).expanduser().exists() and not _looks_local(path_or_id):
        from sspo.models.pipeline import check_hub

        check_hub(path_or_id)


def resolve_file(path_or_id: str, filename: str, what: str, *, optional: bool = False) -> Path | None:
    """Find ``filename`` for ``path_or_id``: a file itself, a folder holding it, a URL, or a hub repo id.

    ``optional`` returns None instead of failing when a folder or repo simply lacks the file.
    """
    path = Path(path_or_id).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / filename).is_file():
            return path / filename
        if optional:
            return None
        raise ModelError(f"{what}: folder {path} has no {filename}")
    if path_or_id.startswith(("http://", "https://")):
        return _download_url(path_or_id, what)
    if _looks_local(path_or_id):
        raise ModelError(f"{what}: no such file or folder: {path_or_id}")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    _probe_hub(path_or_id)
    try:
        return Path(hf_hub_download(path_or_id, filename))
    except EntryNotFoundError:
        if optional:
            return None
        raise ModelError(f"{what}: hub repo {path_or_id!r} has no file {filename}") from None
    except Exception as exc:  # network, auth, bad id: all end the same way for the user
        raise ModelError(
            f"{what}: cannot download {filename} from hub repo {path_or_id!r} ({type(exc).__name__}: {exc}). "
            f"Download it yourself and pass its local path instead."
        ) from None


def _download_url(url: str, what: str) -> Path:
    from sspo.paths import cache_root

    target = cache_root() / "scorers" / url.rstrip("/").rsplit("/", 1)[-1].replace("%2B", "+")
    if not target.is_file():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(target), progress=True)
        except Exception as exc:
            raise ModelError(f"{what}: cannot download {url} ({exc}); download it yourself and pass its path") from None
    return target


def load_weights(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A flat state dict from safetensors or a ``torch.save`` file, never unpickling arbitrary objects.

    Unwraps the ``{"state_dict": ...}`` / ``{"model": ...}`` envelopes training scripts save, and the
    ``module.`` prefix DataParallel adds.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            lines = str(exc).splitlines() or [type(exc).__name__]
            reason = next((line.strip() for line in lines if "Unsupported global" in line), lines[0])
            convert = (
                f"import torch, safetensors.torch as st; sd = torch.load('{path}', weights_only=False); "
                f"sd = sd.get('state_dict', sd); "
                f"st.save_file({{k: v.contiguous() for k, v in sd.items()}}, '{path.with_suffix('.safetensors')}')"
            )
            raise ModelError(
                f"{what}: {path} cannot be loaded safely; torch.load(weights_only=True) refused it ({reason}). "
                f"If you trust the file, convert it once to safetensors and pass that instead: python -c \"{convert}\""
            ) from None
    for envelope in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(envelope), dict):
            state = state[envelope]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{what}: {path} does not hold a state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def rename_key(key: str, table: dict[str, str]) -> str | None:
    """``key`` renamed by the first entry of ``table`` that is it, or (ending in '.') a prefix of it; None if none is."""
    for old, new in table.items():
        if key == old or (old.endswith(".") and key.startswith(old)):
            return new + key[len(old):]
    return None


def check_keys(expected: dict[str, torch.Size], got: dict[str, torch.Tensor], what: str) -> None:
    """Fail with the offending key names when a converted state dict does not fit its model exactly."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if tuple(expected[k]) != tuple(got[k].shape))
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            shown = ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ModelError(f"{what}: the weights do not match the model; " + "; ".join(problems))


def hf_from_state_dict(model_cls, config, state_dict: dict[str, torch.Tensor], what: str, **model_kwargs):
    """Build a transformers model from a converted state dict, checked key by key first.

    The shape check runs on a meta-device copy (no memory, no random init); ``from_pretrained`` with
    an explicit state dict then loads without initialising billions of parameters we overwrite.
    """
    with torch.device("meta"):
        expected = {k: v.shape for k, v in model_cls(config, **model_kwargs).state_dict().items()}
    check_keys(expected, state_dict, what)
    model = model_cls.from_pretrained(None, config=config, state_dict=state_dict, **model_kwargs)
    return model.eval().requires_grad_(False)


def from_pretrained(loader, path_or_id: str, what: str, **kwargs):
    """``loader.from_pretrained`` with hub / file errors turned into one ModelError that names the source."""
    _probe_hub(path_or_id)
    try:
        return loader.from_pretrained(path_or_id, **kwargs)
    except Exception as exc:
        raise ModelError(
            f"cannot load the {what} from {path_or_id!r} ({type(exc).__name__}: {exc}). "
            f"Pass a local folder saved with save_pretrained, or check the hub id and your network."
        ) from None
