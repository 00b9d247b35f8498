"""Picture and text embedders for scoring a LoRA's pictures (one small interface; tests inject fakes).

* ``ClipEmbedder``: a Hugging Face ``CLIPModel`` (image and text towers) — CLIP-I identity (pictures
  against the training pictures, as in the DreamBooth paper's evaluation) and CLIP-T prompt fidelity;
* ``FaceEmbedder``: identity from an installed face embedder (``insightface``, which face-swap
  extensions install), used instead of CLIP-I where it finds faces.

Loading never fails the evaluation: ``load_clip`` returns ``(None, reason)`` when the model cannot be
had (offline and not cached, say), and the grid is made without scores.
"""
import importlib.util

import numpy as np
import torch

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
_MEAN = (0.48145466, 0.4578275, 0.40821073)   # CLIP's image normalisation
_STD = (0.26862954, 0.26130258, 0.27577711)


class Embedder:
    """``images(pictures)`` and ``texts(strings)`` -> L2-normalised rows [N, D] (same D for both)."""

    name = "embedder"

    def images(self, pictures):
        raise NotImplementedError

    def texts(self, texts):
        raise NotImplementedError


def _normalise(x):
    if not isinstance(x, torch.Tensor):  # transformers 5: an output object whose pooler_output is projected
        x = x.pooler_output
    return torch.nn.functional.normalize(x.float(), dim=-1)


class ClipEmbedder(Embedder):
    def __init__(self, model, tokenizer, name="CLIP", device="cpu"):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.device = torch.device(device)
        self.size = int(model.config.vision_config.image_size)

    def _pixels(self, picture):
        """Resize the shorter side to the model's size, centre-crop, normalise (CLIP's preprocessing)."""
        im = picture.convert("RGB")
        w, h = im.size
        s = self.size / min(w, h)
        im = im.resize((max(self.size, round(w * s)), max(self.size, round(h * s))), resample=3)  # bicubic
        left, top = (im.width - self.size) // 2, (im.height - self.size) // 2
        im = im.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - torch.tensor(_MEAN)[:, None, None]) / torch.tensor(_STD)[:, None, None]

    @torch.no_grad()
    def images(self, pictures):
        batch = torch.stack([self._pixels(p) for p in pictures]).to(self.device)
        return _normalise(self.model.get_image_features(pixel_values=batch)).cpu()

    @torch.no_grad()
    def texts(self, texts):
        ids = self.tokenizer(list(texts), padding="max_length", truncation=True, return_tensors="pt",
                             max_length=min(77, self.tokenizer.model_max_length))
        out = self.model.get_text_features(input_ids=ids.input_ids.to(self.device),
                                           attention_mask=ids.attention_mask.to(self.device))
        return _normalise(out).cpu()


def load_clip(model_id=DEFAULT_CLIP, device="cpu"):
    """-> (ClipEmbedder, None) or (None, "unavailable: <reason>"). Downloaded once, like the WebUI's
    own interrogators; offline and not cached, it is unavailable."""
    try:
        from transformers import CLIPModel, CLIPTokenizer
        model = CLIPModel.from_pretrained(model_id).to(device)
        tokenizer = CLIPTokenizer.from_pretrained(model_id)
    except Exception as e:  # no network, no cache, a broken download, transformers missing
        if isinstance(e, (OSError, ConnectionError)) or "Connection" in type(e).__name__:
            return None, (f"unavailable: the CLIP model {model_id!r} is not in the Hugging Face cache and could not "
                          f"be downloaded (offline?); it is downloaded once when the machine is online "
                          f"({type(e).__name__}: {str(e)[:200]})")
        return None, f"unavailable: the CLIP model {model_id!r} could not be loaded ({type(e).__name__}: {e})"
    return ClipEmbedder(model, tokenizer, name=f"CLIP ({model_id})", device=device), None


class FaceEmbedder(Embedder):
    """Face identity with insightface's recognition model; ``images`` gives a zero row where no face
    is found (``found`` tells which)."""

    name = "face (insightface)"

    def __init__(self, app):
        self.app = app

    def images(self, pictures):
        rows = []
        for p in pictures:
            faces = self.app.get(np.asarray(p.convert("RGB"))[:, :, ::-1])
            if faces:
                face = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
                rows.append(torch.as_tensor(face.normed_embedding, dtype=torch.float32))
            else:
                rows.append(None)
        dim = next((r.shape[0] for r in rows if r is not None), 512)
        self.found = [r is not None for r in rows]
        return torch.stack([r if r is not None else torch.zeros(dim) for r in rows])


def load_face_embedder():
    """-> FaceEmbedder or None (insightface not installed or its model not available)."""
    if importlib.util.find_spec("insightface") is None:
        return None
    try:
        from insightface.app import FaceAnalysis
        app = FaceAnalysis(allowed_modules=["detection", "recognition"])
        app.prepare(ctx_id=-1, det_size=(320, 320))
        return FaceEmbedder(app)
    except Exception:
        return None
