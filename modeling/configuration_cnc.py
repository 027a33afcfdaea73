"""Configuration of CNC (Cross-modal Normality Constraint, AAAI 2025).

Every hyperparameter of the paper is a field whose default is the paper's value. Fields for choices
the paper leaves open carry the default we picked and say why (the README's "Design choices" table
lists them again).

The fields are declared once, as class annotations, the way transformers 5 declares its configs
(`PreTrainedConfig` makes every subclass a dataclass): adding a field is one line here, one line in
the docstring and, when it has a rule, one check in `validate_cnc`. Unlike transformers' own configs
the class is not wrapped in `huggingface_hub.dataclasses.strict`: strict re-raises a validator's
error as `StrictDataclassClassValidationError`, which is not a ValueError, while CNC promises a
ValueError naming the field (tests and the trainer's flag errors rely on it); and strict's per-field
type checks on assignment would refuse values that work today (e.g. a numpy float as `threshold`).
"""

from __future__ import annotations

import math
import numbers

from transformers import CLIPConfig, PreTrainedConfig

# Token ids of the class words of Eq. (2)/(3) in the real CLIP BPE vocabulary (49408 tokens),
# so the prompts can be built without a tokenizer at run time.
CLIP_BOS_TOKEN_ID = 49406
CLIP_EOS_TOKEN_ID = 49407
OBJECT_TOKEN_IDS = [14115]  # "object"
DAMAGED_OBJECT_TOKEN_IDS = [13568, 14115]  # "damaged object"

MOE_GATINGS = ("topk_softmax", "softmax_topk")
PROMOTION_SCALES = ("map", "patch")
PROMPT_TRAININGS = ("alignment", "all")
IMPORTANCE_LOSS_FORMS = ("cv2", "literal")
# What a config.json saved before these fields existed was trained with: it loads with that behaviour.
LEGACY_DEFAULTS = {"promotion_scale": "patch", "prompt_training": "all"}
IMAGE_SCORE_REDUCTIONS = ("max", "mean_top1pct")
# The Hub arguments of `from_pretrained` that reading a CLIP checkpoint passes on (config, tokenizer, weights).
HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only")


def pop_hub_kwargs(kwargs: dict, keep: bool = False) -> dict:
    """The Hub arguments (HUB_KWARGS) among `kwargs`, removed from it unless `keep`."""
    return {key: (kwargs[key] if keep else kwargs.pop(key)) for key in HUB_KWARGS if key in kwargs}


def default_feature_layers(num_hidden_layers: int) -> list[int]:
    """Three tapped layers at 1/4, 2/4 and 3/4 of the vision depth (1-indexed).

    For CLIP ViT-L/14 (24 layers) this gives [6, 12, 18]; for ViT-B (12 layers) [3, 6, 9].
    Mid-depth layers keep spatial detail that the last layers of CLIP trade for global
    semantics, and the tower can stop at 3/4 of its depth.
    """
    return [max(1, math.ceil(num_hidden_layers * k / 4)) for k in (1, 2, 3)]


class CNCConfig(PreTrainedConfig):
    r"""Configuration for [`CNCModel`].

    Args:
        clip_config (`dict` or `CLIPConfig`, *optional*):
            The frozen CLIP backbone (encoder F and text encoder G). Defaults to `CLIPConfig()`.
        feature_layers (`list[int]`, *optional*):
            The tapped ViT layers i_1, i_2, i_3 (1-indexed; layer N is the last). Defaults to
            `default_feature_layers(depth)`: [6, 12, 18] for ViT-L/14.
        prompt_length (`int`, defaults to 12): M, the learnable tokens of each prompt (Eq. 2-3).
        normal_token_ids / abnormal_token_ids (`list[int]`): BPE ids of "object" and
            "damaged object", the fixed words that end p_n and p_a (Eq. 2-3).
        bos_token_id / eos_token_id (`int`): start and end tokens of the CLIP text encoder.
        promotion_scale (`str`, defaults to `"map"`): the L2 norm of lambda = 1/||f_i|| in Eq. (5)/(8).
            `"map"`, the paper's ("f_i, f_i* in R^{HxWxC}"): over each image's whole H x W x C map;
            `"patch"`: over each patch's own C-vector (a ~sqrt(HW) times larger shift).
        prompt_training (`str`, defaults to `"alignment"`): which losses train the prompts.
            `"alignment"`, the paper's ("textual features trained by (4) as anchors to guide feature
            decoding"): only L_c1 (Eq. 4); the promotion (Eq. 5-8) and L_c2 (Eq. 10) use the text
            features as fixed anchors (detached). `"all"`: every loss that uses them also moves them.
        tau (`float`, defaults to 0.001): the temperature tau of Eq. (4) and (10).
        gamma (`float`, defaults to 0.1): weight of L_c2 in Eq. (11).
        theta (`int`, defaults to 5): the epoch from which L_c2 joins (Eq. 11).
        num_experts (`int`, defaults to 5): T, the experts of the gated MoE (Eq. 13).
        moe_top_k (`int`, defaults to 2): K, experts per patch (Eq. 14).
        moe_gating (`str`, defaults to `"topk_softmax"`): how the router scores become H_k.
            `"topk_softmax"`: softmax over the K largest logits (weights sum to 1, the usual
            sparse gating); `"softmax_topk"`: softmax over all T logits, keep the top K values.
        moe_eps (`float`, defaults to 1e-10): epsilon of the importance loss (Eq. 15).
        moe_importance_loss (`str`, defaults to `"cv2"`): Eq. (15) as the squared coefficient of
            variation of the experts' importance (Bengio et al. 2015, which the paper cites), or
            `"literal"`: the printed formula, R^2 (routed patches squared) times larger.
        expert_mlp_ratio (`float`, defaults to 1.0): hidden width of each expert MLP E_t as a
            multiple of the vision width C (Linear-GELU-Linear).
        noise_std (`float`, defaults to 0.1): std of the Gaussian noise added to the encoded
            features during training, relative to each token's feature std.
        fusion_dropout (`float`, defaults to 0.1): dropout of the MLF projection Phi (Eq. 12).
        decoder_num_heads (`int`, *optional*): heads of the decoder blocks; defaults to CLIP's.
        decoder_mlp_ratio (`float`, defaults to 4.0): MLP width of the decoder blocks.
        map_smoothing_sigma (`float`, defaults to 4.0): Gaussian blur (pixels, at the input
            resolution) of the anomaly map of Eq. (17), before the image score is taken. An
            addition of ours (usual in reverse-distillation code; the paper has none): 0 gives the
            paper's map, as `--protocol paper` does.
        image_score_reduction (`str`, defaults to `"max"`): the image score from the map; the
            paper uses the maximum; `"mean_top1pct"` averages the top 1% of pixels.
        image_size (`int`, defaults to 224): input resolution (the paper resizes to 224x224).
        threshold (`float`, *optional*): decision threshold on the image score, calibrated on
            held-out normal training images by the trainer; used by the pipeline when no category
            is named (and for a category without a threshold of its own).
        category_thresholds (`dict[str, float]`, *optional*): one calibrated threshold per training
            category (scores of normal images differ by category, so one pooled value decides badly
            for some); used by the pipeline for the category named by the caller or recognised.
        categories (`list[str]`, *optional*): the training categories, in the order of the rows of the
            `category_prototypes` weight (modeling/category.py); the model then recognises an image's
            category from its frozen CLIP features when the caller does not name it.
        category_distance_limits (`dict[str, float]`, *optional*): per category, the largest cosine
            distance to its prototype at which an image still counts as that category; farther from
            every prototype, an image is "unrecognised" (category None) instead of forced into one.
        use_mlf / use_cnc / use_moe (`bool`, default True): the components of Table 2.
            Without MLF the decoder is fed the deepest tapped feature alone; without CNC there
            is no prompt learning, no normality promotion (f* = f) and no L_constraint; without
            MoE the fused feature goes straight to the decoder.
    """

    model_type = "cnc"
    # `sub_configs` (not transformers 5.2x's `sub_configs_defaults`): this file is also the remote code of
    # saved models, read by whatever transformers 5 the loading process has; __post_init__ builds CLIPConfig.
    sub_configs = {"clip_config": CLIPConfig}

    clip_config: dict | CLIPConfig | None = None
    feature_layers: list[int] | None = None
    prompt_length: int = 12
    normal_token_ids: list[int] | None = None
    abnormal_token_ids: list[int] | None = None
    bos_token_id: int = CLIP_BOS_TOKEN_ID
    eos_token_id: int = CLIP_EOS_TOKEN_ID
    promotion_scale: str = "map"
    prompt_training: str = "alignment"
    tau: float = 0.001
    gamma: float = 0.1
    theta: int = 5
    num_experts: int = 5
    moe_top_k: int = 2
    moe_gating: str = "topk_softmax"
    moe_eps: float = 1e-10
    moe_importance_loss: str = "cv2"
    expert_mlp_ratio: float = 1.0
    noise_std: float = 0.1
    fusion_dropout: float = 0.1
    decoder_num_heads: int | None = None
    decoder_mlp_ratio: float = 4.0
    map_smoothing_sigma: float = 4.0
    image_score_reduction: str = "max"
    image_size: int = 224
    threshold: float | None = None
    category_thresholds: dict[str, float] | None = None
    categories: list[str] | None = None
    category_distance_limits: dict[str, float] | None = None
    use_mlf: bool = True
    use_cnc: bool = True
    use_moe: bool = True
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        """Fill the defaults that depend on other fields, then check every field (ValueError naming it)."""
        if self.clip_config is None:
            self.clip_config = CLIPConfig()
        elif isinstance(self.clip_config, dict):
            self.clip_config = CLIPConfig(**self.clip_config)
        depth = self.clip_config.vision_config.num_hidden_layers
        self.feature_layers = (list(self.feature_layers) if self.feature_layers is not None
                               else default_feature_layers(depth))
        self.normal_token_ids = list(OBJECT_TOKEN_IDS if self.normal_token_ids is None else self.normal_token_ids)
        self.abnormal_token_ids = list(DAMAGED_OBJECT_TOKEN_IDS if self.abnormal_token_ids is None
                                       else self.abnormal_token_ids)
        self.category_thresholds = dict(self.category_thresholds) if self.category_thresholds else None
        self.categories = [str(name) for name in self.categories] if self.categories else None
        self.category_distance_limits = dict(self.category_distance_limits) if self.category_distance_limits else None
        super().__post_init__(**kwargs)
        self.validate_cnc()

    # ------------------------------------------------------------------ validation
    def validate_cnc(self) -> None:
        """Raise a ValueError naming the field for any configuration the model cannot run."""
        self._check_backbone_fields()
        self._check_training_fields()
        self._check_head_fields()

    def _check_backbone_fields(self) -> None:
        """The taps, the prompts' tokens and the input size against the CLIP towers."""
        vision, text = self.clip_config.vision_config, self.clip_config.text_config
        depth = vision.num_hidden_layers
        if len(self.feature_layers) == 0:
            raise ValueError("feature_layers must name at least one tapped ViT layer, got [].")
        for layer in self.feature_layers:
            if not isinstance(layer, int) or not 1 <= layer <= depth:
                raise ValueError(
                    f"feature_layers={self.feature_layers}: each tapped layer must be an int in [1, {depth}] "
                    f"(the vision tower has {depth} layers, 1-indexed)."
                )
        if any(a >= b for a, b in zip(self.feature_layers, self.feature_layers[1:])):
            raise ValueError(f"feature_layers={self.feature_layers} must be in strictly increasing depth order "
                             "(each tapped layer once).")
        if self.prompt_length < 1:
            raise ValueError(f"prompt_length must be >= 1, got {self.prompt_length}.")
        for name in ("normal_token_ids", "abnormal_token_ids"):
            ids = getattr(self, name)
            if not ids or any((not isinstance(i, int)) or not 0 <= i < text.vocab_size for i in ids):
                raise ValueError(f"{name}={ids}: expected a non-empty list of token ids in [0, {text.vocab_size}).")
        prompt_tokens = 2 + self.prompt_length + max(len(self.normal_token_ids), len(self.abnormal_token_ids))
        if prompt_tokens > text.max_position_embeddings:
            raise ValueError(
                f"prompt_length={self.prompt_length} makes prompts of {prompt_tokens} tokens, more than the text "
                f"encoder's max_position_embeddings={text.max_position_embeddings}."
            )
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is None or not 0 <= value < text.vocab_size:
                raise ValueError(f"{name}={value} is outside the text vocabulary [0, {text.vocab_size}).")
        patch = vision.patch_size
        if self.image_size < patch or self.image_size % patch:
            raise ValueError(f"image_size={self.image_size} must be a positive multiple of the patch size {patch}.")

    def _check_training_fields(self) -> None:
        """The paper's switches and loss weights (Eq. 4-11, 15)."""
        _check_choice("promotion_scale", self.promotion_scale, PROMOTION_SCALES)
        _check_choice("prompt_training", self.prompt_training, PROMPT_TRAININGS)
        if not self.tau > 0:
            raise ValueError(f"tau (temperature) must be > 0, got {self.tau}.")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}.")
        if self.theta < 0:
            raise ValueError(f"theta must be >= 0, got {self.theta}.")
        if self.num_experts < 1:
            raise ValueError(f"num_experts (T) must be >= 1, got {self.num_experts}.")
        if not 1 <= self.moe_top_k <= self.num_experts:
            raise ValueError(f"moe_top_k (K) must be in [1, num_experts={self.num_experts}], got {self.moe_top_k}.")
        _check_choice("moe_gating", self.moe_gating, MOE_GATINGS)
        _check_choice("moe_importance_loss", self.moe_importance_loss, IMPORTANCE_LOSS_FORMS)
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}.")
        if not 0 <= self.fusion_dropout < 1:
            raise ValueError(f"fusion_dropout must be in [0, 1), got {self.fusion_dropout}.")

    def _check_head_fields(self) -> None:
        """The widths of the experts and the decoder, the map, the score and the decision thresholds."""
        vision = self.clip_config.vision_config
        if self.expert_mlp_ratio <= 0 or self.decoder_mlp_ratio <= 0:
            raise ValueError("expert_mlp_ratio and decoder_mlp_ratio must be > 0.")
        heads = self.decoder_num_heads or vision.num_attention_heads
        if heads < 1 or vision.hidden_size % heads:
            raise ValueError(f"decoder_num_heads={heads} must divide the vision width {vision.hidden_size}.")
        if self.map_smoothing_sigma < 0:
            raise ValueError(f"map_smoothing_sigma must be >= 0, got {self.map_smoothing_sigma}.")
        _check_choice("image_score_reduction", self.image_score_reduction, IMAGE_SCORE_REDUCTIONS)
        for name, value in (self.category_thresholds or {}).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"category_thresholds[{name!r}]={value!r}: expected a finite number.")
        if self.categories is not None and len(set(self.categories)) != len(self.categories):
            raise ValueError(f"categories={self.categories!r}: names must be unique.")
        for name, value in (self.category_distance_limits or {}).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 2:
                raise ValueError(f"category_distance_limits[{name!r}]={value!r}: expected a cosine distance in [0, 2].")

    # ------------------------------------------------------------------ the saved pipeline entry
    @property
    def custom_pipelines(self) -> dict:
        """The pipelines saved as remote code (config.json `custom_pipelines`), less those that the package
        this class was imported from already serves in this process.

        A saved CNC config lists the pipeline under `custom_pipelines`: that is how a process WITHOUT cnc-hf
        finds `pipeline_cnc.py` with `trust_remote_code=True`. transformers' `pipeline()` refuses any task
        listed there unless `trust_remote_code=True` or `pipeline_class=` is passed (transformers 5.24,
        pipelines/__init__.py, `if task in custom_tasks: ... if pipeline_class is None: if not
        trust_remote_code: raise ValueError`), even when the installed cnc-hf registered the same task with
        PIPELINE_REGISTRY. So `pipeline("image-anomaly-detection", model=dir)` after `import cnc_hf` works
        only if the installed config class does not report the entry: an entry is hidden when the task's
        registered pipeline class comes from the same package as this config class (cnc_hf.modeling). The
        copy of this file loaded as remote code lives in another package (transformers_modules...), so it
        keeps every entry and `trust_remote_code=True` still runs the saved pipeline. The stored value
        (`__dict__`, what `to_dict` and `save_pretrained` write) always keeps every entry.
        """
        saved = self.__dict__.get("custom_pipelines") or {}
        if not saved:
            return saved
        from transformers.pipelines import PIPELINE_REGISTRY

        package = type(self).__module__.rpartition(".")[0]
        served = {task for task, info in PIPELINE_REGISTRY.supported_tasks.items()
                  if task in saved and getattr(info.get("impl"), "__module__", "").rpartition(".")[0] == package}
        return {task: info for task, info in saved.items() if task not in served}

    @custom_pipelines.setter
    def custom_pipelines(self, value: dict | None) -> None:
        self.__dict__["custom_pipelines"] = value

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """Load a saved config; one saved before a behaviour switch existed keeps the behaviour it was
        trained with (LEGACY_DEFAULTS), not today's default."""
        config_dict = {**LEGACY_DEFAULTS, **config_dict}
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_json_file(cls, json_file):
        """A config.json file, read like `from_pretrained` reads it (with the legacy defaults of `from_dict`;
        transformers' own `from_json_file` would build the class directly and skip them)."""
        return cls.from_dict(cls._dict_from_json_file(json_file))

    @property
    def vision_hidden_size(self) -> int:
        return self.clip_config.vision_config.hidden_size

    @classmethod
    def from_clip_pretrained(cls, pretrained_model_name_or_path, **overrides) -> "CNCConfig":
        """A CNC config around a standard CLIP checkpoint (Hub id or local dir).

        Reads the CLIP config; when the checkpoint ships a tokenizer, the class words
        "object" / "damaged object" and the start/end ids are taken from it, so checkpoints
        with another vocabulary still get the right prompt tokens. `overrides` set any field.
        """
        hub_kwargs = pop_hub_kwargs(overrides)
        clip_config = CLIPConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        if clip_config.model_type != "clip":
            raise ValueError(
                f"{pretrained_model_name_or_path} is a {clip_config.model_type!r} checkpoint; expected a CLIP one."
            )
        token_fields = {}
        tokenizer = _try_load_tokenizer(pretrained_model_name_or_path, **hub_kwargs)
        # transformers 5 builds an empty 2-token tokenizer for a dir without tokenizer files:
        # only a tokenizer that covers the text tower's vocabulary is the checkpoint's own.
        if tokenizer is not None and len(tokenizer) == clip_config.text_config.vocab_size:
            def words(text):
                return tokenizer(text, add_special_tokens=False)["input_ids"]

            token_fields = {
                "normal_token_ids": words("object"),
                "abnormal_token_ids": words("damaged object"),
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
            }
        else:
            text = clip_config.text_config
            # Legacy CLIP configs store bos/eos = 0/2, which are not CLIP's tokens: keep ours then.
            if text.eos_token_id not in (None, 2) and text.bos_token_id is not None:
                token_fields = {"bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id}
        return cls(clip_config=clip_config, **{**token_fields, **overrides})


def check_threshold(value, name: str = "threshold") -> float | None:
    """A decision threshold as a float (None stays None); a ValueError naming `name` for anything else."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}: got {value!r}; expected a finite number (or None to use the model's)")
    return float(value)


def threshold_for(threshold: float | None, category_thresholds: dict | None, category: str | None,
                  override: float | None = None, strict: bool = True):
    """(threshold, where it came from) that decides for an image of `category`: `override` when given
    ("call"); else the category's own calibrated threshold when the model has one ("category"); else the
    pooled `threshold` ("pooled"). A category name the model has no threshold for (a typo, another
    product) is a ValueError naming the known ones, never a silent fallback; with `strict=False` (a
    category the model itself recognised, that calibration held no image of) the pooled one decides.
    Shared by the pipeline and the ONNX Runtime path."""
    if override is not None:
        return check_threshold(override), "call"
    if category is None or not category_thresholds or (not strict and category not in category_thresholds):
        return check_threshold(threshold, "config.threshold"), "pooled"
    if category not in category_thresholds:
        raise ValueError(f"category {category!r}: the model has calibrated thresholds for "
                         f"{sorted(category_thresholds)}; pass one of them (or no category for the pooled threshold)")
    return check_threshold(category_thresholds[category], f"config.category_thresholds[{category!r}]"), "category"


def _try_load_tokenizer(path_or_id, **hub_kwargs):
    """The checkpoint's tokenizer, or None when it has none (a bare weights+config dir)."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path_or_id, **hub_kwargs)
    except (OSError, ValueError, TypeError):
        return None


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {choices}.")


CNCConfig.register_for_auto_class()
