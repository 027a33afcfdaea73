"""CNCConfig / CNCModel: paper defaults, equations by hand, freezing, caching, save/load."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.nn import functional as F

from cnc_hf.modeling import CNCConfig, CNCModel, default_feature_layers
from cnc_hf.modeling.anomaly_map import anomaly_map, image_score
from cnc_hf.modeling.losses import constraint_loss, distillation_loss, normality_alignment_loss
from cnc_hf.modeling.moe import GatedMixtureOfExperts, importance_loss, route_top_k
from cnc_hf.modeling.normality import control_coefficient, normality_promotion

from tiny_models import BLOCK_CNC_PACKAGES, tiny_clip_config, tiny_cnc_config


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return CNCModel(tiny_cnc_config(**overrides))


# ---------------------------------------------------------------- configuration
def test_config_defaults_are_the_papers():
    config = CNCConfig()
    assert config.prompt_length == 12
    assert (config.tau, config.gamma, config.theta) == (0.001, 0.1, 5)
    assert (config.num_experts, config.moe_top_k) == (5, 2)
    assert config.image_size == 224
    assert config.use_mlf and config.use_cnc and config.use_moe
    assert config.normal_token_ids == [14115] and config.abnormal_token_ids == [13568, 14115]
    assert (config.bos_token_id, config.eos_token_id) == (49406, 49407)


def test_feature_layers_derive_from_depth():
    assert default_feature_layers(24) == [6, 12, 18]  # CLIP ViT-L/14
    assert default_feature_layers(12) == [3, 6, 9]  # ViT-B
    assert tiny_cnc_config().feature_layers == [1, 2, 3]
    big = CNCConfig(clip_config=tiny_clip_config(vision_layers=24), image_size=32)
    assert big.feature_layers == [6, 12, 18]


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"feature_layers": [1, 2, 5]}, "feature_layers"),
        ({"feature_layers": [0, 1, 2]}, "feature_layers"),
        ({"feature_layers": [2, 2, 3]}, "each tapped layer once"),  # a repeated layer
        ({"feature_layers": [3, 2]}, "increasing"),
        ({"moe_top_k": 6}, "moe_top_k"),
        ({"tau": 0.0}, "tau"),
        ({"tau": -1.0}, "tau"),
        ({"num_experts": 0}, "num_experts"),
        ({"moe_gating": "dense"}, "moe_gating"),
        ({"image_size": 30}, "image_size"),
        ({"prompt_length": 80}, "prompt_length"),
        ({"normal_token_ids": [10**6]}, "normal_token_ids"),
        ({"image_score_reduction": "median"}, "image_score_reduction"),
    ],
)
def test_bad_config_is_refused_at_construction(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_cnc_config(**overrides)


def test_real_clip_tokenizer_gives_the_stored_ids(clip_bpe_dir):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(str(clip_bpe_dir / "vocab.json"), str(clip_bpe_dir / "merges.txt"))
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    config = CNCConfig()
    assert tokenizer("object", add_special_tokens=False)["input_ids"] == config.normal_token_ids
    assert tokenizer("damaged object", add_special_tokens=False)["input_ids"] == config.abnormal_token_ids


def test_config_saved_by_the_earlier_config_class_loads_identically(tmp_path):
    """tests/data holds a config.json written by CNCConfig before its fields were declared as dataclass
    fields, and the to_dict of that config loaded by that class: today's class reads it to the same values
    and writes it back unchanged."""
    import json
    from pathlib import Path

    data = Path(__file__).parent / "data"
    saved = json.loads((data / "cnc_config_v0_1.json").read_text())
    loaded = json.loads((data / "cnc_config_v0_1.loaded.json").read_text())
    loaded.pop("transformers_version")
    # Fields added since (category recognition, issue 17) load at their defaults: no prototypes.
    loaded.update({"categories": None, "category_distance_limits": None})
    for config in (CNCConfig.from_json_file(data / "cnc_config_v0_1.json"),
                   CNCConfig.from_pretrained(data / "cnc_config_v0_1.json")):
        now = json.loads(json.dumps(config.to_dict(), default=str))
        now.pop("transformers_version")
        assert now == loaded
        config.save_pretrained(tmp_path)
        rewritten = json.loads((tmp_path / "config.json").read_text())
        assert {k: v for k, v in rewritten.items() if k != "transformers_version"} == \
            {k: v for k, v in {**saved, "categories": None, "category_distance_limits": None}.items()
             if k != "transformers_version"}
    assert CNCConfig.from_json_file(data / "cnc_config_v0_1.json").custom_pipelines == {}  # served by cnc_hf here


# ---------------------------------------------------------------- equations by hand
def test_control_coefficient_and_promotion_by_hand():
    # Eq. (6): Psi = (1 + tanh(alpha - beta)) / 2
    assert control_coefficient(torch.tensor(0.3), torch.tensor(0.3)).item() == pytest.approx(0.5)
    assert control_coefficient(torch.tensor(1.0), torch.tensor(0.0)).item() == pytest.approx((1 + math.tanh(1)) / 2)
    # Eq. (5)/(7): one patch f = (3, 4) (||f|| = 5), joint feature (1, 0), g_n = (1, 0), g_a = (0, 1)
    f = torch.tensor([[[3.0, 4.0]]])
    joint = torch.tensor([[[1.0, 0.0]]])
    out = normality_promotion(f, joint, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), scale="patch")
    psi = (1 + math.tanh(1.0 - 0.0)) / 2  # alpha = 1, beta = 0
    assert torch.allclose(out, torch.tensor([[[3 + psi / 5, 4 + psi / 5]]]))
    # bf16 features (as under autocast): f = (300, 400), the shift psi/500 ~ 0.0015 is far below bf16's
    # step at 300 (2.0), so the sum is kept in float32.
    out = normality_promotion((100 * f).bfloat16(), joint.bfloat16(), torch.tensor([1.0, 0.0]).bfloat16(),
                              torch.tensor([0.0, 1.0]).bfloat16())
    assert out.dtype == torch.float32
    psi_bf16 = control_coefficient(torch.tensor(1.0).bfloat16(), torch.tensor(0.0).bfloat16()).float().item()
    assert torch.allclose(out - torch.tensor([[[300.0, 400.0]]]), torch.full((1, 1, 2), psi_bf16 / 500), rtol=0, atol=1e-4)


def test_alignment_loss_by_hand_at_tau():
    # Eq. (4)/(10) with e.g_n = 0.002, e.g_a = 0.001 at tau = 0.001: -log(e^2 / (e^2 + e^1))
    e = torch.tensor([[[1.0, 0.0]]])  # (B=1, n=1, P=2)
    g = torch.tensor([[[0.002, 0.0], [0.001, 0.0]]])  # (n=1, 2, P)
    expected = -math.log(math.exp(2) / (math.exp(2) + math.exp(1)))
    assert normality_alignment_loss(e, g, tau=0.001).item() == pytest.approx(expected, rel=1e-6)
    # sum over layers, mean over batch; stable for large logits (cosines at tau = 0.001)
    e2 = F.normalize(torch.randn(3, 2, 4), dim=-1)
    g2 = F.normalize(torch.randn(2, 2, 4), dim=-1)
    logits = torch.einsum("bnp,nkp->bnk", e2, g2) / 0.001
    ref = (-torch.log_softmax(logits.double(), dim=-1)[..., 0]).sum(1).mean()
    assert normality_alignment_loss(e2, g2, 0.001).item() == pytest.approx(ref.item(), rel=1e-5)


def test_alignment_logits_and_promotion_stay_float32_under_bf16_autocast():
    """At tau = 0.001 a bf16 matmul's rounding (~1e-3 on a cosine) would move a logit by ~1, and alpha - beta
    in Psi would blur: both are computed in float32 whatever the autocast."""
    e = F.normalize(torch.randn(4, 3, 16), dim=-1)
    g = F.normalize(torch.randn(3, 2, 16), dim=-1)
    f, joint = torch.randn(2, 5, 8), F.normalize(torch.randn(2, 5, 16), dim=-1)
    loss, promoted = normality_alignment_loss(e, g, 0.001), normality_promotion(f, joint, g[0, 0], g[0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(normality_alignment_loss(e, g, 0.001), loss)
        assert torch.equal(normality_promotion(f, joint, g[0, 0], g[0, 1]), promoted)


def test_constraint_switches_at_theta():
    c1, c2 = torch.tensor(2.0), torch.tensor(3.0)
    assert constraint_loss(c1, c2, epoch=4, theta=5, gamma=0.1).item() == 2.0
    assert constraint_loss(c1, c2, epoch=5, theta=5, gamma=0.1).item() == pytest.approx(2.3)


def test_distillation_loss_flattens_whole_maps():
    f = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one image, 2 patches
    f_hat = torch.tensor([[[1.0, 0.0], [0.0, -1.0]]])
    # Flat: (1,0,0,1).(1,0,0,-1) = 0 -> cos 0 -> loss 1 (a per-patch mean would give 1 too; use 3 patches)
    assert distillation_loss([f], [f_hat]).item() == pytest.approx(1.0)
    f = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    f_hat = torch.tensor([[[2.0, 0.0], [1.0, 0.0]]])
    cos = 4.0 / (math.sqrt(5) * math.sqrt(5))
    assert distillation_loss([f, f], [f_hat, f_hat]).item() == pytest.approx(2 * (1 - cos))


def test_importance_loss_by_hand():
    gates = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.6, 0.4]])
    importance = [0.7, 0.9, 0.4]
    mean = sum(importance) / 3
    var = sum((x - mean) ** 2 for x in importance) / 3
    assert importance_loss(gates, eps=0.0).item() == pytest.approx(var / mean**2, rel=1e-6)
    assert importance_loss(torch.ones(7, 1)).item() == 0.0  # T = 1: balanced by definition


@pytest.mark.parametrize("gating", ["topk_softmax", "softmax_topk"])
def test_top_k_routing_picks_exactly_k_experts(gating):
    torch.manual_seed(0)
    logits = torch.randn(50, 5)
    gates, indices, weights = route_top_k(logits, 2, gating)
    assert ((gates > 0).sum(dim=1) == 2).all()
    assert torch.equal(indices, logits.topk(2, dim=1).indices)
    if gating == "topk_softmax":
        assert torch.allclose(weights, logits.topk(2, dim=1).values.softmax(dim=1))
        assert torch.allclose(gates.sum(dim=1), torch.ones(50))
    else:
        assert torch.allclose(weights, logits.softmax(dim=1).topk(2, dim=1).values)


def test_moe_output_is_weighted_sum_of_chosen_experts():
    torch.manual_seed(0)
    moe = GatedMixtureOfExperts(hidden_size=8, num_experts=4, top_k=2)
    z = torch.randn(3, 5, 8)
    out, gates = moe(z)
    flat = z.reshape(-1, 8)
    expected = torch.stack([sum(gates[r, t] * moe.experts[t](flat[r]) for t in range(4)) for r in range(15)])
    assert torch.allclose(out.reshape(-1, 8), expected, atol=1e-6)


def test_moe_dispatch_has_no_data_dependent_shapes_and_matches_per_expert_dispatch():
    """torch.export traces the MoE (no nonzero/indexing by routing), and the dense dispatch equals the
    per-expert dispatch (index the routed tokens, run the expert, add back) that it replaced."""
    torch.manual_seed(0)
    moe = GatedMixtureOfExperts(hidden_size=8, num_experts=5, top_k=2).eval()
    z = torch.randn(2, 7, 8)
    out, gates = moe(z)
    flat = z.reshape(-1, 8)
    _, indices, weights = route_top_k(moe.router(flat), 2)
    reference = torch.zeros_like(flat)
    for t, expert in enumerate(moe.experts):
        rows, slot = (indices == t).nonzero(as_tuple=True)
        reference.index_add_(0, rows, weights[rows, slot].unsqueeze(-1) * expert(flat[rows]))
    assert torch.allclose(out.reshape(-1, 8), reference, atol=1e-6)
    exported = torch.export.export(moe, (z,))
    other = torch.randn(2, 7, 8)
    assert torch.allclose(exported.module()(other)[0], moe(other)[0], atol=1e-6)


def test_anomaly_map_by_hand():
    # 1x2 grid, one layer: patch 0 identical (distance 0), patch 1 orthogonal (distance 1)
    f = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    f_hat = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])
    maps = anomaly_map([f, f], [f_hat, f_hat], grid=(1, 2), output_size=(1, 2))
    assert torch.allclose(maps, torch.tensor([[[0.0, 2.0]]]))  # summed over 2 layers
    up = anomaly_map([f], [f_hat], grid=(1, 2), output_size=(2, 4))
    assert up.shape == (1, 2, 4)
    assert torch.allclose(up[0, :, 0], torch.zeros(2)) and torch.allclose(up[0, :, -1], torch.ones(2))
    assert image_score(maps).item() == 2.0


# ---------------------------------------------------------------- the model
def test_train_mode_returns_losses_and_c2_joins_at_theta():
    model = make_model()
    model.train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    before = model(pixel_values=x, epoch=4)
    torch.manual_seed(1)
    after = model(pixel_values=x, epoch=5)
    for out in (before, after):
        assert torch.isfinite(out.loss)
        assert torch.allclose(out.loss, out.loss_distill + out.loss_constraint + out.loss_moe)
    assert torch.allclose(before.loss_constraint, before.loss_c1)
    assert torch.allclose(after.loss_constraint, after.loss_c1 + 0.1 * after.loss_c2)


def test_eval_mode_returns_map_at_input_resolution_and_max_score():
    model = make_model().eval()
    x = torch.randn(3, 3, 48, 40)  # not the config's 32x32: needs position interpolation
    with torch.no_grad():
        out = model(pixel_values=x)
    assert out.anomaly_map.shape == (3, 48, 40)
    assert torch.allclose(out.image_score, out.anomaly_map.flatten(1).amax(1))
    assert out.loss is None


def test_decoder_attention_follows_attn_implementation_and_eager_equals_sdpa(monkeypatch, tmp_path):
    """The decoder's attention goes through transformers' attention interface: `set_attn_implementation` /
    `from_pretrained(attn_implementation=...)` switch it (with CLIP's), and eager and SDPA agree."""
    from cnc_hf.modeling import decoder as decoder_module

    model = make_model()
    assert model.config._attn_implementation == "sdpa"
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        sdpa_map = model.eval()(pixel_values=pixel_values).anomaly_map
        torch.manual_seed(1)
        sdpa_loss = model.train()(pixel_values=pixel_values, epoch=9).loss
    calls = []
    eager = decoder_module.eager_attention_forward
    monkeypatch.setattr(decoder_module, "eager_attention_forward", lambda *a, **k: calls.append(1) or eager(*a, **k))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager_map = model.eval()(pixel_values=pixel_values).anomaly_map
        torch.manual_seed(1)
        eager_loss = model.train()(pixel_values=pixel_values, epoch=9).loss
    assert len(calls) == 2 * len(model.decoder.blocks)
    torch.testing.assert_close(eager_map, sdpa_map, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eager_loss, sdpa_loss, atol=1e-4, rtol=1e-5)
    model.save_pretrained(tmp_path)
    calls.clear()
    loaded = CNCModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixel_values).anomaly_map, sdpa_map, atol=1e-5, rtol=1e-5)
    assert len(calls) == len(model.decoder.blocks)


def test_forward_takes_grid_and_output_size_with_tapped_features_only():
    model = make_model().eval()
    pixel_values = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        direct = model(pixel_values=pixel_values).anomaly_map
        cached = model(tapped_features=model.encode_image(pixel_values), grid_size=(4, 8), output_size=(32, 64))
        torch.testing.assert_close(cached.anomaly_map, direct)
        with pytest.raises(TypeError, match="tapped_features"):
            model(pixel_values=pixel_values, grid_size=(4, 8))


def test_only_cnc_parts_train_and_no_gradient_reaches_clip():
    model = make_model()
    model.train()
    model(pixel_values=torch.randn(2, 3, 32, 32), epoch=6).loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in model.clip.parameters())
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_learner", "fusion", "moe", "decoder"}
    for name, p in model.named_parameters():
        if p.requires_grad and not name.startswith("moe.experts"):  # experts unused by a batch may get no grad
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("mlf, cnc, moe", [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)])
def test_table2_ablation_switches(mlf, cnc, moe):
    model = make_model(use_mlf=bool(mlf), use_cnc=bool(cnc), use_moe=bool(moe))
    assert (model.fusion is not None, model.prompt_learner is not None, model.moe is not None) == (mlf, cnc, moe)
    model.train()
    out = model(pixel_values=torch.randn(2, 3, 32, 32), epoch=6)
    out.loss.backward()
    if not cnc:
        assert out.loss_constraint.item() == 0.0
    if not moe:
        assert out.loss_moe.item() == 0.0
    model.eval()
    with torch.no_grad():
        assert model(pixel_values=torch.randn(1, 3, 32, 32)).anomaly_map.shape == (1, 32, 32)


def test_vision_tower_stops_at_deepest_tap():
    model = make_model(feature_layers=[1, 2])  # 4-layer tower, deepest tap 2
    calls = []
    for i, layer in enumerate(model.clip.vision_model.encoder.layers):
        layer.register_forward_hook(lambda *a, i=i: calls.append(i))
    model.eval()
    with torch.no_grad():
        model(pixel_values=torch.randn(1, 3, 32, 32))
    assert calls == [0, 1]


def test_text_features_computed_once_in_eval():
    model = make_model().eval()
    calls = []
    model.clip.text_model.encoder.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model(pixel_values=torch.randn(2, 3, 32, 32))
        model(pixel_values=torch.randn(2, 3, 32, 32))
    assert len(calls) == 1
    model(pixel_values=torch.randn(1, 3, 32, 32))  # grad enabled, still cached
    assert len(calls) == 1
    with torch.no_grad():
        model.prompt_learner.context.add_(0.1)  # prompts changed: recompute once
        model(pixel_values=torch.randn(1, 3, 32, 32))
        model(pixel_values=torch.randn(1, 3, 32, 32))
    assert len(calls) == 2


def test_cached_tapped_features_give_the_same_map():
    model = make_model().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        direct = model(pixel_values=x)
        cached = model(tapped_features=model.encode_image(x))
    assert torch.allclose(direct.anomaly_map, cached.anomaly_map, atol=1e-6)



def test_bf16_autocast_inference_follows_float32():
    """Under bf16 autocast the maps stay float32 and follow the float32 maps (bf16 keeps ~3 digits)."""
    model = make_model().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        full = model(pixel_values=x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(pixel_values=x)
    assert low.anomaly_map.dtype == torch.float32 and torch.isfinite(low.anomaly_map).all()
    assert torch.corrcoef(torch.stack([full.anomaly_map.flatten(), low.anomaly_map.flatten()]))[0, 1] > 0.99
    assert torch.allclose(low.image_score, full.image_score, rtol=0.05)

# ---------------------------------------------------------------- loading and saving
def test_from_clip_pretrained_loads_clip_unchanged_and_frozen(tiny_clip_dir_with_tokenizer):
    from safetensors.torch import load_file

    model = CNCModel.from_clip_pretrained(tiny_clip_dir_with_tokenizer, image_size=32)
    saved = load_file(tiny_clip_dir_with_tokenizer / "model.safetensors")
    state = model.clip.state_dict()
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    assert not any(p.requires_grad for p in model.clip.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("clip."))
    assert model.config.normal_token_ids == [14115] and model.config.abnormal_token_ids == [13568, 14115]
    assert torch.isfinite(model.prompt_learner.context).all() and model.prompt_learner.context.abs().sum() > 0
    # the non-persistent position ids of CLIP come back right after meta-device loading
    ids = model.clip.vision_model.embeddings.position_ids
    assert torch.equal(ids, torch.arange(ids.shape[-1]).unsqueeze(0))


def test_from_clip_pretrained_without_tokenizer_uses_stored_ids(tiny_clip_dir):
    config = CNCConfig.from_clip_pretrained(tiny_clip_dir, image_size=32, moe_top_k=1)
    assert config.normal_token_ids == [14115] and config.moe_top_k == 1


def test_from_clip_pretrained_errors(tmp_path, tiny_clip_dir):
    with pytest.raises(OSError):
        CNCModel.from_clip_pretrained(tmp_path / "missing")
    (tmp_path / "config.json").write_text((tiny_clip_dir / "config.json").read_text())
    with pytest.raises(OSError):  # a config without weights
        CNCModel.from_clip_pretrained(tmp_path)


def test_save_load_round_trip_keeps_maps_and_freezing(tmp_path):
    model = make_model().eval()
    model.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"model.safetensors", "config.json", "modeling_cnc.py", "configuration_cnc.py", "moe.py"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    loaded = CNCModel.from_pretrained(tmp_path).eval()
    assert not any(p.requires_grad for p in loaded.clip.parameters())
    assert all(p.requires_grad for n, p in loaded.named_parameters() if not n.startswith("clip."))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).anomaly_map, loaded(pixel_values=x).anomaly_map)


def test_auto_classes_know_cnc(tmp_path):
    import cnc_hf  # noqa: F401  (registers "cnc")
    from transformers import AutoConfig, AutoModel

    make_model().save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), CNCConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), CNCModel)


def test_remote_code_loads_without_the_package(tmp_path):
    model = make_model().eval()
    model.save_pretrained(tmp_path / "model")
    x = torch.randn(1, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = model(pixel_values=x).anomaly_map
    torch.save(expected, tmp_path / "expected.pt")
    script = BLOCK_CNC_PACKAGES + textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "CNCModel" and not [m for m in sys.modules if m.startswith("cnc_hf")]
        assert not any(p.requires_grad for p in model.clip.parameters())
        x = torch.load({str(tmp_path / "x.pt")!r}, weights_only=True)
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        with torch.no_grad():
            assert torch.equal(model(pixel_values=x).anomaly_map, expected)
        print("REMOTE_OK")
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"}
    import os

    env = {**os.environ, **env}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "REMOTE_OK" in result.stdout, result.stderr[-3000:]
