"""The SYNTHETIC-RENDERED fonts dataset: determinism, glyph/label alignment, faces as natural clients."""

import numpy as np
import pytest

from fedpers.data import fonts

FACES = ("DejaVuSans", "DejaVuSerif-Italic", "cmtt10")


@pytest.fixture(scope="module")
def masks():
    return fonts.glyph_masks(fonts.DIGITS + fonts.LETTERS, FACES)


def test_rendering_is_deterministic_in_the_seed(masks):
    a = fonts.render(fonts.DIGITS, 2, seed=5, faces=FACES, masks=masks[:, :10])
    b = fonts.render(fonts.DIGITS, 2, seed=5, faces=FACES, masks=masks[:, :10])
    c = fonts.render(fonts.DIGITS, 2, seed=6, faces=FACES, masks=masks[:, :10])
    assert a["image"].shape == (len(FACES) * fonts.STYLES * 10 * 2, 3, 32, 32) and a["image"].dtype == np.uint8
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # Another seed draws other transforms: most images differ (labels and faces do not depend on it).
    assert np.mean(np.any(a["image"] != c["image"], axis=(1, 2, 3))) > 0.9
    np.testing.assert_array_equal(a["label"], c["label"])


def _ink(images: np.ndarray) -> np.ndarray:
    """Foreground coverage in [0, 1] whatever the colours: distance from the border's (background) colour."""
    x = images.astype(np.float32) / 255.0
    border = np.concatenate([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], axis=2)
    bg = np.median(border, axis=2)[:, :, None, None]
    ink = np.abs(x - bg).sum(1)
    return ink / np.maximum(ink.reshape(len(x), -1).max(1), 1e-6)[:, None, None]


def test_clean_renderings_are_the_labelled_glyphs(masks):
    """Un-augmented images are exactly their own class's glyph of their own face: the best match among
    all 62 templates of that face. Misaligned labels, classes or faces break this."""
    chars = fonts.DIGITS + fonts.LETTERS
    out = fonts.render(chars, 1, seed=0, faces=FACES, augment=False, masks=masks)
    tmpl = masks[:, :, 0].reshape(len(FACES), len(chars), 32, 2, 32, 2).mean((3, 5))  # 64 -> 32 px
    ink = _ink(out["image"])
    fidx = np.array([FACES.index(f) for f in out["face"]])
    scores = np.einsum("nhw,nchw->nc", ink, tmpl[fidx]) / np.sqrt(
        (tmpl[fidx] ** 2).sum((2, 3)) * (ink**2).sum((1, 2))[:, None])
    np.testing.assert_array_equal(scores.argmax(1), out["label"])


def test_augmented_images_still_show_their_label(masks):
    """Under random affine, stroke, blur, colour and noise, a nearest-template guess (same face, upright
    thin templates) still names the label far above chance (10%): the label follows the drawn glyph."""
    out = fonts.render(fonts.DIGITS, 4, seed=1, faces=FACES, masks=masks[:, :10])
    tmpl = masks[:, :10, 0].reshape(len(FACES), 10, 32, 2, 32, 2).mean((3, 5))
    ink = _ink(out["image"])
    fidx = np.array([FACES.index(f) for f in out["face"]])
    t = tmpl[fidx]
    corr = np.einsum("nhw,nchw->nc", ink - ink.mean((1, 2), keepdims=True), t - t.mean((2, 3), keepdims=True))
    acc = np.mean(corr.argmax(1) == out["label"])
    shifted = np.mean(corr.argmax(1) == (out["label"] + 1) % 10)  # labels off by one class
    assert acc > 0.4 and acc > 3 * shifted


def test_writers_are_face_and_style(masks):
    out = fonts.render(fonts.DIGITS, 1, seed=0, faces=FACES, masks=masks[:, :10])
    assert sorted(set(out["face"])) == sorted(FACES)
    assert len(set(out["writer"])) == len(FACES) * fonts.STYLES
    assert all(w.split("/s")[0] == f for w, f in zip(out["writer"], out["face"]))


def test_cache_is_reused_and_keyed_by_version(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDPERS_CACHE", str(tmp_path))
    calls = []
    real = fonts.render

    def counting(*a, **k):
        calls.append(1)
        return real(*a, faces=FACES, **k)

    monkeypatch.setattr(fonts, "render", counting)
    a = fonts._cached("t", "01", 1, seed=0)
    b = fonts._cached("t", "01", 1, seed=0)
    assert len(calls) == 1 and len(list((tmp_path / "fonts").glob("*.npz"))) == 1
    np.testing.assert_array_equal(a["image"], b["image"])
    monkeypatch.setattr(fonts, "VERSION", fonts.VERSION + 1)
    fonts._cached("t", "01", 1, seed=0)
    assert len(calls) == 2


def test_natural_id_by_face_gives_one_client_per_face(monkeypatch):
    """natural_id on the face column: one client per face, each holding only that face's images and
    every digit (feature shift, no label skew)."""
    from datasets import Dataset

    from fedpers.config import DataConfig, PartitionerConfig
    from fedpers.data import build_federated, get_dataset_info

    small = fonts.render(fonts.DIGITS, 3, seed=0, faces=FACES)
    ds = Dataset.from_dict({"image": fonts.to_float(small["image"]), "label": small["label"],
                            "face": small["face"].tolist()})
    import fedpers.data.registry as registry

    # The full 25,200-image pool takes a while to render; the registered entry is swapped for a small one.
    info = get_dataset_info("fonts")
    monkeypatch.setitem(registry._REGISTRY, "fonts", registry.DatasetInfo(
        "fonts", 10, (3, 32, 32), lambda path=None: ds, info.description))
    fed = build_federated(DataConfig(dataset="fonts", partitioner=PartitionerConfig(
        name="natural_id", id_column="face"), test_fraction=0.25), len(FACES), 0)
    per_face = len(small["label"]) // len(FACES)
    assert [c.num_train + len(c.y_test) for c in fed.clients] == [per_face] * len(FACES)
    assert (fed.label_counts() == per_face // 10).all()
    # Each client's images are one face's: their pixels match exactly one face's rendered images.
    by_face = {f: {small["image"][i].tobytes() for i in np.flatnonzero(small["face"] == f)} for f in FACES}
    for c in fed.clients:
        imgs = {(np.round(x.numpy() * 255).astype(np.uint8)).tobytes() for x in c.x_train}
        owners = [f for f in FACES if imgs <= by_face[f]]
        assert len(owners) == 1


def test_fonts_is_registered_as_synthetic_rendered():
    from fedpers.data import get_dataset_info

    info = get_dataset_info("fonts")
    assert info.num_classes == len(fonts.DIGITS) and info.image_shape == (3, 32, 32)
    assert "SYNTHETIC-RENDERED" in info.description


def test_fonts_backbone_loads_its_bundled_weights_through_timm():
    """``pretrained=True`` resolves the registered cfg to the shipped file (no hub): the weights are the
    file's, not a random init, and the file stays small enough to ship."""
    import timm
    import torch
    from safetensors.torch import load_file

    from fedpers.models.zoo import FONTS_WEIGHTS

    assert FONTS_WEIGHTS.is_file() and FONTS_WEIGHTS.stat().st_size < 20e6
    saved = load_file(str(FONTS_WEIGHTS))
    model = timm.create_model("vit_fedpers_fonts", pretrained=True, num_classes=0)
    state = model.state_dict()
    assert set(saved) == set(state)
    for k, v in saved.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    rand = timm.create_model("vit_fedpers_fonts", pretrained=False, num_classes=0).state_dict()
    assert not torch.equal(rand["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)


@pytest.mark.slow  # renders the whole 25,200-image pool into the session's empty cache
def test_registered_loader_gives_the_full_pool_with_face_and_writer_columns():
    """The real loader (rendered once into this test session's cache): 25,200 digit images, 20 faces,
    60 writers, and the Arrow fast path reads back exactly what numpy formatting reads."""
    from fedpers.data import get_dataset_info
    from fedpers.data.partition import _image_array

    ds = get_dataset_info("fonts").loader()
    assert len(ds) == len(fonts.FACES) * fonts.STYLES * 10 * fonts.FONT_DIGITS_PER_WRITER_CLASS
    assert len(set(ds["face"])) == len(fonts.FACES) and len(set(ds["writer"])) == len(fonts.FACES) * fonts.STYLES
    part = ds.shuffle(seed=0).select(range(50))
    x = _image_array(part)
    assert x.shape == (50, 3, 32, 32) and x.dtype == np.float32
    np.testing.assert_array_equal(x, np.asarray(part.with_format("numpy")["image"], dtype=np.float32))
    assert np.bincount(np.asarray(ds["label"])).tolist() == [len(ds) // 10] * 10
