r"""CNCModel: frozen CLIP + learnable prompts, MLF, gated MoE and a reverse-distillation decoder.

Data flow (one image, n tapped layers; the paper's Sec. 3 and Fig. 2, the README's "Design choices" for what it
leaves open):
    CLIP vision tower up to the deepest tap -> f_1..f_n (+CLS)
    [training: + Gaussian noise] -> Phi (Eq. 12) -> gated MoE (Eq. 13-14) -> decoder -> \hat f_1..\hat f_n
    prompts (Eq. 2-3) -> frozen text tower -> g_n^i, g_a^i
    normality promotion (Eq. 5-8) -> f_i*, \hat f_i*
    training: L = L_distill (9) + L_constraint (11) + L_moe (15)        (Eq. 16)
    inference: map = sum_i up(1 - cos(f_i*, \hat f_i*)) (Eq. 17), score = max(map)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers import CLIPModel, PreTrainedModel
from transformers.utils import ModelOutput, logging

from .anomaly_map import anomaly_map, gaussian_blur, image_score
from .category import embed as category_embedding, similarities as prototype_similarities
from .configuration_cnc import CNCConfig, pop_hub_kwargs
from .decoder import CNCDecoder
from .fusion import MultiLayerFusion
from .joint_space import project_to_joint_space
from .losses import constraint_loss, distillation_loss, normality_alignment_loss
from .moe import GatedMixtureOfExperts, importance_loss
from .normality import normality_promotion
from .prompts import CNCPromptLearner

logger = logging.get_logger(__name__)


@dataclass
class CNCOutput(ModelOutput):
    r"""Output of [`CNCModel`].

    Training mode fills the losses; evaluation mode fills `anomaly_map` and `image_score`.

    Args:
        loss: L_total of Eq. (16) = loss_distill + loss_constraint + loss_moe.
        loss_distill: Eq. (9).
        loss_constraint: Eq. (11) (L_c1, plus gamma L_c2 from epoch theta).
        loss_moe: Eq. (15).
        loss_c1, loss_c2: Eq. (4) and Eq. (10), reported for logging (L_c2 is computed every epoch).
        anomaly_map: (B, H, W) at the input resolution, Eq. (17).
        image_score: (B,), the map reduced per `config.image_score_reduction` (max by default).
        category_similarity: (B, K), cosine similarity of each image to each of the K training
            categories' prototypes (`config.categories` order); None when the model has none.
    """

    loss: torch.FloatTensor | None = None
    loss_distill: torch.FloatTensor | None = None
    loss_constraint: torch.FloatTensor | None = None
    loss_moe: torch.FloatTensor | None = None
    loss_c1: torch.FloatTensor | None = None
    loss_c2: torch.FloatTensor | None = None
    anomaly_map: torch.FloatTensor | None = None
    image_score: torch.FloatTensor | None = None
    category_similarity: torch.FloatTensor | None = None


class CNCPreTrainedModel(PreTrainedModel):
    config_class = CNCConfig
    config: CNCConfig
    base_model_prefix = "clip"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _supports_sdpa = True
    _no_split_modules = ["CLIPEncoderLayer", "ResidualAttentionBlock"]

    def _init_weights(self, module):
        # CLIP's own modules are dispatched to CLIPModel._init_weights by transformers.
        from transformers import initialization as init

        super()._init_weights(module)
        if isinstance(module, CNCPromptLearner):
            init.normal_(module.context, mean=0.0, std=self.config.initializer_range)


class CNCModel(CNCPreTrainedModel):
    r"""CNC (Cross-modal Normality Constraint) for multi-class unsupervised anomaly detection.

    `model(pixel_values, epoch=e)` in train mode returns the losses of Eq. (16); in eval mode
    the anomaly map (Eq. 17) and image score. Only the prompts, fusion, MoE and decoder train;
    CLIP stays frozen (also after `from_pretrained`, which re-enables gradients on load).
    """

    def __init__(self, config: CNCConfig):
        super().__init__(config)
        self.clip = CLIPModel(config.clip_config)
        width = config.vision_hidden_size
        n = len(config.feature_layers)
        text = config.clip_config.text_config
        self.prompt_learner = (
            CNCPromptLearner(n, config.prompt_length, text.hidden_size, config.normal_token_ids,
                             config.abnormal_token_ids, config.bos_token_id, config.eos_token_id)
            if config.use_cnc else None
        )
        self.fusion = MultiLayerFusion(n, width, config.fusion_dropout) if config.use_mlf else None
        self.moe = (
            GatedMixtureOfExperts(width, config.num_experts, config.moe_top_k, config.expert_mlp_ratio, config.moe_gating)
            if config.use_moe else None
        )
        heads = config.decoder_num_heads or config.clip_config.vision_config.num_attention_heads
        self.decoder = CNCDecoder(n, width, heads, config.decoder_mlp_ratio, config=self.config)
        self._text_cache: tuple | None = None
        if config.categories:  # rows filled by set_category_prototypes (training) or from the weights file
            self.register_buffer(
                "category_prototypes", torch.zeros(len(config.categories), n * width), persistent=True
            )
        self.post_init()
        self.freeze_clip()

    # ------------------------------------------------------------------ loading / freezing
    def freeze_clip(self) -> None:
        """Freeze the CLIP backbone: no gradients, eval mode (it never trains)."""
        self.clip.requires_grad_(False)
        self.clip.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()
        return self

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a saved CNC model (a dir or Hub id): safetensors only, config checked against the weights.

        - Weights are read from `model.safetensors` (or its shards) only. cnc-hf never writes pickle
          files, and unpickling one can run code, so a dir holding only `pytorch_model.bin` is refused
          (ValueError naming the file); `use_safetensors=False` / `weights_only=False` are refused too.
        - A tensor whose shape in the file differs from what config.json builds, a CNC tensor the
          config has no place for, or one the config needs but the file lacks, raises a ValueError
          naming the tensor (transformers would re-initialise it at random and only log it), unless
          `ignore_mismatched_sizes=True` is passed. A plain CLIP checkpoint with a CNC `config=`
          still loads: the CNC parts are then new and initialised.
        - CLIP is frozen again after loading (transformers 5 re-enables gradients on load).
        """
        if kwargs.get("use_safetensors") is False or kwargs.get("weights_only") is False:
            raise ValueError(
                "CNCModel.from_pretrained reads safetensors weights only: use_safetensors=False / weights_only=False "
                "(pickle loading, which can run code) is not supported"
            )
        kwargs["use_safetensors"] = True
        return_info = kwargs.pop("output_loading_info", False)
        check_sizes = not kwargs.pop("ignore_mismatched_sizes", False)
        try:
            # ignore_mismatched_sizes=True makes transformers report the tensors instead of raising an error
            # without their names; the check below raises with them.
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
        except Exception as err:
            clear = _weights_error(pretrained_model_name_or_path, err)
            if clear is err:
                raise
            raise clear from err
        if check_sizes:
            _check_weights_match_config(model, info, pretrained_model_name_or_path)
        model.freeze_clip()
        return (model, info) if return_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus what a model repo needs for `pipeline(...,
        trust_remote_code=True)` in a process without cnc-hf: the pipeline's code with its
        `custom_pipelines` entry in config.json, and the image processor (at `config.image_size`,
        unless the folder already holds one). `push_to_hub` saves through here, so a pushed repo
        is complete too: the same file set as `cnc_hf.save_model_dir` and `cnc-hf push`.
        """
        from transformers.dynamic_module_utils import custom_object_save

        from .image_processing_cnc import CNCImageProcessor
        from .pipeline_cnc import AnomalyMapPipeline, custom_pipelines_entry

        # __dict__, not the attribute: the config class hides pipelines its package serves (CNCConfig.custom_pipelines).
        saved = self.config.__dict__.get("custom_pipelines") or {}
        self.config.custom_pipelines = {**saved, **custom_pipelines_entry()}
        # transformers uploads inside its save, before the files below exist: push after them instead.
        push = kwargs.pop("push_to_hub", False)
        hub = {key: kwargs.pop(key) for key in ("repo_id", "commit_message", "create_pr", "private") if key in kwargs}
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.should_save_on_this_rank(kwargs.get("is_main_process", True)):
            custom_object_save(AnomalyMapPipeline, save_directory)  # pipeline_cnc.py and what it imports
            if not os.path.isfile(os.path.join(save_directory, "preprocessor_config.json")):
                CNCImageProcessor(size=self.config.image_size).save_pretrained(save_directory)
            if push:
                repo_id = hub.pop("repo_id", os.path.basename(os.path.normpath(os.fspath(save_directory))))
                self.push_to_hub(repo_id, token=kwargs.get("token"), **hub)

    @classmethod
    def from_clip_pretrained(cls, pretrained_model_name_or_path, **overrides) -> "CNCModel":
        """A new CNC model around a standard CLIP checkpoint (Hub id or local dir).

        CLIP's weights load unchanged and frozen; the CNC parts (prompts, Phi, MoE, decoder) are
        initialised. `overrides` are CNCConfig fields, plus the Hub arguments `cache_dir`,
        `revision`, `token`, `local_files_only`, and `dtype` (default float32).

        Weights: `model.safetensors` when the checkpoint has it (transformers' first choice); many
        CLIP checkpoints also (or only) ship `pytorch_model.bin`, which is read with
        `torch.load(weights_only=True)` only: plain tensors load, a file holding any other object
        is refused with a ValueError naming it, and nothing in it is executed.
        """
        dtype = overrides.pop("dtype", torch.float32)
        hub_kwargs = pop_hub_kwargs(overrides, keep=True)  # the config reads them too (and takes them out)
        config = CNCConfig.from_clip_pretrained(pretrained_model_name_or_path, **overrides)
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # the CNC parts are "newly initialised" by design
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, config=config, dtype=dtype, output_loading_info=True,
                weights_only=True, **hub_kwargs
            )
        except Exception as err:
            clear = _weights_error(pretrained_model_name_or_path, err)
            if clear is err:
                raise
            raise clear from err
        finally:
            logging.set_verbosity(verbosity)
        missing_clip = [k for k in info["missing_keys"] if k.startswith("clip.")]
        if missing_clip:
            raise ValueError(
                f"{pretrained_model_name_or_path} is missing CLIP weights: {missing_clip[:5]}"
                f"{' ...' if len(missing_clip) > 5 else ''} ({len(missing_clip)} in all)."
            )
        model.freeze_clip()
        return model

    # ------------------------------------------------------------------ the frozen encoders
    @property
    def patch_size(self) -> int:
        return self.config.clip_config.vision_config.patch_size

    @torch.no_grad()
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tapped encoder features f_1..f_n with their CLS token: (B, n, 1 + h*w, C).

        The vision tower runs only up to the deepest tapped layer. CLIP is frozen and its inputs
        fixed, so these can be cached across epochs (`forward(tapped_features=...)`).
        """
        vision = self.clip.vision_model
        height, width = pixel_values.shape[-2:]
        native = self.config.clip_config.vision_config.image_size
        dtype = vision.embeddings.patch_embedding.weight.dtype
        hidden = vision.embeddings(pixel_values.to(dtype), interpolate_pos_encoding=(height, width) != (native, native))
        hidden = vision.pre_layrnorm(hidden)
        wanted = set(self.config.feature_layers)
        taps = {}
        for index, layer in enumerate(vision.encoder.layers[: max(wanted)], start=1):
            hidden = layer(hidden_states=hidden, attention_mask=None)  # CLIPEncoderLayer's argument names
            if index in wanted:
                taps[index] = hidden
        return torch.stack([taps[i] for i in self.config.feature_layers], dim=1)

    def to_joint_space(self, tokens: torch.Tensor) -> torch.Tensor:
        """Visual tokens (..., C) -> CLIP's joint space (..., P), L2-normalised, float32, through CLIP's own
        post-layernorm and visual projection (how CLIP maps its CLS token)."""
        return project_to_joint_space(tokens, self.clip.visual_projection, self.clip.vision_model.post_layernorm)

    def text_features(self) -> torch.Tensor:
        """[g_n^i, g_a^i] for every tapped layer: (n, 2, P).

        Outside training the prompts are constants, so the text tower runs once and the result
        is reused until the prompt parameters change (tracked by their version counter).
        """
        context = self.prompt_learner.context
        key = (context._version, context.data_ptr(), context.device, context.dtype)
        if self.training:
            self._text_cache = None
            return self._prompt_features()
        if self._text_cache is None or self._text_cache[0] != key:
            # Plain (non-inference) tensors, so the cache also serves grad-enabled calls later.
            with torch.inference_mode(False), torch.no_grad():
                features = self._prompt_features()
            self._text_cache = (key, features)
        return self._text_cache[1]

    def _prompt_features(self) -> torch.Tensor:
        # Outside autocast: 2n short prompts cost little next to a batch of images, and at tau = 0.001 a g_n
        # rounded to bf16 would move every logit of Eq. (4)/(10) by ~1 (measured: L_c1 250.3 -> 249.1).
        with torch.autocast(device_type=self.prompt_learner.context.device.type, enabled=False):
            return self.prompt_learner(self.clip.text_model, self.clip.text_projection)

    # ------------------------------------------------------------------ categories
    def set_category_prototypes(self, names: list[str], prototypes: torch.Tensor, distance_limits: dict) -> None:
        """Store what recognises the training categories (modeling/category.py): `prototypes` (K, n*C)
        become the `category_prototypes` weight, `names` and `distance_limits` go into the config."""
        expected = (len(names), len(self.config.feature_layers) * self.config.vision_hidden_size)
        if tuple(prototypes.shape) != expected:
            raise ValueError(f"category prototypes: shape {tuple(prototypes.shape)}; expected {expected}")
        self.register_buffer("category_prototypes", prototypes.detach().to(self.device, torch.float32).clone(),
                             persistent=True)
        self.config.categories = list(names)
        self.config.category_distance_limits = dict(distance_limits)

    def category_similarity(self, tapped_features: torch.Tensor) -> torch.Tensor | None:
        """(B, K) similarity of each image to each category prototype, from the features the map uses."""
        prototypes = getattr(self, "category_prototypes", None)
        if prototypes is None or prototypes.numel() == 0:
            return None
        return prototype_similarities(category_embedding(tapped_features), prototypes)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        tapped_features: torch.Tensor | None = None,
        epoch: int = 0,
        return_dict: bool | None = None,
        grid_size: tuple[int, int] | None = None,
        output_size: tuple[int, int] | None = None,
    ) -> CNCOutput | tuple:
        r"""
        Args:
            pixel_values: (B, 3, H, W) images normalised with CLIP's mean/std; H and W multiples of the patch size.
            tapped_features: precomputed `encode_image(pixel_values)` (B, n, 1 + h*w, C); skips the vision
                tower (feature caching). Give `grid_size` and `output_size` with them for non-square inputs.
            epoch: the current epoch (from 0), which switches L_c2 on at `config.theta` (Eq. 11).
            grid_size: (h, w) patches of `tapped_features`; defaults to a square grid. Only with
                `tapped_features` (with `pixel_values` the image gives it; passing it then is a TypeError).
            output_size: (H, W) of the anomaly map computed from `tapped_features`; defaults to
                (h * patch, w * patch). Only with `tapped_features`, as `grid_size`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if tapped_features is None:
            if grid_size is not None or output_size is not None:
                raise TypeError("CNCModel.forward: grid_size / output_size go with tapped_features, not pixel_values.")
            grid_size, output_size = self._check_pixel_values(pixel_values)
            tapped_features = self.encode_image(pixel_values)
        else:
            side = int(round((tapped_features.shape[2] - 1) ** 0.5))
            grid_size = tuple(grid_size) if grid_size is not None else (side, side)
            output_size = output_size or (grid_size[0] * self.patch_size, grid_size[1] * self.patch_size)

        encoded = tapped_features.to(self.decoder.blocks[0].qkv.weight.dtype).unbind(dim=1)  # f_1..f_n
        decoded, gates = self.decode(encoded)
        f_star, f_hat_star, loss_c1, loss_c2 = self.promote_normality(encoded, decoded)
        if self.training:
            output = self._losses(f_star, f_hat_star, gates, loss_c1, loss_c2, epoch)
        else:
            maps = anomaly_map(f_star, f_hat_star, grid_size, output_size)
            maps = gaussian_blur(maps, self.config.map_smoothing_sigma)
            output = CNCOutput(anomaly_map=maps, image_score=image_score(maps, self.config.image_score_reduction),
                               category_similarity=self.category_similarity(tapped_features))
        return output if return_dict else output.to_tuple()

    def _check_pixel_values(self, pixel_values: torch.Tensor | None) -> tuple[tuple[int, int], tuple[int, int]]:
        """((h, w) patches, (H, W) pixels) of valid `pixel_values`; a ValueError saying what is wrong otherwise."""
        if pixel_values is None:
            raise ValueError("CNCModel needs `pixel_values` (B, 3, H, W) or `tapped_features`.")
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got shape {tuple(pixel_values.shape)}.")
        p = self.patch_size
        if pixel_values.shape[-1] % p or pixel_values.shape[-2] % p:
            raise ValueError(
                f"pixel_values of size {tuple(pixel_values.shape[-2:])} are not a multiple of the patch size {p}."
            )
        return (pixel_values.shape[-2] // p, pixel_values.shape[-1] // p), tuple(pixel_values.shape[-2:])

    def decode(self, encoded: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        r"""f_1..f_n -> (\hat f_1..\hat f_n, the MoE gates or None): [training: + noise] -> Phi (Eq. 12) ->
        gated MoE (Eq. 13-14) -> decoder."""
        decoder_input = encoded
        if self.training and self.config.noise_std > 0:
            decoder_input = [f + self.config.noise_std * f.std(dim=-1, keepdim=True) * torch.randn_like(f) for f in encoded]
        fused = self.fusion(list(decoder_input)) if self.fusion is not None else decoder_input[-1]
        gates = None
        if self.moe is not None:
            fused, gates = self.moe(fused)
        return self.decoder(fused), gates

    def promote_normality(self, encoded, decoded):
        r"""The patch tokens f_i*, \hat f_i* after normality promotion (Eq. 5-8), and in training L_c1 (Eq. 4) and
        L_c2 (Eq. 10); without CNC the patch tokens as they are and no losses."""
        f_star = [f[:, 1:] for f in encoded]
        f_hat_star = [f[:, 1:] for f in decoded]
        if self.prompt_learner is None:
            return f_star, f_hat_star, None, None
        g = self.text_features()  # (n, 2, P)
        # "alignment" (the paper): the prompts are "trained by (4)" and serve the rest "as anchors".
        anchors = g.detach() if self.config.prompt_training == "alignment" else g
        scale = self.config.promotion_scale
        with torch.no_grad():
            enc_joint = torch.stack([self.to_joint_space(f) for f in encoded], dim=1)  # (B, n, 1+L, P)
        dec_joint = torch.stack([self.to_joint_space(f) for f in decoded], dim=1)
        f_star = [normality_promotion(f_star[i], enc_joint[:, i, 1:], anchors[i, 0], anchors[i, 1], scale)
                  for i in range(len(encoded))]
        f_hat_star = [normality_promotion(f_hat_star[i], dec_joint[:, i, 1:], anchors[i, 0], anchors[i, 1], scale)
                      for i in range(len(decoded))]
        loss_c1 = loss_c2 = None
        if self.training:
            loss_c1 = normality_alignment_loss(enc_joint[:, :, 0], g, self.config.tau)  # Eq. (4)
            loss_c2 = normality_alignment_loss(dec_joint[:, :, 0], anchors, self.config.tau)  # Eq. (10)
        return f_star, f_hat_star, loss_c1, loss_c2

    def _losses(self, f_star, f_hat_star, gates, loss_c1, loss_c2, epoch: int) -> CNCOutput:
        """L_total of Eq. (16) and its parts."""
        zero = f_star[0].new_zeros((), dtype=torch.float32)
        loss_distill = distillation_loss(f_star, f_hat_star)
        loss_constraint = (
            constraint_loss(loss_c1, loss_c2, epoch, self.config.theta, self.config.gamma) if loss_c1 is not None else zero
        )
        loss_moe = importance_loss(gates, self.config.moe_eps, self.config.moe_importance_loss) if gates is not None else zero
        return CNCOutput(
            loss=loss_distill + loss_constraint + loss_moe,  # Eq. (16)
            loss_distill=loss_distill, loss_constraint=loss_constraint, loss_moe=loss_moe,
            loss_c1=loss_c1, loss_c2=loss_c2,
        )


# ---------------------------------------------------------------------- loading checks (used by the loaders above)
def _weights_error(source, err: Exception) -> Exception:
    """A clear ValueError for weights that were not loaded (a refused pickle, a corrupt safetensors file, a dir
    with pickle files only); `err` itself for any other error."""
    import pickle

    if isinstance(err, pickle.UnpicklingError):
        # torch's message is long; keep its line that says what was found (e.g. "unsupported GLOBAL posix.system").
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "unsupported" in line.lower() or "weightsunpickler" in line.lower()),
                      lines[0] if lines else type(err).__name__).split(" Please use")[0]  # not its allow-listing advice
        return ValueError(
            f"{source}: refused the pickle weights file (pytorch_model.bin): torch.load(weights_only=True), which "
            f"loads plain tensors only and runs nothing, rejected it ({reason}). Use a checkpoint with model.safetensors."
        )
    if type(err).__name__ == "SafetensorError":
        return ValueError(f"{source}: the safetensors weights file is corrupt or truncated ({err}); copy it again")
    if isinstance(err, OSError) and isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        files = os.listdir(source)
        pickles = sorted(f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")))
        if pickles and not any(f.endswith((".safetensors", ".safetensors.index.json")) for f in files):
            return ValueError(
                f"{source}: no model.safetensors, only pickle file(s) {pickles}. CNC models load from safetensors "
                "only (unpickling can run code, and cnc-hf never writes pickles); convert the file where you trust it."
            )
    return err


def _check_weights_match_config(model, info: dict, source) -> None:
    """Raise a ValueError naming every tensor where config.json and the weights file disagree."""
    problems = [f"{key}: shape {list(saved)} in the weights, {list(built)} from config.json"
                for key, saved, built in sorted(info.get("mismatched_keys", []))]  # sorted: the same message each run
    problems += [f"{key}: in the weights but config.json builds no such tensor"
                 for key in sorted(info.get("unexpected_keys", [])) if not key.startswith("clip.")]
    missing = set(info.get("missing_keys", []))
    cnc_keys = [k for k in model.state_dict() if not k.startswith("clip.")]
    is_cnc_checkpoint = any(k not in missing for k in cnc_keys)  # else a plain CLIP checkpoint: CNC parts are new
    problems += [f"{key}: config.json needs it but the weights lack it" for key in sorted(missing)
                 if key.startswith("clip.") or is_cnc_checkpoint]
    if problems:
        listed = "; ".join(problems[:8]) + (f"; ... ({len(problems)} in all)" if len(problems) > 8 else "")
        raise ValueError(
            f"{source}: config.json does not match the weights: {listed}. Was config.json edited (num_experts, "
            "prompt_length, use_moe, ...) or copied from another model?"
        )


CNCModel.register_for_auto_class("AutoModel")
