"""A labelled picture grid: one row per label, one column per column label, every cell the same size."""
from PIL import Image, ImageDraw

LABEL_WIDTH = 160     # the row labels' strip on the left
HEADER_HEIGHT = 48    # the column labels' strip on top
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


def grid_size(rows, cols, cell):
    """(width, height) of a grid of ``rows`` x ``cols`` cells of ``cell`` = (w, h) pixels."""
    return LABEL_WIDTH + cols * cell[0], HEADER_HEIGHT + rows * cell[1]


def _fit(draw, text, width):
    """``text`` cut to what fits in ``width`` pixels (with an ellipsis)."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _lines(draw, text, width, max_lines):
    words, lines = text.split(), [""]
    for w in words:
        candidate = (lines[-1] + " " + w).strip()
        if draw.textlength(candidate) <= width or not lines[-1]:
            lines[-1] = candidate
        elif len(lines) < max_lines:
            lines.append(w)
        else:
            lines[-1] = _fit(draw, lines[-1] + " " + w, width)
            break
    return [_fit(draw, line, width) for line in lines]


def make_grid(rows, col_labels, cell):
    """``rows`` = [(label, [PIL images, one per column])] -> one PIL image with the labels drawn."""
    width, height = grid_size(len(rows), len(col_labels), cell)
    out = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(out)
    for c, label in enumerate(col_labels):
        x = LABEL_WIDTH + c * cell[0]
        for i, line in enumerate(_lines(draw, label, cell[0] - 8, 3)):
            draw.text((x + 4, 4 + 14 * i), line, fill=INK)
    for r, (label, images) in enumerate(rows):
        if len(images) != len(col_labels):
            raise ValueError(f"row {label!r} has {len(images)} pictures for {len(col_labels)} columns")
        y = HEADER_HEIGHT + r * cell[1]
        for i, line in enumerate(_lines(draw, label, LABEL_WIDTH - 8, 4)):
            draw.text((4, y + 4 + 14 * i), line, fill=INK)
        for c, image in enumerate(images):
            out.paste(image.convert("RGB").resize(cell), (LABEL_WIDTH + c * cell[0], y))
    return out
