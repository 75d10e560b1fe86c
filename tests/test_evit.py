"""EViT (method=evit) and image folders (data=images/folder): exactness at keep rate 1, token counts per
layer, the fused token against a hand computation from eager attention probabilities, the keep-rate
schedule, training end to end (synthetic images and a generated folder of PNGs), export/reload, bad
configs and bad folders."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from lightmods.callbacks.keep_rate import KeepRateSchedule
from lightmods.data.images import folder_classes, read_image_folder
from lightmods.errors import ConfigError, DataError
from lightmods.export import load_checkpoint_model, load_export
from lightmods.run import train
from lightmods.tokens import EViTLayer, default_layers, keep_rate_at, token_counts, wrap_vit_layers

TINY = ["model=tiny_vit", "method=evit", "method.lr=1e-3", "trainer.max_epochs=2", "trainer.log_every_n_steps=1", "callbacks.progress_bar=false"]


def small_vit(attn: str = "sdpa", layers: int = 4) -> ViTForImageClassification:
    """64 patches (32px, patch 4), so that keep rates visibly shorten the sequence."""
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64, image_size=32,
                       patch_size=4, num_labels=3, attn_implementation=attn)  # fmt: skip
    return ViTForImageClassification(config).eval()


def sequence_lengths(model, pixels) -> list[int]:
    lengths, hooks = [], []
    for layer in model.vit.layers:
        hooks.append(layer.register_forward_hook(lambda m, i, o: lengths.append(o.shape[1])))
    with torch.no_grad():
        model(pixel_values=pixels)
    for h in hooks:
        h.remove()
    return lengths


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_rate_one_gives_exactly_the_original_logits(attn):
    model = small_vit(attn)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    evit = copy.deepcopy(model)
    wrap_vit_layers(evit, [0, 1, 2, 3], keep_rate=1.0)
    assert all(isinstance(m, EViTLayer) for m in evit.vit.layers)
    assert evit.state_dict().keys() == model.state_dict().keys()  # plain ViT parameter names
    with torch.no_grad():
        torch.testing.assert_close(evit(pixel_values=x).logits, expected, rtol=0, atol=0)
    assert sequence_lengths(evit, x) == [65] * 4
    wrap_vit_layers(evit, [0, 1, 2, 3], keep_rate=0.7)  # the mechanism changes the outputs
    with torch.no_grad():
        assert not torch.allclose(evit(pixel_values=x).logits, expected, atol=1e-4)


@pytest.mark.parametrize("fuse, expected", [(True, [65, 34, 19, 11]), (False, [65, 33, 17, 9])])
def test_tokens_shrink_to_the_expected_count_per_layer(fuse, expected):
    # 64 patches; layers 1-3 keep half: 64 -> 32 (+ fused) -> ceil(33 / 2) = 17 (+1) -> 9 (+1); without fusion 32, 16, 8
    model = small_vit()
    wrap_vit_layers(model, [1, 2, 3], keep_rate=0.5, fuse=fuse)
    assert sequence_lengths(model, torch.randn(2, 3, 32, 32)) == expected
    assert token_counts(64, 4, [1, 2, 3], 0.5, fuse) == expected
    assert token_counts(196, 12, default_layers(12), 0.7) == [197] * 3 + [140] * 3 + [100] * 3 + [72] * 3
    assert default_layers(12) == [3, 6, 9] and default_layers(2) == [0, 1] and default_layers(24) == [6, 12, 18]


@pytest.mark.parametrize("normalize", [False, True])
def test_fused_token_is_the_attention_weighted_sum_of_the_dropped_tokens(normalize):
    """Reference: the plain layer's eager attention probabilities, top-k by hand, the fused token as
    sum_i a_i x_i (or its weighted mean), then the layer's FFN on the reorganised sequence."""
    eager = small_vit("eager", layers=1)
    sdpa = copy.deepcopy(eager)
    sdpa.config._attn_implementation = "sdpa"
    layer = eager.vit.layers[0]
    x = torch.randn(2, 65, 32)
    keep = math.ceil(0.6 * 64)
    with torch.no_grad():
        out, probs = layer.attention(layer.layernorm_before(x))  # eager: the probabilities, batch x heads x 65 x 65
        h = x + out
        a = probs[:, :, 0, 1:].mean(dim=1)  # [CLS] attention of the 64 image tokens, mean over heads
        rows = []
        for b in range(2):
            top = torch.topk(a[b], keep).indices
            rest = [i for i in range(64) if i not in set(top.tolist())]
            w = a[b, rest] / (a[b, rest].sum() if normalize else 1.0)
            fused = (w[:, None] * h[b, 1:][rest]).sum(0)
            rows.append(torch.cat([h[b, :1], h[b, 1:][top], fused[None]]))
        ref = torch.stack(rows)
        ref = ref + layer.mlp(layer.layernorm_after(ref))
        for model in (eager, sdpa):  # probabilities returned (eager) or the [CLS] row computed (SDPA)
            wrap_vit_layers(model, [0], keep_rate=0.6, fuse_normalize=normalize)
            got = model.vit.layers[0](x)
            assert got.shape == (2, 1 + keep + 1, 32)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_keep_rate_schedule_values():
    t = 0.7
    assert keep_rate_at(0.0, t) == 1.0 and keep_rate_at(1.0, t) == t and keep_rate_at(5.0, t) == t
    assert keep_rate_at(0.5, t) == pytest.approx((1 + t) / 2)
    assert keep_rate_at(0.25, t) == pytest.approx(t + (1 - t) * (math.cos(math.pi / 4) + 1) / 2)
    assert keep_rate_at(0.25, t, kind="linear") == pytest.approx(1 - 0.3 * 0.25)
    assert keep_rate_at(1.5, t, start=2.0, length=10.0) == 1.0  # the paper's shrink_start_epoch
    assert keep_rate_at(7.0, t, start=2.0, length=10.0) == pytest.approx((1 + t) / 2)
    assert keep_rate_at(0.0, t, kind="none") == t
    rates = [keep_rate_at(e / 10, t) for e in range(11)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    cb = KeepRateSchedule(0.5, start_epoch=0.0, epochs=2.0, kind="cosine")
    assert cb.rate_at_step(8, steps_per_epoch=8) == pytest.approx(0.75) and cb.rate_at_step(16, 8) == 0.5


def read_csv_rates(out: Path) -> list[float]:
    import csv

    with open(out / "csv" / "metrics.csv") as f:
        return [float(r["evit/keep_rate"]) for r in csv.DictReader(f) if r.get("evit/keep_rate")]


def test_trains_on_synthetic_images_and_reloads_identically(run_cfg):
    cfg = run_cfg(*TINY, "data=images/synthetic", "data.image.num_train=128", "data.image.num_val=64",
                  "data.batch_size=16", "method.keep_rate=0.5", fast=False)  # fmt: skip
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    assert metrics["val/accuracy"] > 0.25  # 4 balanced classes
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evit_layers"] == [0, 1] and summary["evit_tokens_per_layer"] == [10, 7]  # 16 -> 8+1 -> 5+1
    assert summary["params_trainable"] == summary["params_total"] and summary["evit_flops_ratio"] < 1
    rates = read_csv_rates(out)  # 8 steps per epoch: the cosine ramp over the first epoch, then the target
    assert rates[0] == 1.0 and rates[-1] == 0.5 and rates[4] == pytest.approx(0.75) and rates == sorted(rates, reverse=True)

    reloaded = load_export(out / "export")
    assert [type(m).__name__ for m in reloaded.vit.layers] == ["EViTLayer"] * 2 and reloaded.vit.layers[0].keep_rate == 0.5
    trained = load_checkpoint_model(out / "checkpoints" / "last.ckpt").eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x).logits, trained(pixel_values=x).logits, rtol=0, atol=0)
        plain = ViTForImageClassification.from_pretrained(out / "export").eval()  # plain transformers: no reorganisation
        assert not torch.allclose(plain(pixel_values=x).logits, trained(pixel_values=x).logits)


def write_folder(root: Path, classes=("blue", "green", "red"), n_train: int = 6, n_val: int = 3) -> Path:
    """PNGs whose class is their dominant colour, 20x20 (resized to the model's 32x32)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = (torch.rand(20, 20, 3, generator=g) * 90).to(torch.uint8)
                pixels[..., 2 - c] += 150
                Image.fromarray(pixels.numpy()).save(root / split / name / f"{i}.png")
    return root


def test_trains_on_an_image_folder_and_reloads_identically(run_cfg, tmp_path):
    root = write_folder(tmp_path / "imgs")
    cfg = run_cfg(*TINY, "data=images/folder", f"data.data_dir={root}", "data.batch_size=6", "method.schedule=none", fast=False)
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    assert set(metrics) == {"val/accuracy", "val/score"}
    rows = [json.loads(line) for line in (out / "predictions" / "validation.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and [r["label"] for r in rows] == ["blue"] * 3 + ["green"] * 3 + ["red"] * 3
    assert read_csv_rates(out) == pytest.approx([0.7] * 6)  # schedule=none: the target from step 0 (3 steps x 2 epochs)
    reloaded = load_export(out / "export")
    assert reloaded.config.id2label == {0: "blue", 1: "green", 2: "red"}
    trained = load_checkpoint_model(out / "checkpoints" / "last.ckpt").eval()

    from PIL import Image

    img = Image.open(root / "val" / "red" / "0.png").convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
    x = (torch.tensor(list(img.getdata()), dtype=torch.float32).view(32, 32, 3).permute(2, 0, 1) / 255 - 0.5) / 0.5
    from lightmods.config import validate
    from lightmods.data.images import ImageClassificationDataModule, resolve_task
    from lightmods.data.tasks import get_task

    rc = validate(cfg)
    dm = ImageClassificationDataModule(resolve_task(get_task("images/folder"), rc.data), rc.data, 32, 3)
    dm.setup("fit")
    torch.testing.assert_close(dm.datasets["validation"][6]["pixel_values"], x)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x[None]).logits, trained(pixel_values=x[None]).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["method.keep_rate=0"], "method.keep_rate"),
        (["method.keep_rate=1.5"], "method.keep_rate"),
        (["method.layers=[-1]"], "method.layers"),
        (["method.layers=[1,1]"], "method.layers"),
        (["method.schedule=step"], "method.schedule"),
        (["method.shrink_epochs=-1"], "method.shrink_epochs"),
        (["method.layers=[2]"], "method.layers"),  # tiny_vit has 2 layers
        (["model=tiny", "data=demo"], "method='evit'"),  # a BERT text model
        (["data=images/folder"], "data.data_dir"),
        (["data.image.std=[0.0]"], "data.image.std"),
    ],
)
def test_bad_configs_fail_naming_the_key(run_cfg, overrides, key):
    model = [o for o in overrides if o.startswith("model=")] or ["model=tiny_vit"]
    data = [o for o in overrides if o.startswith("data=")] or ["data=images/synthetic"]
    rest = [o for o in overrides if o not in model + data]
    cfg = run_cfg(*model, *data, "method=evit", "trainer.max_epochs=1", "callbacks.progress_bar=false", *rest, fast=False)
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace(".", r"\.")) as err:
        train(cfg)
    if "model=tiny" in overrides:
        assert "'bert'" in str(err.value)


def test_bad_folders_fail_naming_the_path(tmp_path):
    good = write_folder(tmp_path / "good", n_train=1, n_val=1)
    assert folder_classes(good) == ["blue", "green", "red"]
    assert [r["label"] for r in read_image_folder(good, "train", ["blue", "green", "red"])] == [0, 1, 2]

    no_val = write_folder(tmp_path / "no_val", n_train=1, n_val=1)
    (no_val / "val").rename(no_val / "other")
    with pytest.raises(DataError, match=str(no_val / "val")):
        folder_classes(no_val)
    mismatch = write_folder(tmp_path / "mismatch", n_train=1, n_val=1)
    (mismatch / "val" / "red").rename(mismatch / "val" / "crimson")
    with pytest.raises(DataError, match=r"only in train: \['red'\]; only in val: \['crimson'\]"):
        folder_classes(mismatch)
    empty = write_folder(tmp_path / "empty", n_train=1, n_val=1)
    (empty / "train" / "green" / "0.png").unlink()
    with pytest.raises(DataError, match=f"{empty / 'train' / 'green'} has no images"):
        read_image_folder(empty, "train", ["blue", "green", "red"])
    broken = write_folder(tmp_path / "broken", n_train=1, n_val=1)
    (broken / "val" / "red" / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=f"{broken / 'val' / 'red' / 'bad.png'} is not a readable image"):
        read_image_folder(broken, "validation", ["blue", "green", "red"])
    (broken / "val" / "red" / "bad.png").unlink()
    (broken / "val" / "red" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=f"{broken / 'val' / 'red' / 'notes.txt'} is not an image file"):
        read_image_folder(broken, "validation", ["blue", "green", "red"])
    with pytest.raises(DataError, match=str(tmp_path / "nothing" / "train")):
        (tmp_path / "nothing").mkdir()
        folder_classes(tmp_path / "nothing")


def test_normalisation_comes_from_the_config_then_the_model_processor(run_cfg, tmp_path):
    from lightmods.config import validate
    from lightmods.data.images import ImageClassificationDataModule, resolve_task
    from lightmods.data.tasks import get_task

    root = write_folder(tmp_path / "imgs", n_train=1, n_val=1)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))

    def stats(*overrides, model_path=None):
        rc = validate(run_cfg("model=tiny_vit", "data=images/folder", f"data.data_dir={root}", "method=evit", *overrides, fast=False))
        dm = ImageClassificationDataModule(resolve_task(get_task("images/folder"), rc.data), rc.data, 32, 3, model_path=model_path)
        return [v for t in dm.normalisation() for v in t.tolist()]

    assert stats() == [0.5] * 6  # mean then std, per channel
    assert stats(model_path=str(tmp_path / "model")) == pytest.approx([0.485, 0.456, 0.406, 0.229, 0.224, 0.225])
    assert stats("data.image.mean=[0.1]", "data.image.std=[0.2]", model_path=str(tmp_path / "model")) == pytest.approx([0.1] * 3 + [0.2] * 3)
    with pytest.raises(ConfigError, match=r"data\.image\.mean"):
        stats("data.image.mean=[0.1,0.2]")
