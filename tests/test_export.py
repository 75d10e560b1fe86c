"""``export/``: LoRA-family adapters load in HF PEFT with no lightmods import and give the same outputs;
full fine-tuning and other mergeable adapters (LoRETTA_rep, merged) load as a plain transformers model;
everything loads back through lightmods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightmods.export import export_kind, export_model, load_export
from lightmods.peft import adapter_layers
from lightmods.run import train
from tests.test_peft import build


def _trained_like(net):
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return net.eval()


@pytest.mark.parametrize(
    "method,kind",
    [("lora", "peft_lora"), ("moslora", "peft_lora"), ("full_ft", "transformers"), ("loretta_rep", "transformers"), ("adapter", "lightmods"), ("loretta_adp", "lightmods")],
)
def test_export_round_trip(tmp_path, method, kind):
    net, m, batch = build("tiny", method, tmp_path)
    net = _trained_like(net)
    out = export_model(net, tmp_path / "export", {"note": "unit test"}, m.family.head_modules, method)
    assert json.loads((out / "lightmods.json").read_text())["kind"] == kind == export_kind(net, method)
    with torch.no_grad():
        expected = net(**batch).logits
        if kind == "peft_lora":
            from peft import AutoPeftModelForSequenceClassification

            peft_model = AutoPeftModelForSequenceClassification.from_pretrained(out).eval()
            torch.testing.assert_close(peft_model(**batch).logits, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(load_export(out)(**batch).logits, expected, atol=1e-5, rtol=1e-5)
        elif kind == "transformers":
            from transformers import AutoModelForSequenceClassification

            torch.testing.assert_close(AutoModelForSequenceClassification.from_pretrained(out).eval()(**batch).logits, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(load_export(out)(**batch).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model", ["tiny", "tiny_llama"])
def test_mergeable_adapters_peft_cannot_express_export_merged_as_plain_transformers(tmp_path, model):
    """LoRETTA_rep's tensor trains are merged into the weights: a plain model, no adapter tensors left."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    net, m, batch = build(model, "loretta_rep", tmp_path)
    net = _trained_like(net)
    out = export_model(net, tmp_path / "export", {"note": "unit test"}, m.family.head_modules, "loretta_rep")
    assert json.loads((out / "lightmods.json").read_text())["kind"] == "transformers"
    keys = set(load_file(out / "model.safetensors"))
    assert not any("lora_" in k or "base_layer" in k for k in keys)
    assert not any(layer.merged for _, layer in adapter_layers(net))  # the exported copy was merged, not the model
    with torch.no_grad():
        expected = net(**batch).logits
        plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
        torch.testing.assert_close(plain(**batch).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(load_export(out)(**batch).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["adapter", "loretta_adp"])
def test_lightmods_format_round_trip_rebuilds_from_the_run_config(run_cfg, method):
    cfg = run_cfg(f"method={method}")
    train(cfg)
    out = Path(cfg.paths.output_dir) / "export"
    meta = json.loads((out / "lightmods.json").read_text())
    assert meta["kind"] == "lightmods" and meta["config"]["method"]["name"] == method
    model = load_export(out)
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, ckpt[f"model.{k}"])


def test_every_run_writes_an_export(run_cfg):
    cfg = run_cfg("method=lora")
    train(cfg)
    out = Path(cfg.paths.output_dir) / "export"
    assert {"adapter_config.json", "adapter_model.safetensors", "lightmods.json", "base"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and "classifier" in config["modules_to_save"]
