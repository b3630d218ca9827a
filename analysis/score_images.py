"""`patchscope score` as one call: P(fake) of unlabelled images, their CSV/JSON, and heatmap cards when asked.

`forensics.score_images` scores the images as eval scores a test set; the heatmap cards (`ScoreConfig.heatmaps`)
reuse `analysis.heatmaps` (patch maps placed at their receptive-field centres, the same colours as eval's pages).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from patchscope.analysis.grids import ColourBar, image_grid, save_image, to_uint8
from patchscope.analysis.heatmaps import CARD_TILE, DEFAULT_CMAP, colourize, overlay, upsample_map
from patchscope.analysis.lightbox import LightboxItem, write_lightbox
from patchscope.common.atomic import write_json
from patchscope.common.errors import InputError
from patchscope.common.progress import progress_bar
from patchscope.forensics.evaluate import printable_path
from patchscope.forensics.score_images import (ImageScores, ScoreConfig, output_files, safe_stem, score_images,
                                               write_scores)

PAGE = "heatmaps.html"


def run_score(config: ScoreConfig, progress: bool = False) -> dict[str, Any]:
    """Score `config.inputs`; write the files asked for. Returns {"result": ImageScores, "files": {kind: path},
    "heatmaps": page path or None}. Every output path is checked before the first image is decoded."""
    files = output_files(config)
    heatmap_dir = Path(config.heatmaps) if config.heatmaps else None
    if heatmap_dir is not None:
        if heatmap_dir.exists() and not heatmap_dir.is_dir():
            raise InputError(f"{heatmap_dir}: not a folder (--heatmaps names a folder for the heatmap cards)")
        if (heatmap_dir / PAGE).exists() and not config.force:
            raise InputError(f"{heatmap_dir / PAGE} exists; pass --force to replace it or choose another folder")
    result = score_images(config, progress=progress)
    written = write_scores(result, files)
    page = write_score_heatmaps(result, heatmap_dir, progress=progress) if heatmap_dir is not None else None
    return {"result": result, "files": written, "heatmaps": None if page is None else str(page)}


def write_score_heatmaps(result: ImageScores, out_dir: Path, aggregation: str = "after_softmax",
                         progress: bool = False) -> Path:
    """One card per image (input | P(fake) map | overlay, `NNNNN_<name>.png`), `heatmaps.html` linking them
    in input order, and `heatmaps.json` (which card shows which file, its scores)."""
    model = result.model
    entries, items = [], []
    for i, source in enumerate(progress_bar(result.paths, desc="heatmaps", unit="img", disable=not progress)):
        image = to_uint8(result.dataset[i][0])  # the exact classifier input, the centre crop
        heat = upsample_map(result.patch_probs[i], model, image.shape[:2])
        score = float(result.scores[aggregation][i])
        card = image_grid([[image, colourize(heat), overlay(image, heat)]],
                          col_labels=["input", "P(fake) map", "overlay"],
                          captions=[[f"{aggregation} {score:.3f}", f"vote {float(result.scores['vote'][i]):.3f}",
                                     f"max patch {float(result.patch_probs[i].max()):.3f}"]],
                          title=Path(printable_path(source)).name, colour_bar=ColourBar(cmap=DEFAULT_CMAP),
                          tile_size=CARD_TILE if max(image.shape[:2]) > CARD_TILE else None)
        name = f"{i:05d}_{safe_stem(source)}.png"
        save_image(out_dir / name, card)
        entries.append({"index": i, "source": printable_path(source), "card": name,
                        **{mode: float(values[i]) for mode, values in result.scores.items()}})
        items.append(LightboxItem(name, f"{Path(printable_path(source)).name}\nP(fake) {score:.3f} ({aggregation})"))
    model_name = getattr(model, "name", "classifier")
    page = write_lightbox(out_dir / PAGE, [(f"{len(items)} images, in input order", items)],
                          f"Heatmaps: {model_name} on {len(items)} images",
                          note="Each patch's P(fake) is placed at its receptive-field centre (linear interpolation "
                               f"between centres); the {DEFAULT_CMAP} colours always span P(fake) 0 to 1.")
    write_json(out_dir / "heatmaps.json", {"model": model_name, "aggregation": aggregation, "cards": entries})
    return page
