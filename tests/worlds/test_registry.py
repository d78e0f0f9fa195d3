"""The world registry: a throw-away world registered here (two colours, one shape) runs `sspo demo`
end to end -- its data, a few SFT and SSPO steps validated on it, its exact evaluation -- though no
file of sspo names it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sspo.commands.demo import run_demo
from sspo.errors import ConfigError
from sspo.io import write_parquet
from sspo.worlds import DemoSettings, TrainingDataRequest, World, find_world, register, unregister
from sspo.worlds.names import resolve_model
from sspo.worlds.world_data import Split, eval_prompts, pair_rows

NAME = "two-colours"
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40)}
WHITE = (245, 245, 245)


@dataclasses.dataclass(frozen=True, order=True)
class Disc:
    """The world's one attribute: the colour of a large disc in the center (shapes-world words, so
    the shapes world's tokenizer reads its prompts)."""

    color: str

    @property
    def prompt(self) -> str:
        return f"a large {self.color} circle in the center, white background"


def parse(prompt: str) -> Disc:
    found = [c for c in COLOURS if c in prompt.split()]
    if len(found) != 1 or prompt != Disc(found[0]).prompt:
        raise ConfigError(f"prompt {prompt!r} is not of the {NAME} world; expected 'a large <red|green> circle in the center, white background'")
    return Disc(found[0])


def render(disc: Disc, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), WHITE)
    ImageDraw.Draw(image).ellipse([size * 0.25, size * 0.25, size * 0.75, size * 0.75], fill=COLOURS[disc.color])
    return image


def evaluate(image, prompt: str) -> dict[str, float]:
    """Exact: ``presence`` is the share of the disc's area that differs from the background, ``color``
    the share of those pixels nearer the prompt's colour than the other's; the reward is their product."""
    pixels = np.asarray(image, dtype=np.float32).reshape(-1, 3)
    disc = parse(prompt)
    other = next(c for c in COLOURS if c != disc.color)
    drawn = np.linalg.norm(pixels - WHITE, axis=1) > 60
    presence = min(1.0, float(drawn.mean()) / (np.pi * 0.25**2))
    nearer = np.linalg.norm(pixels[drawn] - COLOURS[disc.color], axis=1) < np.linalg.norm(pixels[drawn] - COLOURS[other], axis=1)
    color = float(nearer.mean()) if drawn.any() else 0.0
    return {"color": color, "presence": presence, "reward": color * presence}


def png(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def world(tmp_path, quick_base):
    """The world, registered for one test: red is trained on, green held out; its base is the shapes world's quick one."""
    written = []

    def training_data(request: TrainingDataRequest) -> Path:
        rows = pair_rows([Disc("red")], request.pairs_per_prompt, request.split_seed, clean=lambda disc: png(render(disc, request.resolution)),
                         defective=lambda disc, rng, defect: png(render(Disc("green"), request.resolution)), defects=["wrong_color"], columns=("jpg_0", "jpg_1"))
        written.append(request)
        return write_parquet(tmp_path / f"pairs-{len(written)}.parquet", rows)

    config = tmp_path / "demo.yaml"
    config.write_text(f"""
model: {{pretrained: {NAME}-base, lora: true, lora_rank: 4, lora_alpha: 4}}
data: {{source: {NAME}, resolution: 32}}
optim: {{learning_rate: 1.0e-3, batch_size: 1}}
beta: 500.0
negatives: {{steps: 2, guidance_scale: 5.0, batch_size: 4}}
validation: {{every_iterations: 1, world_eval: true, prompts_per_split: 1}}
report_to: none
""")
    entry = World(
        name=NAME, clips=False, parse_prompt=parse,
        make_split=lambda seed: Split(train=(Disc("red"),), heldout=(Disc("green"),)),
        eval_specs=eval_prompts, training_data=training_data, pair_columns=("jpg_0", "jpg_1"),
        base=f"{NAME}-base", build_base=lambda preset, output=None, force=False: Path(resolve_model("shapes-base:quick")),
        find_base=lambda preset: Path(resolve_model("shapes-base:quick")),
        base_presets=("default",), base_pipeline="the shapes world's quick base", base_guidance_scale=5.0, evaluate=evaluate,
        components=("color", "presence", "reward"), table_columns=("color", "presence"),
        round_trip=lambda folder: {}, demo=DemoSettings(config, methods=("sft", "sspo"), prompts_per_split=1, sampler_steps=2),
    )
    register(entry)
    yield entry, written
    unregister(NAME)


def test_the_worlds_evaluator_is_exact():
    red = Disc("red")
    assert evaluate(render(red, 32), red.prompt)["reward"] > 0.9
    assert evaluate(render(Disc("green"), 32), red.prompt)["reward"] == 0.0
    assert evaluate(Image.new("RGB", (32, 32), WHITE), red.prompt)["reward"] == 0.0


def test_a_registered_world_runs_the_demo_end_to_end(world, tmp_path):
    entry, written = world
    results = run_demo(tmp_path / "demo", quick=True, world=NAME)
    assert list(results) == ["base", "sft", "sspo"]
    for scores in results.values():
        assert set(scores) == {"seen", "heldout"}  # red, trained on; green, held out
        assert all(0 <= s[NAME] <= 1 and {f"{NAME}.color", f"{NAME}.presence"} <= set(s) for s in scores.values())
    assert written and all(request.frames == 0 and request.resolution == 32 for request in written)  # data.source named the world
    table = (tmp_path / "demo" / "results.md").read_text()
    assert f"| {NAME}.color | {NAME}.presence |" in table and "gain vs base" in table
    for method in ("sft", "sspo"):  # the trainer's validation scored the world data.source names
        assert (tmp_path / "demo" / method / "validation.jsonl").read_text().count("reward_heldout") == 2
    assert (tmp_path / "demo" / "grid.png").is_file()


def test_nothing_in_sspo_names_the_throw_away_world(world):
    package = Path(__file__).resolve().parents[2] / "sspo"
    assert find_world(NAME) is world[0]
    assert not [path for path in package.rglob("*") if path.is_file() and path.suffix in (".py", ".yaml") and NAME in path.read_text()]


def test_a_world_name_or_base_is_registered_once(world):
    entry, _ = world
    with pytest.raises(ConfigError, match="already registered"):
        register(entry)
    with pytest.raises(ConfigError, match="already another world's"):
        register(dataclasses.replace(entry, name="another"))
