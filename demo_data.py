"""Write a small, learnable vision-language dataset: coloured shapes with questions about them.

    python demo_data.py OUT_DIR [--count 16] [--seed 0]

writes OUT_DIR/images/*.png and OUT_DIR/train.json (relative image paths, resolved against
the JSON file's folder). Most images are small enough to stay whole; some are wide, so the
slicing path is exercised too. One record has two images, one has none.
"""

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
QUESTION = "What is in the image?"


def draw_shape(shape, colour, size, rng):
    width, height = size
    image = Image.new("RGB", size, (245, 245, 245))
    draw = ImageDraw.Draw(image)
    # Large and near the centre: a tiny vision tower can tell the shapes apart in a few hundred steps.
    side = min(width, height) * rng.uniform(0.9, 0.95)
    cx = width / 2 + rng.uniform(-0.02, 0.02) * width
    cy = height / 2 + rng.uniform(-0.02, 0.02) * height
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=COLOURS[colour])
    return image


def generate(out_dir, count=16, seed=0, wide_every=4):
    """Write the dataset and return the path of its JSON file."""
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    combos = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    rng.shuffle(combos)
    records = []
    for i in range(count):
        colour, shape = combos[i % len(combos)]
        size = (224, 112) if wide_every and i % wide_every == wide_every - 1 else (112, 112)
        name = f"images/shape_{i:02d}.png"
        draw_shape(shape, colour, size, rng).save(out_dir / name)
        records.append(
            {
                "id": f"shape-{i:02d}",
                "image": name,
                "conversations": [
                    {"role": "user", "content": f"<image>\n{QUESTION}"},
                    {"role": "assistant", "content": f"a {colour} {shape}"},
                ],
            }
        )
    first, second = records[0], records[1]
    records.append(
        {
            "id": "two-shapes",
            "image": {"<image_00>": first["image"], "<image_01>": second["image"]},
            "conversations": [
                {"role": "user", "content": "<image_00>\n<image_01>\nWhat are the two shapes?"},
                {
                    "role": "assistant",
                    "content": f"{first['conversations'][1]['content']} and {second['conversations'][1]['content']}",
                },
            ],
        }
    )
    records.append(
        {
            "id": "text-only",
            "conversations": [
                {"role": "user", "content": "How many sides does a triangle have?"},
                {"role": "assistant", "content": "three"},
            ],
        }
    )
    path = out_dir / "train.json"
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False))
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--count", type=int, default=16, help="single-image records")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(generate(args.out_dir, args.count, args.seed))


if __name__ == "__main__":
    main()
