"""Every data source format, from files the tests write."""

import csv
import io
import json

import pytest
from PIL import Image

from workflow.prepare import prepare
from workflow.shards import iter_shard

from conftest import tiny_config


def png(color, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def prepared(tmp_path, source, *overrides):
    out = tmp_path / "out"
    manifest = prepare(tiny_config(f"data.source={source}", *overrides), out)
    samples = [s for shard in manifest["shards"] for s in iter_shard(out / shard["name"])]
    return manifest, samples


def captions_of(samples):
    return sorted(tuple(json.loads(s["json"])["captions"]) for s in samples)


def test_imagefolder_csv_kohya_txt_and_nested(tmp_path):
    root = tmp_path / "imgs"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "red.png").write_bytes(png("red"))
    (root / "a" / "b" / "blue.png").write_bytes(png("blue"))
    with open(root / "a" / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "text"])
        w.writerow(["red.png", "a red square"])
        w.writerow(["b/blue.png", "a blue square"])
    (root / "green.jpg").write_bytes(png("green"))
    (root / "green.txt").write_text("a green square\nsomething green\n")  # kohya sidecar, two captions
    (root / "orphan.png").write_bytes(png("white"))  # no caption anywhere
    manifest, samples = prepared(tmp_path, f"imagefolder:{root}")
    assert manifest["count"] == 3
    assert captions_of(samples) == [("a blue square",), ("a green square", "something green"), ("a red square",)]
    assert manifest["skipped"] == [{"item": "orphan.png", "reason": "no caption"}]
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])


def test_imagefolder_custom_caption_column(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "x.png").write_bytes(png("red"))
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "prompt": "custom"}) + "\n")
    _, samples = prepared(tmp_path, f"imagefolder:{root}", "data.caption_column=prompt")
    assert captions_of(samples) == [("custom",)]
    with pytest.raises(ValueError, match=r"no caption column 'title'.*\['file_name', 'prompt'\]"):
        prepared(tmp_path, f"imagefolder:{root}", "data.caption_column=title")


def write_parquet_dataset(folder, rows):
    import datasets  # a pinned dependency: missing is a failure, not a skip
    folder.mkdir(parents=True)
    ds = datasets.Dataset.from_dict(
        {"img": [{"bytes": r[0], "path": None} for r in rows], "blip": [r[1] for r in rows], "n": list(range(len(rows)))},
        features=datasets.Features({"img": datasets.Image(), "blip": datasets.Sequence(datasets.Value("string")),
                                    "n": datasets.Value("int64")}),
    )
    ds.to_parquet(str(folder / "train-00000-of-00001.parquet"))


def test_hf_parquet_folder_with_configurable_columns(tmp_path):
    folder = tmp_path / "pokemon"
    write_parquet_dataset(folder, [(png("red"), ["a red thing", "red!"]), (png("blue"), ["a blue thing"]),
                                   (b"garbage", ["broken"]), (png("green"), [])])
    manifest, samples = prepared(tmp_path, f"hf:{folder}", "data.image_column=img", "data.caption_column=blip")
    assert manifest["count"] == 2
    assert captions_of(samples) == [("a blue thing",), ("a red thing", "red!")]  # a caption list keeps all
    reasons = {s["item"]: s["reason"] for s in manifest["skipped"]}
    assert "does not decode" in reasons["row 2"] or "unsupported" in reasons["row 2"]
    assert reasons["row 3"] == "no caption"


def test_hf_missing_column_lists_the_columns(tmp_path):
    folder = tmp_path / "ds"
    write_parquet_dataset(folder, [(png("red"), ["a red thing"])])
    with pytest.raises(ValueError, match=r"no image column 'image' \(data.image_column\); columns: \['img', 'blip', 'n'\]"):
        prepared(tmp_path, f"hf:{folder}")


def test_wds_tars_with_brace_pattern(tmp_path):
    import webdataset as wds

    for t, items in enumerate([[("k0", "jpg", png("red"), {"txt": b"a red square"})],
                               [("k1", "png", png("blue"), {"json": json.dumps({"caption": "a blue square"}).encode()}),
                                ("k2", "webp", png("green"), {})]]):
        with wds.TarWriter(str(tmp_path / f"part-{t:03d}.tar")) as w:
            for key, ext, data, extra in items:
                w.write({"__key__": key, ext: data, **extra})
    manifest, samples = prepared(tmp_path, f"wds:{tmp_path}/part-{{000..001}}.tar")
    assert manifest["count"] == 2
    assert captions_of(samples) == [("a blue square",), ("a red square",)]
    assert manifest["skipped"] == [{"item": "part-001.tar:k2", "reason": "no caption"}]
    with pytest.raises(FileNotFoundError, match="part-009.tar"):
        prepared(tmp_path, f"wds:{tmp_path}/part-{{008..009}}.tar")
