"""Build the bad-input corpus (issue 21, item 4) into a folder: every file made here, deterministically.

`make_corpus(root)` writes one folder per case under `root` plus a few good inputs the cases share:
`good/real`, `good/fake` (4 noise images of 32 px each) and `run/` (a random-weight xception_block1
classifier trained, nominally, at load = crop = 32). Nothing binary is committed: the table test
(`tests/test_bad_input_corpus.py`) calls this into a temporary folder.
"""
from __future__ import annotations

import io
import json
import os
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32


def _noise(seed: int, size: int = SIZE, channels: int = 3) -> np.ndarray:
    shape = (size, size, channels) if channels > 1 else (size, size)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _png_bytes(seed: int = 0, size: int = SIZE) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_noise(seed, size)).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg_bytes(seed: int = 0, size: int = SIZE) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_noise(seed, size)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _good(folder: Path, count: int = 4, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"{i:02d}.png").write_bytes(_png_bytes(seed * 100 + i))
    return folder


def _with(case: Path, name: str, contents: bytes | None = None, image: Image.Image | None = None,
          **save) -> Path:
    """`case/real` = 4 good images plus `name` (bytes or a PIL image saved with `save` options)."""
    folder = _good(case / "real", seed=7)
    path = folder / name
    if image is not None:
        image.save(path, **save)
    else:
        path.write_bytes(contents)
    return path


def _bomb_png(width: int, height: int) -> bytes:
    """A decompression bomb: a few hundred bytes whose header declares width x height px (20000 x 20000 =
    400 MP, above PIL's 179 MP refusal limit), so a reader that trusted it would allocate gigabytes."""
    png = _png_bytes(0, size=1)
    start = 8 + 8  # signature, then the IHDR chunk's length and type
    ihdr = bytearray(png[start:start + 13])
    ihdr[0:8] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    crc = zlib.crc32(b"IHDR" + bytes(ihdr)).to_bytes(4, "big")
    return png[:start] + bytes(ihdr) + crc + png[start + 17:]


def make_corpus(root: str | Path) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _good(root / "good" / "real", seed=1)
    _good(root / "good" / "fake", seed=2)
    _make_run(root / "run")

    # ---- single bad files, each beside 4 good ones in <case>/real
    _with(root / "truncated_png", "bad.png", _png_bytes(3)[:200])
    _with(root / "truncated_jpeg", "bad.jpg", _jpeg_bytes(3)[:300])
    _with(root / "zero_byte", "bad.png", b"")
    _with(root / "text_as_png", "bad.png", b"this is a text file, not a PNG\n")
    sixteen = (np.random.default_rng(4).integers(0, 65536, (SIZE, SIZE))).astype(np.uint16)
    _with(root / "png_16bit", "deep.png", image=Image.fromarray(sixteen))
    _with(root / "cmyk_jpeg", "cmyk.jpg", image=Image.fromarray(_noise(5, channels=4), "CMYK"), quality=90)
    palette = Image.fromarray(_noise(6, channels=1)).convert("P")
    _with(root / "palette_transparency", "palette.png", image=palette, transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    _with(root / "exif_rotated_jpeg", "rotated.jpg", image=Image.fromarray(_noise(8, channels=3)[:, :24]),
          exif=exif.tobytes(), quality=95)
    _with(root / "decompression_bomb", "bomb.png", _bomb_png(20000, 20000))
    _with(root / "one_pixel", "one.png", image=Image.fromarray(_noise(9, size=1)))
    _with(root / "smaller_than_receptive_field", "small.png", image=Image.fromarray(_noise(10, size=8)))

    # ---- folders
    (root / "empty_folder" / "real").mkdir(parents=True)
    only_bad = root / "only_bad_files" / "real"
    only_bad.mkdir(parents=True)
    (only_bad / "a.png").write_text("not an image")
    (only_bad / "b.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (only_bad / "c.png").write_bytes(b"")
    _good(root / "missing_split" / "real" / "train")      # has train/ only: no val/, no test/
    manifest = root / "manifest_missing_files"
    manifest.mkdir()
    (manifest / "real.txt").write_text("".join(f"../good/real/{i:02d}.png\n" for i in range(4))
                                       + "does/not/exist.png\n")
    dotdot = root / "manifest_dotdot"
    (dotdot / "lists").mkdir(parents=True)
    (dotdot / "lists" / "real.txt").write_text("".join(f"../../good/real/{i:02d}.png\n" for i in range(4)))
    loop = _good(root / "symlink_loop" / "real" / "sub", seed=11)
    (loop / "again").symlink_to(root / "symlink_loop" / "real")
    unreadable = _with(root / "unreadable_permissions", "locked.png", _png_bytes(12))
    os.chmod(unreadable, 0)
    names = _good(root / "odd_names" / "real", seed=13)
    for i, name in enumerate(["with space.png", "quote'\"s.png", "ünïcødé_画像.png"]):
        (names / name).write_bytes(_png_bytes(20 + i))
    try:
        with open(os.fsencode(names) + b"/latin1_\xe9\xff.png", "wb") as raw:
            raw.write(_png_bytes(30))
    except OSError:  # a file system that insists on UTF-8 names
        pass

    # ---- configs and sizes
    configs = root / "configs"
    configs.mkdir()
    (configs / "unknown_key.yaml").write_text("eval:\n  batch_size: 4\n  no_such_setting: 3\n")
    (configs / "ill_typed.yaml").write_text("eval:\n  batch_size: many\n")
    (configs / "negative_size.yaml").write_text("eval:\n  load_size: -32\n")

    # ---- checkpoints
    checkpoints = root / "checkpoints"
    checkpoints.mkdir()
    _make_wrong_kind(checkpoints / "wrong_kind")
    truncated = checkpoints / "truncated"
    truncated.mkdir()
    for name in ("best.json",):
        (truncated / name).write_bytes((root / "run" / name).read_bytes())
    weights = (root / "run" / "best.safetensors").read_bytes()
    (truncated / "best.safetensors").write_bytes(weights[: len(weights) // 2])
    _make_run(checkpoints / "nan_weights", nan=True)
    return root


def _make_run(run: Path, nan: bool = False) -> None:
    import torch

    from patchscope.forensics.checkpoint import save_classifier
    from patchscope.forensics.models import build_model

    model = build_model("xception_block1", seed=0)
    if nan:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(float("nan"))
    save_classifier(run / "best", model, {"config": {"load_size": SIZE, "crop_size": SIZE}})


def _make_wrong_kind(run: Path) -> None:
    """A run folder whose best.safetensors holds a generator's weights, not a classifier's."""
    import torch
    from safetensors.torch import save_file

    run.mkdir(parents=True)
    save_file({"mapping.weight": torch.zeros(4, 4)}, str(run / "best.safetensors"))
    (run / "best.json").write_text(json.dumps({"kind": "pgan", "config": {"resolution": 32}}))
