"""Training text for the tiny byte-level BPE: a few KB of chat-shaped English about coloured shapes.

Words the demo and the tests use (colours, shapes, digits, role names) become single tokens.
"""

COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "black", "white", "pink", "brown", "grey"]
SHAPES = ["circle", "square", "triangle", "star", "rectangle", "diamond", "ellipse", "hexagon", "cross"]
QUESTIONS = [
    "What colour is the shape?",
    "What shape is in the picture?",
    "Describe the image.",
    "What do you see in this image?",
    "How many shapes are there?",
    "Which colour is the background?",
    "Is there a circle in the image?",
    "Where is the shape?",
]
PROSE = """You are a helpful assistant. The image shows a shape on a plain background.
The answer is short. Yes, there is one. No, there is none. It is in the top left corner.
It is in the bottom right corner, near the centre, on the left, on the right.
Please answer the question about the picture. Think step by step before you answer.
The user asks a question and the assistant gives an answer. This is a test of the model.
There are 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 20 32 64 100 shapes in the image.
A small red circle and a large blue square. Two green triangles and three yellow stars.
"""


def corpus_lines():
    lines = PROSE.splitlines()
    for i, colour in enumerate(COLOURS):
        for j, shape in enumerate(SHAPES):
            question = QUESTIONS[(i + j) % len(QUESTIONS)]
            lines += [
                "user",
                question,
                "assistant",
                f"{colour} {shape}",
                f"The {shape} is {colour}. It is a {colour} {shape} with {i + j} sides or {j} corners.",
            ]
    return lines
