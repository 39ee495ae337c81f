from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from executor.workloads.datasets import (
    EOS,
    IGNORE,
    PAD,
    SEP,
    ImageFolder,
    ParallelText,
    translation_loss,
    write_synthetic_image_folder,
    write_synthetic_parallel_text,
)


def test_parallel_text_sample_layout(tmp_path: Path) -> None:
    (tmp_path / "a.src").write_text("ab\nxyz\n")
    (tmp_path / "a.tgt").write_text("c\nq\n")
    data = ParallelText(tmp_path / "a.src", tmp_path / "a.tgt", seq_len=6)
    tokens, targets = data[0]
    assert tokens.tolist() == [97, 98, SEP, 99, PAD, PAD]  # EOS is only ever a target
    # positions before SEP predict source bytes: not scored; SEP predicts 'c', 'c' predicts EOS
    assert targets.tolist() == [IGNORE, IGNORE, 99, EOS, IGNORE, IGNORE]
    short = ParallelText(tmp_path / "a.src", tmp_path / "a.tgt", seq_len=4)
    tokens, targets = short[1]
    assert tokens.tolist() == [120, 121, 122, SEP] and targets.tolist()[-1] == 113


def test_parallel_text_rejects_misaligned_files(tmp_path: Path) -> None:
    (tmp_path / "a.src").write_text("a\nb\n")
    (tmp_path / "a.tgt").write_text("a\n")
    with pytest.raises(ValueError, match=r"has 2 lines but .* has 1"):
        ParallelText(tmp_path / "a.src", tmp_path / "a.tgt")


def test_synthetic_text_is_learnable_mapping(tmp_path: Path) -> None:
    src, tgt = write_synthetic_parallel_text(tmp_path, sentences=5)
    s, t = src.read_text().splitlines(), tgt.read_text().splitlines()
    assert len(s) == len(t) == 5
    first_word = s[0].split()[0]
    assert t[0].split()[-1] == "".join(chr((ord(c) - 96) % 26 + 97) for c in first_word)


def test_translation_loss_is_per_sample_mean() -> None:
    logits = torch.randn(4, 5, 7)
    targets = torch.tensor([[1, 2, IGNORE, IGNORE, IGNORE]] * 2 + [[3, 3, 3, 3, 3]] * 2)
    whole = translation_loss(logits, targets)
    halves = 0.5 * translation_loss(logits[:2], targets[:2]) + \
        0.5 * translation_loss(logits[2:], targets[2:])
    assert torch.allclose(whole, halves)


def test_image_folder(tmp_path: Path) -> None:
    root = write_synthetic_image_folder(tmp_path / "imgs", classes=3, per_class=2, image_size=8)
    data = ImageFolder(root, image_size=8)
    assert len(data) == 6 and data.classes == ["class000", "class001", "class002"]
    x, y = data[5]
    assert x.shape == (3, 8, 8) and y == 2 and -1.0 <= float(x.min()) <= float(x.max()) <= 1.0
    batch = next(iter(DataLoader(data, batch_size=4)))
    assert batch[0].shape == (4, 3, 8, 8)
    with pytest.raises(ValueError, match="holds no images"):
        ImageFolder(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
