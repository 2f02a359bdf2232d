"""Configuration of the tiny MiniCPM-V / MiniCPM-o models (remote code, copied into each checkpoint).

The LLM's own fields (hidden_size, num_hidden_layers, ...) sit flat on the config, as they do on
the real checkpoints whose config class derives from the LLM's; `llm_model_type` names the LLM
class the model builds from them.
"""

from transformers import PretrainedConfig, SiglipVisionConfig

LLM_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "initializer_range",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


# The published config.json of 2.5 and later carries no scale_resolution: the slice config class
# supplies it (448 in the published class; tiny here, so that images stay cheap).
TINY_SCALE_RESOLUTION = 112


class MiniCPMVSliceConfig(PretrainedConfig):
    model_type = "minicpmv"

    def __init__(self, patch_size=14, max_slice_nums=9, scale_resolution=TINY_SCALE_RESOLUTION, **kwargs):
        self.patch_size = patch_size
        self.max_slice_nums = max_slice_nums
        self.scale_resolution = scale_resolution
        super().__init__(**kwargs)


class MiniCPMVConfig(PretrainedConfig):
    model_type = "minicpmv"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        llm_model_type="qwen2",
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        query_num=16,
        patch_size=14,
        image_size=224,
        vision_config=None,
        drop_vision_last_layer=False,
        vision_batch_size=16,
        use_cache=True,
        **kwargs,
    ):
        self.llm_model_type = llm_model_type
        # The published config classes derived from Qwen2Config (2.6, o-2.6, 4.5) turn image ids on
        # by default and their config.json does not say; those of 2.0 and 2.5 have no such field.
        if llm_model_type == "qwen2":
            self.use_image_id = kwargs.pop("use_image_id", True)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.tie_word_embeddings = tie_word_embeddings
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.query_num = query_num
        self.patch_size = patch_size
        self.image_size = image_size
        self.drop_vision_last_layer = drop_vision_last_layer
        self.vision_batch_size = vision_batch_size
        self.use_cache = use_cache

        if vision_config is None:
            vision_config = {}
        if isinstance(vision_config, dict):
            vision_config = SiglipVisionConfig(**vision_config)
        self.vision_config = vision_config

        # 2.5 and later carry their slicing settings in an object; 2.0 has them flat (through kwargs).
        slice_config = kwargs.pop("slice_config", None)
        if isinstance(slice_config, dict):
            slice_config = MiniCPMVSliceConfig(**slice_config)
        if slice_config is not None:
            self.slice_config = slice_config
        super().__init__(**kwargs)

    def llm_config_kwargs(self):
        """The keyword arguments of the LLM's own config class."""
        return {name: getattr(self, name) for name in LLM_FIELDS}

