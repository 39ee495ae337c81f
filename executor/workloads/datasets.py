"""Datasets in the on-disk layouts of the GPipe paper's two workloads, and small synthetic ones.

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> src, tgt = write_synthetic_parallel_text(root, sentences=8)
    >>> data = ParallelText(src, tgt, seq_len=48)
    >>> tokens, targets = data[0]
    >>> tokens.shape, tokens.dtype, len(data)
    (torch.Size([48]), torch.int64, 8)

- ``ImageFolder``: ImageNet-2012's usual layout, one folder per class holding image files
  (``root/n01440764/xxx.JPEG``); images are resized to a square and scaled to [-1, 1].
- ``ParallelText``: a translation corpus as two aligned files, one sentence per line
  (``train.src`` / ``train.tgt``). Tokens are UTF-8 bytes (any language, no vocabulary to
  build) plus three specials; a sample is ``source SEP target EOS`` padded to ``seq_len``,
  with next-token targets on the target side only (``IGNORE`` elsewhere), for a decoder-only
  Transformer.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch.utils.data import Dataset

__all__ = [
    "EOS",
    "IGNORE",
    "IMAGE_EXTENSIONS",
    "PAD",
    "SEP",
    "VOCAB_SIZE",
    "ImageFolder",
    "ParallelText",
    "translation_loss",
    "write_synthetic_image_folder",
    "write_synthetic_parallel_text",
]

PAD, SEP, EOS = 256, 257, 258
VOCAB_SIZE = 259  # 256 byte values + PAD, SEP, EOS
IGNORE = -100  # target value that the loss skips
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")


class ImageFolder(Dataset[tuple[torch.Tensor, int]]):
    """Images in ``root/<class>/<file>``; classes are the sorted folder names."""

    def __init__(self, root: str | Path, image_size: int = 32) -> None:
        self.root, self.image_size = Path(root), image_size
        if not self.root.is_dir():
            raise ValueError(f"image folder {str(root)!r} does not exist; give a folder with one "
                             f"sub-folder of images per class (ImageNet's layout)")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        self.samples = [(f, c) for c, name in enumerate(self.classes)
                        for f in sorted((self.root / name).iterdir())
                        if f.suffix.lower() in IMAGE_EXTENSIONS]
        if not self.samples:
            raise ValueError(
                f"image folder {str(root)!r} holds no images in class sub-folders (found "
                f"{len(self.classes)} sub-folders); expected root/<class>/<image> with "
                f"extensions {', '.join(IMAGE_EXTENSIONS)}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image  # Pillow comes with matplotlib (the 'plot' extra)

        path, label = self.samples[index]
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((self.image_size, self.image_size))
            data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        pixels = data.view(self.image_size, self.image_size, 3).permute(2, 0, 1).float()
        return pixels / 127.5 - 1.0, label


def _encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


class ParallelText(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Aligned source/target files, one sentence per line, as byte-token training samples."""

    def __init__(self, source: str | Path, target: str | Path, seq_len: int = 64) -> None:
        src_lines = Path(source).read_text(encoding="utf-8").splitlines()
        tgt_lines = Path(target).read_text(encoding="utf-8").splitlines()
        if len(src_lines) != len(tgt_lines):
            raise ValueError(
                f"{source} has {len(src_lines)} lines but {target} has {len(tgt_lines)}; a "
                f"parallel corpus needs one target sentence per source sentence, line by line")
        if seq_len < 4:
            raise ValueError(f"seq_len={seq_len} is too short; use at least 4 tokens")
        self.pairs = list(zip(src_lines, tgt_lines, strict=True))
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        src, tgt = self.pairs[index]
        prompt = [*_encode(src), SEP]
        answer = [*_encode(tgt), EOS]
        seq = (prompt + answer)[: self.seq_len + 1]
        tokens = seq[:-1] + [PAD] * (self.seq_len + 1 - len(seq))
        # position t predicts token t+1; only the answer's tokens are scored
        targets = [tok if t + 1 >= len(prompt) else IGNORE for t, tok in enumerate(seq[1:])]
        targets += [IGNORE] * (self.seq_len - len(targets))
        return torch.tensor(tokens[: self.seq_len]), torch.tensor(targets)


def translation_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over samples of each sample's mean cross-entropy on its target tokens.

    A per-sample mean (not a mean over all tokens of the batch) keeps the loss of a batch the
    size-weighted mean of its micro-batches' losses, as pipelined training needs."""
    per_token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
        reduction="none").view(targets.shape)
    counts = (targets != IGNORE).sum(dim=1).clamp(min=1)
    return (per_token.sum(dim=1) / counts).mean()


def write_synthetic_parallel_text(root: str | Path, sentences: int = 256,
                                  seed: int = 0) -> tuple[Path, Path]:
    """A toy corpus in the parallel layout: each target is its source's words reversed, letters
    shifted by one (``abc de`` -> ``ef bcd``), learnable by a small model. Returns both paths."""
    rng = random.Random(seed)
    words = ["pipe", "stage", "batch", "layer", "micro", "model", "train", "bubble", "split",
             "device", "memory", "plan"]
    src, tgt = [], []
    for _ in range(sentences):
        sent = [rng.choice(words) for _ in range(rng.randint(2, 4))]
        src.append(" ".join(sent))
        tgt.append(" ".join("".join(chr((ord(c) - 96) % 26 + 97) for c in w)
                            for w in reversed(sent)))
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.src").write_text("\n".join(src) + "\n", encoding="utf-8")
    (root / "train.tgt").write_text("\n".join(tgt) + "\n", encoding="utf-8")
    return root / "train.src", root / "train.tgt"


def write_synthetic_image_folder(root: str | Path, classes: int = 4, per_class: int = 16,
                                 image_size: int = 32, seed: int = 0) -> Path:
    """A toy image set in ImageNet's layout: class c's images are noise with a bright square in
    corner c mod 4 and a tint that depends on c, saved as PNG files."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    root = Path(root)
    half = image_size // 2
    for c in range(classes):
        folder = root / f"class{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = torch.randint(0, 96, (image_size, image_size, 3), generator=gen,
                                dtype=torch.uint8)
            y, x = (c % 4) // 2 * half, (c % 4) % 2 * half
            img[y:y + half, x:x + half, c % 3] = 255
            Image.fromarray(img.numpy()).save(folder / f"img{i:04d}.png")
    return root
