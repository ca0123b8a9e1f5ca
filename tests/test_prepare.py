import json

import pytest
from PIL import Image

from workflow.shards import iter_shard

from conftest import run_stage, tiny_config


def write_folder(root, rows, images):
    root.mkdir(parents=True, exist_ok=True)
    for name, color in images.items():
        Image.new("RGB", (40, 30), color).save(root / name)
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_builtin_digits(built):
    manifest = json.loads((built["data"] / "manifest.json").read_text())
    assert manifest["count"] == 1797 and manifest["skipped"] == []
    assert [s["count"] for s in manifest["shards"]] == [700, 700, 397]
    first = next(iter_shard(built["data"] / manifest["shards"][0]["name"]))
    meta = json.loads(first["json"])
    assert meta["captions"] == [f"a handwritten digit {meta['label']}"]
    assert "png" in first


def test_imagefolder_reports_bad_images_and_missing_captions(tmp_path):
    src = tmp_path / "pets"
    write_folder(src, [
        {"file_name": "red.png", "text": "a red square"},
        {"file_name": "blue.jpg", "caption": "a blue square"},
        {"file_name": "nocap.png"},
        {"file_name": "broken.png", "text": "broken"},
        {"file_name": "gone.png", "text": "missing file"},
    ], {"red.png": "red", "blue.jpg": "blue", "nocap.png": "green"})
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "data"
    proc = run_stage("prepare", tiny_config(f"data.source=imagefolder:{src}"), "--out", str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 2
    reasons = {s["item"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"nocap.png", "broken.png", "gone.png"}
    assert "does not decode" in reasons["broken.png"] and "caption" in reasons["nocap.png"]
    assert "broken.png" in proc.stderr  # the user is told, not only the manifest

    strict = run_stage("prepare", tiny_config(f"data.source=imagefolder:{src}", "data.strict=true"),
                       "--out", str(tmp_path / "strict"), check=False)
    assert strict.returncode == 2 and "broken.png: image does not decode" in strict.stderr  # first bad item, by name
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize("setup, message", [
    ("missing", "does not exist"),
    ("empty", "holds no images"),
])
def test_imagefolder_errors_leave_nothing(tmp_path, setup, message):
    src = tmp_path / "imgs"
    if setup == "empty":
        src.mkdir()
    out = tmp_path / "data"
    proc = run_stage("prepare", tiny_config(f"data.source=imagefolder:{src}"), "--out", str(out), check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and str(src) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob("data.tmp-*"))
