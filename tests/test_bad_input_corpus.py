"""The bad-input corpus (issue 21, item 4) through the real commands: one table, one test.

`tests/data/bad/make_corpus.py` builds every case into a temporary folder. Each row of `CASES` says which
command runs on it and what patchscope must do:

* ``read``  - a valid but unusual file: exit 0, every image scored (rows in the scores CSV);
* ``skip``  - a documented skip: exit 0, a warning naming the file, counted ("skipped N");
* ``error`` - exit 2 and exactly one error line naming the file and what was expected.

Always: no traceback, and nothing created or changed outside --out (the corpus and the folder around --out
are snapshot before and after). The README's "Bad input" table is generated from `CASES`
(`readme_table`) and `test_the_readme_table_matches_the_cases` keeps the two from drifting.
"""
from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from patchscope.cli import main
from tests.data.bad.make_corpus import make_corpus

README = Path(__file__).resolve().parents[1] / "README.md"
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@dataclass(frozen=True)
class Case:
    name: str
    input: str       # what the corpus holds (README)
    command: str     # "eval" or "train" or "prepare", on the case's folder
    args: tuple      # templates: {root} corpus, {out} the output folder
    outcome: str     # "read" | "skip" | "error"
    expect: object   # read: images scored; skip: (count, regex naming the file); error: regex
    does: str        # what patchscope does (README)


def _eval(real: str, run: str = "{root}/run", *extra: str) -> tuple:
    return ("eval", run, "--test", f"t={real},{{root}}/good/fake", "--out", "{out}", "--device", "cpu", *extra)


def _train(real: str, *extra: str) -> tuple:
    return ("train", "--real", real, "--fake", "{root}/good/fake", "--out", "{out}", "--model", "xception_block1",
            "--load-size", "32", "--crop-size", "32", "--batch-size", "4", "--max-epochs", "1",
            "--device", "cpu", "--workers", "0", *extra)


def _prepare(folder: str) -> tuple:
    return ("prepare", folder, "--out", "{out}", "--resolution", "16")


GOOD = "{root}/good/real"
CASES = [
    Case("truncated_png", "a PNG cut after 200 bytes", "eval", _eval("{root}/truncated_png/real"),
         "skip", (1, r"bad\.png \(corrupt or truncated"), "skipped, named in a warning"),
    Case("truncated_jpeg", "a JPEG cut after 300 bytes", "eval", _eval("{root}/truncated_jpeg/real"),
         "skip", (1, r"bad\.jpg \(corrupt or truncated"), "skipped, named in a warning"),
    Case("truncated_jpeg_strict", "the same JPEG, `--on-bad-image error`", "eval",
         _eval("{root}/truncated_jpeg/real", "{root}/run", "--on-bad-image", "error"),
         "error", r"truncated_jpeg/real/bad\.jpg: corrupt or truncated image data", "error naming the file"),
    Case("truncated_jpeg_train", "the same JPEG, `train --no-cache`", "train",
         _train("{root}/truncated_jpeg/real", "--no-cache"),
         "skip", (1, r"bad\.jpg \(corrupt or truncated"), "skipped, as with the cache"),
    Case("zero_byte", "a 0-byte .png", "eval", _eval("{root}/zero_byte/real"),
         "skip", (1, r"bad\.png \(empty file"), "skipped, named in a warning"),
    Case("text_as_png", "a text file named .png", "eval", _eval("{root}/text_as_png/real"),
         "skip", (1, r"bad\.png \(not an image file"), "skipped, named in a warning"),
    Case("png_16bit", "a 16-bit greyscale PNG", "eval", _eval("{root}/png_16bit/real"),
         "read", 9, "read (scaled to 8-bit RGB)"),
    Case("cmyk_jpeg", "a CMYK JPEG", "eval", _eval("{root}/cmyk_jpeg/real"),
         "read", 9, "read (converted to RGB)"),
    Case("palette_transparency", "a palette PNG with a transparent index", "eval",
         _eval("{root}/palette_transparency/real"), "read", 9, "read (converted to RGB)"),
    Case("exif_rotated_jpeg", "a JPEG with EXIF orientation 6", "eval", _eval("{root}/exif_rotated_jpeg/real"),
         "read", 9, "read upright"),
    Case("decompression_bomb", "a PNG declaring 20000 x 20000 px", "eval", _eval("{root}/decompression_bomb/real"),
         "skip", (1, r"bomb\.png \(.*DecompressionBombError"), "skipped before decoding, named in a warning"),
    Case("decompression_bomb_prepare", "the same bomb, `prepare`", "prepare",
         _prepare("{root}/decompression_bomb/real"),
         "skip", (1, r"bomb\.png \(.*DecompressionBombError"), "skipped before decoding"),
    Case("one_pixel", "a 1 x 1 image", "eval", _eval("{root}/one_pixel/real"),
         "error", r"one\.png: 1x1 px is smaller than the classifier's receptive field", "error naming the file"),
    Case("smaller_than_receptive_field", "an 8 x 8 image (receptive field 19 px)", "eval",
         _eval("{root}/smaller_than_receptive_field/real"),
         "error", r"small\.png: 8x8 px is smaller than the classifier's receptive field/crop \(19 px\)",
         "error naming the file and the size needed"),
    Case("empty_folder", "an empty folder", "eval", _eval("{root}/empty_folder/real"),
         "error", r"empty_folder/real: no images found \(expected files ending in", "error naming the folder"),
    Case("empty_folder_train", "an empty folder, `train`", "train", _train("{root}/empty_folder/real"),
         "error", r"empty_folder/real: no images found", "error naming the folder"),
    Case("only_bad_files", "a folder of 3 unreadable files", "eval", _eval("{root}/only_bad_files/real"),
         "error", r"none of the 3 images could be read \(first: .*only_bad_files/real/a\.png",
         "error naming the first file"),
    Case("only_bad_files_prepare", "the same folder, `prepare`", "prepare", _prepare("{root}/only_bad_files/real"),
         "error", r"only_bad_files/real: none of the 3 image file\(s\) could be read", "error naming the folder"),
    Case("missing_split_eval", "train/ only, `eval --split test`", "eval", _eval("{root}/missing_split/real"),
         "error", r"missing_split/real/test: no 'test' split folder \(found train\)", "error naming the split"),
    Case("missing_split_train", "train/ only, `train` (needs val/)", "train", _train("{root}/missing_split/real"),
         "error", r"missing_split/real/val: no 'val' split folder \(found train\)", "error naming the split"),
    Case("manifest_missing_files", "a .txt manifest naming a missing file", "eval",
         _eval("{root}/manifest_missing_files/real.txt"),
         "error", r"real\.txt: 1 listed image\(s\) do not exist, e\.g\. .*does/not/exist\.png",
         "error naming the manifest and the file"),
    Case("manifest_dotdot", "a manifest of `../` paths", "eval", _eval("{root}/manifest_dotdot/lists/real.txt"),
         "read", 8, "read (relative to the manifest; inputs only, nothing is written there)"),
    Case("symlink_loop", "a folder with a link back to itself", "eval", _eval("{root}/symlink_loop/real"),
         "skip", (1, r"skipped 1 linked folder\(s\) already walked .*sub/again"),
         "each image once; the link skipped, named in a warning"),
    Case("unreadable_permissions", "a file with mode 000", "eval", _eval("{root}/unreadable_permissions/real"),
         "skip", (1, r"locked\.png \(permission denied"), "skipped, named (not testable as root: root reads mode 000)"),
    Case("odd_names", "names with spaces, quotes, unicode and non-UTF-8 bytes", "eval",
         _eval("{root}/odd_names/real", "{root}/run", "--heatmaps", "8"), "read", 12,
         "read; non-UTF-8 bytes written as `\\xNN` in the scores CSV; heatmap pages drawn"),
    Case("config_unknown_key", "a YAML config with an unknown key", "eval",
         _eval(GOOD, "{root}/run", "--config", "{root}/configs/unknown_key.yaml"),
         "error", r"unknown_key\.yaml: unknown setting 'no_such_setting'; known: ", "error naming file and key"),
    Case("config_ill_typed", "a YAML config with `batch_size: many`", "eval",
         _eval(GOOD, "{root}/run", "--config", "{root}/configs/ill_typed.yaml"),
         "error", r"setting batch_size='many': expected an integer >= 1", "error naming the setting"),
    Case("config_negative_size", "a YAML config with `load_size: -32`", "eval",
         _eval(GOOD, "{root}/run", "--config", "{root}/configs/negative_size.yaml"),
         "error", r"setting load_size=-32: expected an integer >= 1 or null", "error naming the setting"),
    Case("zero_size", "`--crop-size 0`", "eval", _eval(GOOD, "{root}/run", "--crop-size", "0"),
         "error", r"Invalid value for '--crop-size': 0 is not in the range x>=1", "click usage error"),
    Case("checkpoint_wrong_kind", "a run whose checkpoint is a generator's", "eval",
         _eval(GOOD, "{root}/checkpoints/wrong_kind"),
         "error", r"wrong_kind/best\.json: not a patchscope classifier checkpoint", "error naming the file"),
    Case("checkpoint_truncated", "best.safetensors cut in half", "eval", _eval(GOOD, "{root}/checkpoints/truncated"),
         "error", r"truncated/best\.safetensors: unreadable safetensors file", "error naming the file"),
    Case("checkpoint_nan", "a classifier with NaN weights", "eval", _eval(GOOD, "{root}/checkpoints/nan_weights"),
         "error", r"nan_weights/best\.safetensors: \S+ holds NaN or infinite values; expected finite",
         "error naming the file and tensor"),
]

ERROR_LINE = re.compile(r"^(error|Error): ")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("bad") / "corpus")


def tree(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder` (links not followed) with its size and mtime."""
    entries = {}
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(top, name)
            info = os.lstat(path)
            entries[path] = (info.st_size, info.st_mtime_ns)
    return entries


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case: Case, corpus: Path, tmp_path, monkeypatch):
    if case.name == "unreadable_permissions" and AS_ROOT:
        pytest.skip("runs as root: chmod 000 does not stop root's reads, so the file is read, not skipped")
    monkeypatch.setattr(logging.root, "handlers", [])  # the command's basicConfig logs to this run's stderr
    out = tmp_path / "work" / "out"
    (tmp_path / "work").mkdir()
    args = [arg.format(root=corpus, out=out) for arg in case.args]
    corpus_before, work_before = tree(corpus), tree(tmp_path / "work")

    result = CliRunner().invoke(main, args)

    output = result.output + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output
    assert tree(corpus) == corpus_before, "the command changed the corpus"
    created = set(tree(tmp_path / "work")) - set(work_before)
    assert all(Path(path) == out or out in Path(path).parents for path in created), created
    errors = [line for line in result.stderr.splitlines() if ERROR_LINE.match(line)]
    if case.outcome == "error":
        assert result.exit_code == 2, output
        assert len(errors) == 1 and re.search(case.expect, errors[0]), result.stderr
        assert not (out.exists() and any(out.rglob("*.csv"))), "scores written despite the error"
        return
    assert result.exit_code == 0, output
    assert not errors, result.stderr
    if case.outcome == "skip":
        count, named = case.expect
        assert re.search(named, result.stderr), result.stderr
        counts = {int(n) for n in re.findall(r"skipped (\d+)", result.stderr)}
        assert counts == {count}, result.stderr
    if case.command == "eval":
        with open(out / "scores_t.csv", newline="", encoding="utf-8") as table:  # valid UTF-8, whatever the names
            rows = list(csv.DictReader(table))
        expected = case.expect if case.outcome == "read" else None
        if expected is not None:
            assert len(rows) == expected
        if "--heatmaps" in args:
            assert (out / "heatmaps" / "t" / "heatmaps.html").is_file()


def readme_table() -> str:
    lines = ["| Case | Input | Command | Outcome | What patchscope does |", "|---|---|---|---|---|"]
    for case in CASES:
        outcome = {"read": "read, exit 0", "skip": "skip, exit 0", "error": "error, exit 2"}[case.outcome]
        lines.append(f"| `{case.name}` | {case.input} | `{case.command}` | {outcome} | {case.does} |")
    return "\n".join(lines) + "\n"


def test_the_readme_table_matches_the_cases():
    text = README.read_text(encoding="utf-8")
    start, end = "<!-- bad-input table: begin -->\n", "<!-- bad-input table: end -->"
    assert start in text and end in text, "README.md lacks the Bad input table markers"
    table = text.split(start, 1)[1].split(end, 1)[0]
    assert table == readme_table(), "regenerate: python -c 'from tests.test_bad_input_corpus " \
                                    "import readme_table; print(readme_table())'"
