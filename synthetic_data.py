"""Synthetic PubMedVision-style data for tests, benchmarks and the demo: records plus small real JPEGs.

Each image is a flat background of one colour with a shape drawn on it; the answer names that colour and shape,
so a model can only answer well by looking at the image, and training is seen to learn.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
MODALITIES = (
    "Computed Tomography",
    "Magnetic Resonance Imaging",
    "Digital Photography",
    "Microscopy Images",
    "X-Ray",
    "Ultrasound",
)
BODY_PARTS = ("Chest", "Brain", "Abdomen", "Knee", "Cell", "Skin")
JSON_NAME = "PubMedVision_InstructionTuning_VQA.json"


def _question(n_images: int) -> str:
    if n_images == 1:
        return "What colour is the background of this image, and which shape is drawn on it?"
    return "What colours are the backgrounds of these images, and which shapes are drawn on them?"


def _answer(picks: list[tuple[str, str]]) -> str:
    return (
        " ".join(f"Image {i + 1}: a {shape} on {colour}." for i, (colour, shape) in enumerate(picks))
        if len(picks) > 1
        else f"A {picks[0][1]} on {picks[0][0]}."
    )


def make_records(num_records: int, seed: int = 0, multi_image_fraction: float = 0.2) -> Iterator[tuple[dict, list]]:
    """Yield (record, [(colour, shape), ...]) pairs; the record is shaped like PubMedVision's."""
    rng = random.Random(seed)
    colours = list(COLOURS)
    for i in range(num_records):
        n_images = 2 if rng.random() < multi_image_fraction else 1
        picks = [(rng.choice(colours), rng.choice(SHAPES)) for _ in range(n_images)]
        record = {
            "id": f"syn-{i:07d}",
            "image": [f"images/syn_{i:07d}_{j}.jpg" for j in range(n_images)],
            "conversations": [
                {"from": "human", "value": _question(n_images)},
                {"from": "gpt", "value": _answer(picks)},
            ],
            "modality": rng.choice(MODALITIES),
            "body_part": rng.choice(BODY_PARTS),
        }
        yield record, picks


def draw_image(colour: str, shape: str, size: int, rng: random.Random):
    """A JPEG-ready PIL image: `colour` background, a white `shape` at a random place and size."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), COLOURS[colour])
    draw = ImageDraw.Draw(image)
    r = rng.randint(size // 6, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=(255, 255, 255))
    elif shape == "square":
        draw.rectangle(box, fill=(255, 255, 255))
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=(255, 255, 255))
    return image


def write_dataset(
    output_dir: str | os.PathLike,
    num_records: int = 300,
    seed: int = 0,
    image_size: int = 64,
    multi_image_fraction: float = 0.2,
    with_images: bool = True,
) -> Path:
    """Write `<output_dir>/PubMedVision_InstructionTuning_VQA.json` and `<output_dir>/images/*.jpg`; return the JSON."""
    output_dir = Path(output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 1)
    records = []
    for record, picks in make_records(num_records, seed, multi_image_fraction):
        if with_images:
            for rel_path, (colour, shape) in zip(record["image"], picks, strict=True):
                draw_image(colour, shape, image_size, rng).save(output_dir / rel_path, quality=90)
        records.append(record)
    json_path = output_dir / JSON_NAME
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records))
    tmp.replace(json_path)
    return json_path


def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description="Write synthetic PubMedVision-style records and images."
    )
    parser.add_argument("--output_dir", default="demo/PubMedVision", help="dataset folder (JSON + images/)")
    parser.add_argument("--num_records", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image_size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--multi_image_fraction", type=float, default=0.2, help="share of records with 2 images")
    parser.add_argument("--no_images", action="store_true", help="write the records only (for split benchmarks)")
    args = parser.parse_args()
    path = write_dataset(
        args.output_dir, args.num_records, args.seed, args.image_size, args.multi_image_fraction, not args.no_images
    )
    print(f"Wrote {args.num_records} records to {path}")


if __name__ == "__main__":
    main()
