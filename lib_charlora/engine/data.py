"""The simplest training item: a picture and its caption (``Trainer`` also takes the intake's
``DatasetImage``)."""
from dataclasses import dataclass

from PIL import Image


@dataclass
class TrainImage:
    image: Image.Image
    caption: str
