"""The paper's reading is the default and each deviation is one named switch that changes the computation
the way its docstring says: promotion_scale (Eq. 5/8), prompt_training (Eq. 4 vs 9/10), float32 joint
space (Eq. 4/7/10 under bf16), and train.py's --protocol paper."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn import functional as F

from tiny_models import tiny_cnc_config
from cnc_hf.modeling import CNCConfig, CNCModel
from cnc_hf.modeling.normality import control_coefficient, normality_promotion
from cnc_hf_train import train


def make_model(**overrides):
    torch.manual_seed(0)
    return CNCModel(tiny_cnc_config(**overrides))


# ---------------------------------------------------------------- Eq. (5)/(8): lambda = 1/||f_i||
def test_map_scale_divides_by_the_norm_of_the_whole_map_by_hand():
    # A 2x2 map of C = 2 channels: patches (1,0), (0,1), (1,1), (1,-1); ||f|| over H x W x C = sqrt(6).
    f = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]]])
    joint = F.normalize(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]]]), dim=-1)
    g_n, g_a = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    s = 1 / math.sqrt(2)
    alpha_minus_beta = [1.0, -1.0, s - s, s + s]  # joint . g_n - joint . g_a per patch (Eq. 7)
    psi = torch.tensor([(1 + math.tanh(d)) / 2 for d in alpha_minus_beta])
    expected_map = f + (psi / math.sqrt(6)).view(1, 4, 1)
    assert torch.allclose(normality_promotion(f, joint, g_n, g_a), expected_map, atol=1e-6)  # the default
    patch_norms = torch.tensor([1.0, 1.0, math.sqrt(2), math.sqrt(2)])
    expected_patch = f + (psi / patch_norms).view(1, 4, 1)
    assert torch.allclose(normality_promotion(f, joint, g_n, g_a, scale="patch"), expected_patch, atol=1e-6)
    # one lambda per image: a second image 10x larger gets a 10x smaller shift, the first is unchanged
    both = normality_promotion(torch.cat([f, 10 * f]), torch.cat([joint, joint]), g_n, g_a)
    assert torch.allclose(both[0], expected_map[0], atol=1e-6)
    assert torch.allclose(both[1] - 10 * f[0], (psi / (10 * math.sqrt(6))).view(4, 1), atol=1e-6)
    with pytest.raises(ValueError, match="promotion scale"):
        normality_promotion(f, joint, g_n, g_a, scale="channel")


def test_promotion_scale_reaches_the_model_map():
    x = torch.randn(1, 3, 32, 32)
    maps = {}
    for scale in ("map", "patch"):
        model = make_model(promotion_scale=scale).eval()
        with torch.no_grad():
            maps[scale] = model(pixel_values=x).anomaly_map
    assert not torch.allclose(maps["map"], maps["patch"])


# ---------------------------------------------------------------- Eq. (4) trains the prompts
def _prompt_grads(prompt_training: str) -> dict[str, torch.Tensor | None]:
    model = make_model(prompt_training=prompt_training, noise_std=0.0, fusion_dropout=0.0).train()
    out = model(pixel_values=torch.randn(2, 3, 32, 32), epoch=6)  # epoch >= theta: L_c2 is in the loss
    context = model.prompt_learner.context
    return {name: torch.autograd.grad(getattr(out, name), context, retain_graph=True, allow_unused=True)[0]
            for name in ("loss_distill", "loss_c2", "loss_c1")}


def _is_zero(grad) -> bool:
    return grad is None or not grad.abs().sum().item()


def test_alignment_mode_trains_the_prompts_by_eq4_only():
    grads = _prompt_grads("alignment")
    assert _is_zero(grads["loss_distill"]) and _is_zero(grads["loss_c2"])
    assert not _is_zero(grads["loss_c1"])


def test_all_mode_lets_every_loss_move_the_prompts():
    grads = _prompt_grads("all")
    assert not _is_zero(grads["loss_distill"]) and not _is_zero(grads["loss_c2"]) and not _is_zero(grads["loss_c1"])


def test_prompt_training_changes_no_inference_result():
    x = torch.randn(2, 3, 32, 32)
    maps = []
    for mode in ("alignment", "all"):
        with torch.no_grad():
            maps.append(make_model(prompt_training=mode).eval()(pixel_values=x).anomaly_map)
    assert torch.equal(maps[0], maps[1])  # the switch is about training only


# ---------------------------------------------------------------- config: defaults, saving, old configs
def test_defaults_are_the_papers_reading_and_bad_values_are_refused():
    config = CNCConfig()
    assert (config.promotion_scale, config.prompt_training) == ("map", "alignment")
    with pytest.raises(ValueError, match="promotion_scale"):
        CNCConfig(promotion_scale="pixel")
    with pytest.raises(ValueError, match="prompt_training"):
        CNCConfig(prompt_training="none")


def test_switches_are_saved_and_old_configs_load_with_their_old_behaviour(tmp_path):
    model = make_model(promotion_scale="map", prompt_training="alignment")
    model.save_pretrained(tmp_path / "new")
    saved = json.loads((tmp_path / "new" / "config.json").read_text())
    assert (saved["promotion_scale"], saved["prompt_training"]) == ("map", "alignment")  # written even as defaults
    assert CNCConfig.from_pretrained(tmp_path / "new").promotion_scale == "map"
    # A config.json written before the switches existed: it was trained per patch with all-loss prompts.
    old = {k: v for k, v in saved.items() if k not in ("promotion_scale", "prompt_training")}
    (tmp_path / "new" / "config.json").write_text(json.dumps(old))
    loaded = CNCModel.from_pretrained(tmp_path / "new")
    assert (loaded.config.promotion_scale, loaded.config.prompt_training) == ("patch", "all")
    assert CNCModel.from_clip_pretrained  # overrides reach the config (checked in the flags test below)


# ---------------------------------------------------------------- bf16: the joint space in float32
def test_bf16_losses_follow_float32_closer_than_a_bf16_projection(monkeypatch):
    """Under bf16 autocast the joint-space projections run in float32; a bf16 projection (the old code) left
    L_c2 further from its float32 value (at tau = 0.001 a rounding of 1e-3 is a logit of ~1)."""
    import cnc_hf.modeling.modeling_cnc as modeling_cnc
    import cnc_hf.modeling.prompts as prompts

    model = make_model(noise_std=0.0, fusion_dropout=0.0).train()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    # The same float32 encoder features for every run (the feature cache's path): what differs is only
    # what runs under autocast after the encoder.
    tapped = model.encode_image(x)

    def losses():
        with torch.no_grad():
            out = model(tapped_features=tapped, epoch=6)
        return torch.stack([out.loss_c1, out.loss_c2]).float()

    reference = losses()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        now = losses()

        def bf16_projection(tokens, projection, layer_norm=None):
            if layer_norm is not None:
                tokens = layer_norm(tokens)
            return F.normalize(projection(tokens), dim=-1)

        monkeypatch.setattr(modeling_cnc, "project_to_joint_space", bf16_projection)
        monkeypatch.setattr(prompts, "project_to_joint_space", bf16_projection)
        before = losses()
    error_now, error_before = (now - reference).abs(), (before - reference).abs()
    # L_c1 (Eq. 4) sees float32 encoder features: with the float32 projection it is the float32 loss.
    assert error_now[0] < 1e-3 * reference[0] and error_before[0] > 10 * error_now[0], (reference, now, before)
    # L_c2 (Eq. 10) also carries the bf16 decoder's rounding, which no projection undoes.
    assert error_now.sum() < error_before.sum(), (reference, now, before)


def test_joint_space_is_float32_for_bf16_weights_and_inputs():
    from cnc_hf.modeling.joint_space import project_to_joint_space

    torch.manual_seed(0)
    projection, norm = torch.nn.Linear(8, 4, bias=False), torch.nn.LayerNorm(8)
    tokens = torch.randn(3, 8)
    expected = F.normalize(projection(norm(tokens)), dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = project_to_joint_space(tokens.bfloat16(), projection.bfloat16(), norm.bfloat16())
    assert out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=2e-2)  # only the bf16 inputs/weights' own rounding remains


# ---------------------------------------------------------------- --protocol paper
def _args(*extra):
    return train.parse_args(["--dataset", "mvtec", "--data_dir", "x", "--output_dir", "o", *extra])


def test_protocol_paper_uses_every_image_no_blur_and_a_global_batch():
    practical = _args()
    assert practical.protocol == "practical" and practical.calibration_fraction == 0.1
    assert "map_smoothing_sigma" not in train.config_overrides(practical)
    assert (train.config_overrides(practical)["promotion_scale"], practical.prompt_training) == ("map", "alignment")
    paper = _args("--protocol", "paper")
    assert paper.calibration_fraction == 0.0  # every training image trains
    assert train.config_overrides(paper)["map_smoothing_sigma"] == 0.0  # Eq. (17), score = max of that map
    train.per_process_batch(paper, 2)
    assert paper.batch_size == 4  # 8 in all over 2 processes
    odd = _args("--protocol", "paper", "--batch_size", "7")
    with pytest.raises(train.TrainingSetupError, match="divisible"):
        train.per_process_batch(odd, 2)
    train.per_process_batch(practical, 2)
    assert practical.batch_size == 8  # practical: per process
    switched = train.config_overrides(_args("--promotion_scale", "patch", "--prompt_training", "all"))
    assert (switched["promotion_scale"], switched["prompt_training"]) == ("patch", "all")


# ---------------------------------------------------------------- Eq. (15): CV^2 (default) or as printed
def test_importance_loss_literal_form_is_r_squared_times_cv2_by_hand():
    from cnc_hf.modeling.moe import importance_loss

    gates = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.6, 0.4]])  # R = 2 patches, T = 3 experts
    importance = [0.7, 0.9, 0.4]
    mean = sum(importance) / 3
    sd2 = sum((x - mean) ** 2 for x in importance) / 3
    assert importance_loss(gates, eps=0.0).item() == pytest.approx(sd2 / mean**2, rel=1e-6)
    # printed: SD(I)^2 / ((1/R) I)^2, the T-vector (1/R) I taken through its mean over experts
    assert importance_loss(gates, eps=0.0, form="literal").item() == pytest.approx(sd2 / (mean / 2) ** 2, rel=1e-6)
    model = make_model(moe_importance_loss="literal", noise_std=0.0, fusion_dropout=0.0).train()
    x = torch.randn(2, 3, 32, 32)
    literal = model(pixel_values=x, epoch=0).loss_moe
    model.config.moe_importance_loss = "cv2"
    cv2 = model(pixel_values=x, epoch=0).loss_moe
    routed = 2 * (1 + 4 * 4)  # B x (CLS + 4x4 patches): 32 px images, 8 px patches; the CLS token is routed too
    assert literal.item() == pytest.approx(routed**2 * cv2.item(), rel=1e-4)
    with pytest.raises(ValueError, match="moe_importance_loss"):
        CNCConfig(moe_importance_loss="sum")


def test_from_json_file_keeps_the_legacy_behaviour_of_an_old_config(tmp_path):
    CNCConfig(**tiny_cnc_config().to_dict()).to_json_file(tmp_path / "new.json")
    saved = json.loads((tmp_path / "new.json").read_text())
    old = {k: v for k, v in saved.items() if k not in ("promotion_scale", "prompt_training")}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert CNCConfig.from_json_file(tmp_path / "old.json").promotion_scale == "patch"
    assert CNCConfig.from_json_file(tmp_path / "new.json").promotion_scale == "map"
