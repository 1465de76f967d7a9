"""A routing corpus: real architectures of the four frameworks, built from their own libraries
with tiny configurations and random weights (nothing is downloaded), each with the route
Keller Jordan's recipe gives every parameter tensor.

The recipe (github.com/KellerJordan/Muon, "Muon is an optimizer for the hidden weights of a
neural network. Other parameters, such as embeddings, classifier heads, and hidden gains/biases
should be optimized using standard AdamW"): Muon for hidden weight matrices (convolution
filters included, viewed as matrices); AdamW for input embeddings and stems, output layers,
norms, biases, gains, learned tokens and scalars.

The expected route of a tensor is decided here, independently of treeopt: from the model's own
module types (an ``nn.Embedding`` is an embedding, a norm class is a norm), the tensor's name
(``bias``) and shape (at most one axis longer than 1: a gain, token or scalar), and, for what
only a reading of the architecture tells (which layers read the input and which write the
output, which tensors are tables), the lists each case gives by hand. Layers where the field
has no settled answer follow the documented rules of ``JUDGEMENT`` and are listed per case.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable
from typing import Any

MUON, ADAMW = "muon", "adamw"

#: the rules for layers the recipe does not settle (docs/routing.md, "Judgement calls")
JUDGEMENT = {
    "pooler": (MUON, "a pooler or pre-classifier is a square hidden matrix between the trunk and the head"),
    "router": (MUON, "an MoE router is a hidden (experts x hidden) matrix"),
    "pointwise": (MUON, "a 1x1 convolution is a linear map of the channels"),
    "depthwise": (ADAMW, "a depthwise convolution is one filter per channel, not a linear map of the channels"),
    "position table": (ADAMW, "a relative-position table is looked up, not multiplied"),
}


@dataclasses.dataclass
class Case:
    """One architecture: how to build it, and what the recipe says its special layers are."""

    name: str
    framework: str  # "torch", "mlx", "nnx", "linen", "equinox"
    build: Callable[[], Any]
    #: layers (module paths, shell patterns) that write the model's output
    outputs: tuple[str, ...] = ()
    #: layers that read the model's input (beyond embeddings, found by type)
    inputs: tuple[str, ...] = ()
    #: other tensors the recipe gives AdamW (tables, state-space parameters), by path pattern
    adamw: tuple[str, ...] = ()
    #: {path pattern: one of JUDGEMENT's keys}
    judgement: dict[str, str] = dataclasses.field(default_factory=dict)
    fast: bool = False
    source: str = ""


def matches(path: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def vector_like(shape) -> bool:
    """At most one axis longer than 1: a gain, a bias, a learned token or a scalar."""
    return sum(d > 1 for d in shape) <= 1


@dataclasses.dataclass(frozen=True)
class Expected:
    route: str
    why: str
    judgement: str | None = None


def decide(case: Case, path: str, module_path: str, shape, *, embedding=False, norm=False) -> Expected:
    """The recipe's route for one tensor, from what the caller read off the model."""
    for pattern, rule in case.judgement.items():
        if fnmatch.fnmatchcase(path, pattern):
            return Expected(JUDGEMENT[rule][0], rule, rule)
    leaf = path.rsplit(".", 1)[-1].lower()
    if embedding:
        return Expected(ADAMW, "embedding")
    if norm:
        return Expected(ADAMW, "norm")
    if leaf == "bias" or leaf.endswith("_bias") or leaf.startswith("bias"):
        return Expected(ADAMW, "bias")
    if vector_like(shape):
        return Expected(ADAMW, "gain, token or scalar")
    if matches(module_path, case.outputs) or matches(path, case.outputs):
        return Expected(ADAMW, "output layer")
    if matches(module_path, case.inputs) or matches(path, case.inputs):
        return Expected(ADAMW, "input layer")
    if matches(path, case.adamw):
        return Expected(ADAMW, "table or elementwise parameter")
    return Expected(MUON, "hidden matrix")


# ---------------------------------------------------------------------- torch
def expected_torch(case: Case, model) -> dict[str, Expected]:
    """{parameter name (as ``named_parameters`` gives it): Expected} for a torch model."""
    import re

    import torch

    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase, torch.nn.RMSNorm)
    embedding_types = (torch.nn.Embedding, torch.nn.EmbeddingBag)
    tables = {id(m.weight) for m in model.modules() if isinstance(m, embedding_types)}
    table, seen = {}, set()
    for module_path, module in model.named_modules():
        norm = isinstance(module, norm_types) or re.search(r"(Layer|RMS|Group|Batch)Norm", type(module).__name__)
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if not param.requires_grad:
                continue
            path = f"{module_path}.{name}" if module_path else name
            table[path] = decide(
                case, path, module_path, tuple(param.shape), embedding=id(param) in tables, norm=bool(norm)
            )
    return table


def _ids(*shape, high=97):
    import torch

    return torch.randint(0, high, shape)


def _hf(model_class: str, config_class: str, inputs: Callable[[], dict], **config):
    def build():
        import torch
        import transformers

        torch.manual_seed(0)
        cfg = getattr(transformers, config_class)(**config)
        model = getattr(transformers, model_class)(cfg)
        return model, inputs()

    return build


#: a decoder of two layers, 32 wide, a vocabulary of 97 tokens
_LM = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
_MOE = dict(_LM, num_local_experts=4, num_experts_per_tok=2)
_ENCODER = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)


def _text(**extra):
    return lambda: dict(input_ids=_ids(2, 8), **extra)


def _lm_inputs():
    return dict(input_ids=_ids(2, 8), use_cache=False)


def _pixels(size=16, channels=3):
    def inputs():
        import torch

        return dict(pixel_values=torch.randn(2, channels, size, size))

    return inputs


def _audio(length=400):
    def inputs():
        import torch

        return dict(input_values=torch.randn(2, length))

    return inputs


def _whisper_inputs():
    import torch

    return dict(input_features=torch.randn(2, 8, 32), decoder_input_ids=_ids(2, 5), use_cache=False)


def _clip_inputs():
    import torch

    return dict(input_ids=_ids(2, 8), pixel_values=torch.randn(2, 3, 16, 16))


def _gpt2_double_inputs():
    import torch

    return dict(input_ids=_ids(2, 2, 8), mc_token_ids=torch.full((2, 2), 7), use_cache=False)


def _seq2seq_inputs():
    return dict(input_ids=_ids(2, 8), decoder_input_ids=_ids(2, 6), use_cache=False)


def _bart_cls_inputs():

    ids = 3 + _ids(2, 8, high=87)
    ids[:, -1] = 2  # BART classifies at the end-of-sentence token
    return dict(input_ids=ids, use_cache=False)


_GPT2 = dict(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64)
_VISION = dict(
    image_size=16, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
)

TORCH_HF = [
    Case("gpt2", "torch", _hf("GPT2LMHeadModel", "GPT2Config", _lm_inputs, **_GPT2), outputs=("lm_head",), fast=True),
    Case(
        "gpt2-double-heads",
        "torch",
        _hf("GPT2DoubleHeadsModel", "GPT2Config", _gpt2_double_inputs, **_GPT2),
        outputs=("lm_head", "multiple_choice_head.summary"),
    ),
    Case("llama", "torch", _hf("LlamaForCausalLM", "LlamaConfig", _lm_inputs, **_LM), outputs=("lm_head",), fast=True),
    # tied (the embedding is the output layer), its MLP as wide as the vocabulary: the blocks'
    # vocabulary-wide layers are hidden
    Case(
        "llama, tied, MLP as wide as the vocabulary",
        "torch",
        _hf("LlamaForCausalLM", "LlamaConfig", _lm_inputs, **dict(_LM, intermediate_size=97, tie_word_embeddings=True)),
    ),
    Case("qwen2", "torch", _hf("Qwen2ForCausalLM", "Qwen2Config", _lm_inputs, **_LM), outputs=("lm_head",)),
    Case("qwen3", "torch", _hf("Qwen3ForCausalLM", "Qwen3Config", _lm_inputs, **_LM, head_dim=8), outputs=("lm_head",)),
    Case("gemma", "torch", _hf("GemmaForCausalLM", "GemmaConfig", _lm_inputs, **_LM, head_dim=8), outputs=("lm_head",)),
    Case(
        "gemma3",
        "torch",
        _hf("Gemma3ForCausalLM", "Gemma3TextConfig", _lm_inputs, **_LM, head_dim=8, sliding_window=4),
        outputs=("lm_head",),
    ),
    Case(
        "mixtral",
        "torch",
        _hf("MixtralForCausalLM", "MixtralConfig", _lm_inputs, **_MOE),
        outputs=("lm_head",),
        judgement={"*.mlp.gate.weight": "router"},
        fast=True,
    ),
    Case(
        "gpt-oss",
        "torch",
        _hf("GptOssForCausalLM", "GptOssConfig", _lm_inputs, **_MOE, head_dim=8, sliding_window=4),
        outputs=("lm_head",),
        judgement={"*.mlp.router.weight": "router"},
        fast=True,
    ),
    Case(
        "qwen3-moe",
        "torch",
        _hf(
            "Qwen3MoeForCausalLM",
            "Qwen3MoeConfig",
            _lm_inputs,
            **_LM,
            head_dim=8,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
        ),
        outputs=("lm_head",),
        judgement={"*.mlp.gate.weight": "router"},
    ),
    Case(
        "olmoe",
        "torch",
        _hf("OlmoeForCausalLM", "OlmoeConfig", _lm_inputs, **_LM, num_experts=4, num_experts_per_tok=2),
        outputs=("lm_head",),
        judgement={"*.mlp.gate.weight": "router"},
    ),
    Case(
        "deepseek-v3",
        "torch",
        _hf(
            "DeepseekV3ForCausalLM",
            "DeepseekV3Config",
            _lm_inputs,
            **_LM,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            n_shared_experts=1,
            first_k_dense_replace=1,
            kv_lora_rank=8,
            q_lora_rank=8,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            n_group=1,
            topk_group=1,
        ),
        outputs=("lm_head",),
        judgement={"*.mlp.gate.weight": "router"},
    ),
    Case("phi", "torch", _hf("PhiForCausalLM", "PhiConfig", _lm_inputs, **_LM), outputs=("lm_head",)),
    Case(
        "phi3", "torch", _hf("Phi3ForCausalLM", "Phi3Config", _lm_inputs, **_LM, pad_token_id=0), outputs=("lm_head",)
    ),
    Case(
        "gpt-neox",
        "torch",
        _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", _lm_inputs, **_ENCODER),
        outputs=("embed_out", "lm_head"),
    ),
    Case(
        "falcon",
        "torch",
        _hf(
            "FalconForCausalLM",
            "FalconConfig",
            _lm_inputs,
            vocab_size=97,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        outputs=("lm_head",),
    ),
    Case(
        "bloom",
        "torch",
        _hf("BloomForCausalLM", "BloomConfig", _lm_inputs, vocab_size=97, hidden_size=32, n_layer=2, n_head=4),
        outputs=("lm_head",),
    ),
    Case(
        "opt",
        "torch",
        _hf("OPTForCausalLM", "OPTConfig", _lm_inputs, **dict(_ENCODER, ffn_dim=64, word_embed_proj_dim=32)),
        outputs=("lm_head",),
    ),
    Case(
        "rwkv",
        "torch",
        _hf(
            "RwkvForCausalLM",
            "RwkvConfig",
            _lm_inputs,
            vocab_size=97,
            hidden_size=32,
            num_hidden_layers=2,
            attention_hidden_size=32,
            intermediate_size=64,
            context_length=64,
        ),
        outputs=("head",),
    ),
    Case(
        "mamba",
        "torch",
        _hf(
            "MambaForCausalLM",
            "MambaConfig",
            _lm_inputs,
            vocab_size=97,
            hidden_size=32,
            state_size=4,
            num_hidden_layers=2,
            expand=2,
            conv_kernel=4,
        ),
        outputs=("lm_head",),
        adamw=("*.A_log",),
        judgement={"*.mixer.conv1d.weight": "depthwise"},
    ),
    Case(
        "bert-sequence-classification",
        "torch",
        _hf("BertForSequenceClassification", "BertConfig", _text(), **_ENCODER),
        outputs=("classifier",),
        judgement={"bert.pooler.dense.weight": "pooler"},
        fast=True,
    ),
    Case(
        "bert-question-answering",
        "torch",
        _hf("BertForQuestionAnswering", "BertConfig", _text(), **_ENCODER),
        outputs=("qa_outputs",),
        fast=True,
    ),
    Case(
        "bert-masked-lm",
        "torch",
        _hf("BertForMaskedLM", "BertConfig", _text(), **_ENCODER),
        outputs=("cls.predictions.decoder",),
    ),
    Case(
        "roberta-token-classification",
        "torch",
        _hf("RobertaForTokenClassification", "RobertaConfig", _text(), **_ENCODER, num_labels=5),
        outputs=("classifier",),
    ),
    Case(
        "distilbert-sequence-classification",
        "torch",
        _hf(
            "DistilBertForSequenceClassification",
            "DistilBertConfig",
            _text(),
            vocab_size=97,
            dim=32,
            hidden_dim=64,
            n_layers=2,
            n_heads=4,
            max_position_embeddings=64,
        ),
        outputs=("classifier",),
        judgement={"pre_classifier.weight": "pooler"},
    ),
    Case(
        "albert-masked-lm",
        "torch",
        _hf("AlbertForMaskedLM", "AlbertConfig", _text(), **_ENCODER, embedding_size=16),
        outputs=("predictions.decoder",),
    ),
    Case(
        "electra-discriminator",
        "torch",
        _hf("ElectraForPreTraining", "ElectraConfig", _text(), **_ENCODER, embedding_size=32),
        outputs=("discriminator_predictions.dense_prediction",),
    ),
    Case(
        "deberta-v2-sequence-classification",
        "torch",
        _hf(
            "DebertaV2ForSequenceClassification",
            "DebertaV2Config",
            _text(),
            **_ENCODER,
            relative_attention=True,
            position_buckets=8,
            pos_att_type=["p2c", "c2p"],
        ),
        outputs=("classifier",),
        judgement={"pooler.dense.weight": "pooler", "deberta.encoder.rel_embeddings.weight": "position table"},
    ),
    Case(
        "modernbert-masked-lm",
        "torch",
        _hf(
            "ModernBertForMaskedLM",
            "ModernBertConfig",
            _text(),
            **dict(_ENCODER, global_attn_every_n_layers=2, local_attention=8),
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=2,
            cls_token_id=2,
            sep_token_id=1,
        ),
        outputs=("decoder",),
    ),
    Case(
        "bart-sequence-classification",
        "torch",
        _hf(
            "BartForSequenceClassification",
            "BartConfig",
            _bart_cls_inputs,
            vocab_size=97,
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
        ),
        outputs=("classification_head.out_proj",),
        judgement={"classification_head.dense.weight": "pooler"},
    ),
    Case(
        "t5",
        "torch",
        _hf(
            "T5ForConditionalGeneration",
            "T5Config",
            _seq2seq_inputs,
            vocab_size=97,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
        ),
        outputs=("lm_head",),
        judgement={"*.relative_attention_bias.weight": "position table"},
    ),
    Case(
        "xlnet",
        "torch",
        _hf("XLNetLMHeadModel", "XLNetConfig", _lm_inputs, vocab_size=97, d_model=32, n_layer=2, n_head=4, d_inner=64),
        outputs=("lm_loss",),
        adamw=("*.seg_embed",),  # the table of segment embeddings
    ),
    Case(
        "vit",
        "torch",
        _hf("ViTForImageClassification", "ViTConfig", _pixels(), **_VISION),
        outputs=("classifier",),
        inputs=("vit.embeddings.patch_embeddings.projection",),
        adamw=("vit.embeddings.position_embeddings",),
        fast=True,
    ),
    Case(
        "vit-mae",
        "torch",
        _hf(
            "ViTMAEForPreTraining",
            "ViTMAEConfig",
            _pixels(),
            **_VISION,
            decoder_hidden_size=32,
            decoder_intermediate_size=64,
            decoder_num_hidden_layers=1,
            decoder_num_attention_heads=4,
            mask_ratio=0.5,
        ),
        outputs=("decoder.decoder_pred",),
        inputs=("vit.embeddings.patch_embeddings.projection",),
    ),
    Case(
        "deit-distilled",
        "torch",
        _hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", _pixels(), **_VISION),
        outputs=("cls_classifier", "distillation_classifier"),
        inputs=("deit.embeddings.patch_embeddings.projection",),
        adamw=("deit.embeddings.position_embeddings",),
    ),
    Case(
        "beit",
        "torch",
        _hf(
            "BeitForImageClassification",
            "BeitConfig",
            _pixels(),
            **_VISION,
            use_relative_position_bias=True,
            use_mean_pooling=True,
        ),
        outputs=("classifier",),
        inputs=("beit.embeddings.patch_embeddings.projection",),
        judgement={"*.relative_position_bias_table": "position table"},
    ),
    Case(
        "dinov2",
        "torch",
        _hf("Dinov2ForImageClassification", "Dinov2Config", _pixels(), **dict(_VISION, mlp_ratio=2)),
        outputs=("classifier",),
        inputs=("dinov2.embeddings.patch_embeddings.projection",),
        adamw=("dinov2.embeddings.position_embeddings",),
    ),
    Case(
        "swin",
        "torch",
        _hf(
            "SwinForImageClassification",
            "SwinConfig",
            _pixels(32),
            image_size=32,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[2, 2],
            window_size=4,
        ),
        outputs=("classifier",),
        inputs=("swin.embeddings.patch_embeddings.projection",),
        judgement={"*.relative_position_bias_table": "position table"},
    ),
    Case(
        "convnextv2",
        "torch",
        _hf(
            "ConvNextV2ForImageClassification",
            "ConvNextV2Config",
            _pixels(32),
            image_size=32,
            hidden_sizes=[16, 32],
            depths=[1, 1],
            num_stages=2,
        ),
        outputs=("classifier",),
        inputs=("convnextv2.embeddings.patch_embeddings",),
        judgement={"*.dwconv.weight": "depthwise"},
    ),
    Case(
        "resnet",
        "torch",
        _hf(
            "ResNetForImageClassification",
            "ResNetConfig",
            _pixels(32),
            embedding_size=16,
            hidden_sizes=[16, 32],
            depths=[1, 1],
            layer_type="bottleneck",
        ),
        outputs=("classifier.1",),
        inputs=("resnet.embedder.embedder.convolution",),
        judgement={
            "*.shortcut.convolution.weight": "pointwise",
            "*.layer.0.convolution.weight": "pointwise",
            "*.layer.2.convolution.weight": "pointwise",
        },
        fast=True,
    ),
    Case(
        "mobilenet-v2",
        "torch",
        _hf(
            "MobileNetV2ForImageClassification",
            "MobileNetV2Config",
            _pixels(32),
            image_size=32,
            depth_multiplier=0.25,
            min_depth=4,
        ),
        outputs=("classifier",),
        inputs=("mobilenet_v2.conv_stem.first_conv.convolution",),
        judgement={
            "*.conv_3x3.convolution.weight": "depthwise",
            "*.expand_1x1.convolution.weight": "pointwise",
            "*.reduce_1x1.convolution.weight": "pointwise",
            "mobilenet_v2.conv_1x1.convolution.weight": "pointwise",
        },
    ),
    Case(
        "whisper",
        "torch",
        _hf(
            "WhisperForConditionalGeneration",
            "WhisperConfig",
            _whisper_inputs,
            vocab_size=97,
            num_mel_bins=8,
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_source_positions=16,
            max_target_positions=16,
            decoder_start_token_id=1,
            pad_token_id=0,
        ),
        outputs=("proj_out",),
        inputs=("model.encoder.conv1",),
        fast=True,
    ),
    Case(
        "wav2vec2-ctc",
        "torch",
        _hf(
            "Wav2Vec2ForCTC",
            "Wav2Vec2Config",
            _audio(),
            vocab_size=12,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            conv_dim=(16, 16),
            conv_stride=(5, 2),
            conv_kernel=(10, 3),
            num_conv_pos_embeddings=8,
            num_conv_pos_embedding_groups=4,
        ),
        outputs=("lm_head",),
        inputs=("wav2vec2.feature_extractor.conv_layers.0.conv",),
    ),
    Case(
        "clip",
        "torch",
        _hf(
            "CLIPModel",
            "CLIPConfig",
            _clip_inputs,
            text_config=dict(
                vocab_size=97,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=4,
                max_position_embeddings=16,
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=4,
                image_size=16,
                patch_size=4,
            ),
            projection_dim=16,
        ),
        outputs=("visual_projection", "text_projection"),
        inputs=("vision_model.embeddings.patch_embedding",),
    ),
]


def _nano_models():
    """GPTs written as nanoGPT, nanochat and modded-nanogpt write them (their module names,
    types and parameters), at a tiny size."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class MLP(nn.Module):
        def __init__(self, dim, bias=True):
            super().__init__()
            self.c_fc, self.c_proj = nn.Linear(dim, 4 * dim, bias=bias), nn.Linear(4 * dim, dim, bias=bias)

        def forward(self, x):
            return self.c_proj(F.gelu(self.c_fc(x)))

    class NanoGPTBlock(nn.Module):  # karpathy/nanoGPT model.py
        def __init__(self, dim):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.attn = nn.Module()
            self.attn.c_attn, self.attn.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.mlp = MLP(dim)

        def forward(self, x):
            q, k, v = self.attn.c_attn(self.ln_1(x)).split(x.shape[-1], dim=-1)
            x = x + self.attn.c_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
            return x + self.mlp(self.ln_2(x))

    class NanoGPT(nn.Module):
        def __init__(self, vocab=97, dim=32, layers=2, context=16):
            super().__init__()
            self.transformer = nn.ModuleDict(
                dict(
                    wte=nn.Embedding(vocab, dim),
                    wpe=nn.Embedding(context, dim),
                    h=nn.ModuleList(NanoGPTBlock(dim) for _ in range(layers)),
                    ln_f=nn.LayerNorm(dim),
                )
            )
            self.lm_head = nn.Linear(dim, vocab, bias=False)
            self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT does

        def forward(self, idx):
            x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.shape[1]))
            for block in self.transformer.h:
                x = block(x)
            return self.lm_head(self.transformer.ln_f(x))

    class NanochatBlock(nn.Module):  # karpathy/nanochat gpt.py: parameter-free RMSNorm
        def __init__(self, dim):
            super().__init__()
            self.attn = nn.Module()
            for name in ("c_q", "c_k", "c_v", "c_proj"):
                setattr(self.attn, name, nn.Linear(dim, dim, bias=False))
            self.mlp = MLP(dim, bias=False)

        def forward(self, x):
            h = F.rms_norm(x, (x.shape[-1],))
            q, k, v = self.attn.c_q(h), self.attn.c_k(h), self.attn.c_v(h)
            x = x + self.attn.c_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
            return x + self.mlp(F.rms_norm(x, (x.shape[-1],)))

    class Nanochat(nn.Module):
        def __init__(self, vocab=97, dim=32, layers=2):
            super().__init__()
            self.transformer = nn.ModuleDict(
                dict(wte=nn.Embedding(vocab, dim), h=nn.ModuleList(NanochatBlock(dim) for _ in range(layers)))
            )
            self.lm_head = nn.Linear(dim, vocab, bias=False)
            self.resid_lambdas = nn.Parameter(torch.ones(layers))
            self.x0_lambdas = nn.Parameter(torch.zeros(layers))

        def forward(self, idx):
            x = x0 = F.rms_norm(self.transformer.wte(idx), (self.lm_head.in_features,))
            for i, block in enumerate(self.transformer.h):
                x = block(self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0)
            return self.lm_head(F.rms_norm(x, (x.shape[-1],)))

    class CastedLinear(nn.Linear):  # modded-nanogpt: a Linear that casts its weight
        def __init__(self, fan_in, fan_out):
            super().__init__(fan_in, fan_out, bias=False)

        def forward(self, x):
            return F.linear(x, self.weight.type_as(x))

    class ModdedBlock(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.attn = nn.Module()
            self.attn.qkvo_w = nn.Parameter(torch.randn(4, dim, dim) / dim**0.5)  # q, k, v, o stacked
            self.mlp = nn.Module()
            self.mlp.c_fc, self.mlp.c_proj = CastedLinear(dim, 4 * dim), CastedLinear(4 * dim, dim)
            self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))

        def forward(self, x, x0, ve):
            x = self.lambdas[0] * x + self.lambdas[1] * x0
            h = F.rms_norm(x, (x.shape[-1],))
            q, k, v = F.linear(h, self.attn.qkvo_w[:3].flatten(end_dim=1)).chunk(3, dim=-1)
            y = F.scaled_dot_product_attention(q, k, v + ve, is_causal=True)
            x = x + F.linear(y, self.attn.qkvo_w[3])
            h = F.rms_norm(x, (x.shape[-1],))
            return x + self.mlp.c_proj(F.relu(self.mlp.c_fc(h)).square())

    class ModdedNanoGPT(nn.Module):
        def __init__(self, vocab=97, dim=32, layers=2):
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.value_embeds = nn.ModuleList(nn.Embedding(vocab, dim) for _ in range(layers))
            self.blocks = nn.ModuleList(ModdedBlock(dim) for _ in range(layers))
            self.lm_head = CastedLinear(dim, 128)  # the vocabulary padded to a multiple of 128
            self.scalars = nn.Parameter(torch.ones(layers))

        def forward(self, idx):
            x = x0 = F.rms_norm(self.embed(idx), (self.lm_head.in_features,))
            for i, block in enumerate(self.blocks):
                x = self.scalars[i] * block(x, x0, self.value_embeds[i](idx))
            logits = self.lm_head(F.rms_norm(x, (x.shape[-1],)))
            return 30 * torch.sigmoid(logits / 7.5)

    return NanoGPT, Nanochat, ModdedNanoGPT


def _nano(index):
    def build():
        import torch

        torch.manual_seed(0)
        return _nano_models()[index](), dict(idx=_ids(2, 8))

    return build


TORCH_OWN = [
    Case("nanogpt", "torch", _nano(0), outputs=("lm_head",), fast=True),
    Case("nanochat", "torch", _nano(1), outputs=("lm_head",)),
    Case("modded-nanogpt", "torch", _nano(2), outputs=("lm_head",)),
]


# ---------------------------------------------------------------------- MLX
def expected_mlx(case: Case, model) -> dict[str, Expected]:
    """{dotted path: Expected} for the trainable arrays of an ``mlx.nn.Module``."""
    import re

    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    trainable = {path for path, _ in tree_flatten(model.trainable_parameters())}
    table = {}
    for module_path, module in model.named_modules():
        kind = type(module).__name__
        embedding = isinstance(module, (nn.Embedding, nn.QuantizedEmbedding))
        norm = bool(re.search(r"(Layer|RMS|Group|Batch|Instance)Norm", kind))
        for name, value in module.items():
            path = f"{module_path}.{name}" if module_path else name
            if isinstance(value, mx.array) and path in trainable:
                table[path] = decide(case, path, module_path, tuple(value.shape), embedding=embedding, norm=norm)
    return table


_MLX_LM = dict(
    hidden_size=32,
    num_hidden_layers=2,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rms_norm_eps=1e-5,
    vocab_size=97,
    max_position_embeddings=64,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    sliding_window=4,
)


def _mlx_lm(module: str, **overrides):
    def build():
        import importlib

        import mlx.core as mx

        mx.random.seed(0)
        models = importlib.import_module(f"mlx_lm.models.{module}")
        args = models.ModelArgs.from_dict(dict(_MLX_LM, model_type=module, **overrides))
        return models.Model(args), mx.random.randint(0, 97, (2, 8))

    return build


def _mlx_examples():
    """Models written as mlx-examples writes them: transformer_lm's TransformerLM, cifar's
    ResNet, mnist's MLP (their module names and types), at a tiny size."""
    import mlx.core as mx
    import mlx.nn as nn

    class TransformerLM(nn.Module):
        def __init__(self, vocab=97, layers=2, dims=32, heads=4):
            super().__init__()
            self.embedding = nn.Embedding(vocab, dims)
            self.transformer = nn.TransformerEncoder(layers, dims, heads, norm_first=True)
            self.out_proj = nn.Linear(dims, vocab)

        def __call__(self, x):
            mask = nn.MultiHeadAttention.create_additive_causal_mask(x.shape[1])
            return self.out_proj(self.transformer(self.embedding(x), mask))

    class Block(nn.Module):
        def __init__(self, dims_in, dims, stride=1):
            super().__init__()
            self.conv1 = nn.Conv2d(dims_in, dims, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm(dims)
            self.conv2 = nn.Conv2d(dims, dims, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm(dims)
            self.shortcut = None
            if stride != 1:
                self.shortcut = [nn.Conv2d(dims_in, dims, 1, stride=stride, bias=False), nn.BatchNorm(dims)]

        def __call__(self, x):
            out = nn.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            shortcut = x if self.shortcut is None else self.shortcut[1](self.shortcut[0](x))
            return nn.relu(out + shortcut)

    class ResNet(nn.Module):
        def __init__(self, classes=10):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm(8)
            self.layer1 = [Block(8, 8)]
            self.layer2 = [Block(8, 16, stride=2)]
            self.linear = nn.Linear(16, classes)

        def __call__(self, x):
            x = nn.relu(self.bn1(self.conv1(x)))
            for block in self.layer1 + self.layer2:
                x = block(x)
            return self.linear(mx.mean(x, axis=[1, 2]))

    class MLP(nn.Module):
        def __init__(self, idim=64, hdim=32, odim=10, layers=3):
            super().__init__()
            sizes = [idim] + [hdim] * (layers - 1) + [odim]
            self.layers = [nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])]

        def __call__(self, x):
            for layer in self.layers[:-1]:
                x = nn.relu(layer(x))
            return self.layers[-1](x)

    return TransformerLM, ResNet, MLP


def _mlx_example(index):
    def build():
        import mlx.core as mx

        mx.random.seed(0)
        model = _mlx_examples()[index]()
        inputs = [mx.random.randint(0, 97, (2, 8)), mx.random.normal((2, 8, 8, 3)), mx.random.normal((2, 64))][index]
        return model, inputs

    return build


_MLX_MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, top_k_experts=2)
MLX = [
    Case("mlx-lm llama", "mlx", _mlx_lm("llama"), outputs=("lm_head",), fast=True, source="mlx_lm.models.llama"),
    Case(
        "mlx-lm llama, tied, MLP as wide as the vocabulary",
        "mlx",
        _mlx_lm("llama", intermediate_size=97, tie_word_embeddings=True),
        source="mlx_lm.models.llama",
    ),
    Case(
        "mlx-lm gpt-oss",
        "mlx",
        _mlx_lm("gpt_oss", **_MLX_MOE),
        outputs=("lm_head",),
        judgement={"*.mlp.router.weight": "router"},
        fast=True,
    ),
    Case("mlx-lm gemma3", "mlx", _mlx_lm("gemma3_text", sliding_window_pattern=2), outputs=("lm_head",)),
    Case(
        "mlx-lm gemma4",
        "mlx",
        _mlx_lm(
            "gemma4_text",
            global_head_dim=8,
            num_kv_shared_layers=0,
            hidden_size_per_layer_input=0,
            vocab_size_per_layer_input=97,
            sliding_window_pattern=2,
        ),
        outputs=("lm_head",),
    ),
    Case(
        "mlx-lm olmo3",
        "mlx",
        _mlx_lm("olmo3", layer_types=["sliding_attention", "full_attention"]),
        outputs=("lm_head",),
    ),
    Case(
        "mlx-lm ministral3",
        "mlx",
        _mlx_lm(
            "ministral3",
            rope_parameters=dict(
                rope_type="default", rope_theta=10000.0, llama_4_scaling_beta=0.1, original_max_position_embeddings=64
            ),
        ),
        outputs=("lm_head",),
    ),
    Case(
        "mlx-lm qwen3-moe",
        "mlx",
        _mlx_lm("qwen3_moe", **_MLX_MOE, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True),
        outputs=("lm_head",),
        judgement={"*.mlp.gate.weight": "router"},
    ),
    Case(
        "mlx-lm mixtral",
        "mlx",
        _mlx_lm("mixtral", **_MLX_MOE),
        outputs=("lm_head",),
        judgement={"*.block_sparse_moe.gate.weight": "router"},
    ),
    Case("mlx-lm nanochat", "mlx", _mlx_lm("nanochat", num_key_value_heads=4), outputs=("lm_head",)),
    Case(
        "mlx-lm gpt2",
        "mlx",
        _mlx_lm("gpt2", n_ctx=16, n_embd=32, n_head=4, n_layer=2, n_positions=16, layer_norm_epsilon=1e-5),
    ),
    Case("mlx-lm phi3", "mlx", _mlx_lm("phi3"), outputs=("lm_head",)),
    Case(
        "mlx-lm mamba",
        "mlx",
        _mlx_lm(
            "mamba",
            state_size=4,
            conv_kernel=4,
            use_bias=False,
            use_conv_bias=True,
            time_step_rank=4,
            tie_word_embeddings=True,
        ),
        adamw=("*.A_log",),
        judgement={"*.mixer.conv1d.weight": "depthwise"},
    ),
    Case("mlx-examples transformer_lm", "mlx", _mlx_example(0), outputs=("out_proj",), fast=True),
    Case(
        "mlx-examples cifar resnet",
        "mlx",
        _mlx_example(1),
        outputs=("linear",),
        inputs=("conv1",),
        judgement={"*.shortcut.0.weight": "pointwise"},
    ),
    Case("mlx-examples mnist mlp", "mlx", _mlx_example(2), outputs=("layers.2",), inputs=("layers.0",)),
]


# ---------------------------------------------------------------------- JAX: flax nnx, flax linen, equinox
def expected_nnx(case: Case, model) -> dict[str, Expected]:
    """{dotted path: Expected} for the ``nnx.Param`` s of an nnx module."""
    from flax import nnx

    table = {}
    modules = dict(nnx.iter_modules(model))
    for keys, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Param):
            continue
        owner = modules.get(tuple(keys[:-1]))
        path, module_path = ".".join(map(str, keys)), ".".join(map(str, keys[:-1]))
        table[path] = decide(
            case,
            path,
            module_path,
            tuple(node.value.shape),
            embedding=isinstance(owner, nnx.Embed),
            norm=isinstance(owner, (nnx.LayerNorm, nnx.RMSNorm, nnx.BatchNorm, nnx.GroupNorm)),
        )
    return table


def expected_linen(case: Case, params) -> dict[str, Expected]:
    """{dotted path: Expected} for linen's ``params``, whose module names say their class
    (``Dense_0``, ``BatchNorm_1``) unless named by the model (then the case lists them)."""
    import jax

    from treeopt.jax import path_of

    table = {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = path_of(keys)
        module_path, _, leaf_name = path.rpartition(".")
        module = module_path.rsplit(".", 1)[-1]
        table[path] = decide(
            case,
            path,
            module_path,
            tuple(leaf.shape),
            embedding=leaf_name == "embedding",
            norm=module.split("_")[0] in ("LayerNorm", "BatchNorm", "GroupNorm", "RMSNorm")
            or matches(module_path, case.adamw),
        )
    return table


def expected_equinox(case: Case, model) -> dict[str, Expected]:
    """{dotted path: Expected} for the arrays of an equinox module, found by walking its fields."""
    import dataclasses as dc

    import equinox as eqx
    import jax

    table = {}

    def walk(node, keys, owner):
        if isinstance(node, eqx.Module):
            for field in dc.fields(node):
                walk(getattr(node, field.name), keys + (field.name,), node)
        elif isinstance(node, (list, tuple)):
            for i, child in enumerate(node):
                walk(child, keys + (str(i),), owner)
        elif isinstance(node, jax.Array):
            path, module_path = ".".join(keys), ".".join(keys[:-1])
            table[path] = decide(
                case,
                path,
                module_path,
                tuple(node.shape),
                embedding=isinstance(owner, eqx.nn.Embedding),
                norm=isinstance(owner, (eqx.nn.LayerNorm, eqx.nn.RMSNorm, eqx.nn.GroupNorm, eqx.nn.BatchNorm)),
            )

    walk(model, (), None)
    return table


def _nnx_models():
    """The CNN of flax's MNIST tutorial, and a small decoder built from nnx's layers."""
    from functools import partial

    import jax
    from flax import nnx

    class CNN(nnx.Module):  # flax docs, "MNIST tutorial", at a tiny size
        def __init__(self, *, rngs):
            self.conv1 = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
            self.conv2 = nnx.Conv(4, 8, kernel_size=(3, 3), rngs=rngs)
            self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
            self.linear1 = nnx.Linear(8 * 2 * 2, 16, rngs=rngs)
            self.linear2 = nnx.Linear(16, 10, rngs=rngs)

        def __call__(self, x):
            x = self.avg_pool(nnx.relu(self.conv1(x)))
            x = self.avg_pool(nnx.relu(self.conv2(x)))
            x = x.reshape(x.shape[0], -1)
            return self.linear2(nnx.relu(self.linear1(x)))

    class Block(nnx.Module):
        def __init__(self, dim, *, rngs):
            self.norm1, self.norm2 = nnx.LayerNorm(dim, rngs=rngs), nnx.LayerNorm(dim, rngs=rngs)
            self.attention = nnx.MultiHeadAttention(4, dim, decode=False, rngs=rngs)
            self.up, self.down = nnx.Linear(dim, 2 * dim, rngs=rngs), nnx.Linear(2 * dim, dim, rngs=rngs)

        def __call__(self, x):
            x = x + self.attention(self.norm1(x), mask=nnx.make_causal_mask(x[..., 0]))
            return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))

    class Decoder(nnx.Module):
        def __init__(self, vocab=97, dim=32, layers=2, *, rngs):
            self.embed = nnx.Embed(vocab, dim, rngs=rngs)
            self.blocks = nnx.List([Block(dim, rngs=rngs) for _ in range(layers)])
            self.norm = nnx.RMSNorm(dim, rngs=rngs)
            self.lm_head = nnx.Linear(dim, vocab, use_bias=False, rngs=rngs)

        def __call__(self, tokens):
            x = self.embed(tokens)
            for block in self.blocks:
                x = block(x)
            return self.lm_head(self.norm(x))

    return CNN, Decoder


def _nnx(index):
    def build():
        import jax
        from flax import nnx

        model = _nnx_models()[index](rngs=nnx.Rngs(0))
        x = [jax.random.normal(jax.random.key(1), (2, 8, 8, 1)), jax.random.randint(jax.random.key(1), (2, 8), 0, 97)][
            index
        ]
        return model, x

    return build


def _linen_models():
    """The ResNet of flax's ImageNet example and the MLP of its README, at a tiny size."""
    import flax.linen as nn
    import jax.numpy as jnp

    class ResNetBlock(nn.Module):  # flax/examples/imagenet/models.py
        filters: int
        strides: tuple = (1, 1)

        @nn.compact
        def __call__(self, x):
            residual = x
            y = nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(x)
            y = nn.relu(nn.BatchNorm(use_running_average=False)(y))
            y = nn.Conv(self.filters, (3, 3), use_bias=False)(y)
            y = nn.BatchNorm(use_running_average=False, scale_init=nn.initializers.zeros_init())(y)
            if residual.shape != y.shape:
                residual = nn.Conv(self.filters, (1, 1), self.strides, use_bias=False, name="conv_proj")(residual)
                residual = nn.BatchNorm(use_running_average=False, name="norm_proj")(residual)
            return nn.relu(residual + y)

    class ResNet(nn.Module):
        num_classes: int = 10

        @nn.compact
        def __call__(self, x):
            x = nn.Conv(8, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False, name="conv_init")(x)
            x = nn.relu(nn.BatchNorm(use_running_average=False, name="bn_init")(x))
            x = ResNetBlock(8)(x)
            x = ResNetBlock(16, strides=(2, 2))(x)
            return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))

    class MLP(nn.Module):
        features: tuple = (32, 32, 10)

        @nn.compact
        def __call__(self, x):
            for feat in self.features[:-1]:
                x = nn.relu(nn.Dense(feat)(x))
            return nn.Dense(self.features[-1])(x)

    return ResNet, MLP


def _linen(index):
    def build():
        import jax

        model = _linen_models()[index]()
        x = [jax.random.normal(jax.random.key(1), (2, 16, 16, 3)), jax.random.normal(jax.random.key(1), (2, 12))][index]
        variables = model.init(jax.random.key(0), x)
        return model, variables, x

    return build


def _equinox_models():
    """The CNN of equinox's MNIST tutorial, equinox's MLP, and a decoder of equinox layers."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    class CNN(eqx.Module):  # equinox docs, "Convolutional neural network on MNIST", at a tiny size
        layers: list

        def __init__(self, key):
            k1, k2, k3, k4 = jax.random.split(key, 4)
            self.layers = [
                eqx.nn.Conv2d(1, 3, kernel_size=4, key=k1),
                eqx.nn.MaxPool2d(kernel_size=2),
                jax.nn.relu,
                jnp.ravel,
                eqx.nn.Linear(3 * 4 * 4, 32, key=k2),
                jax.nn.sigmoid,
                eqx.nn.Linear(32, 16, key=k3),
                jax.nn.relu,
                eqx.nn.Linear(16, 10, key=k4),
                jax.nn.log_softmax,
            ]

        def __call__(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    class Block(eqx.Module):
        norm: eqx.nn.LayerNorm
        attention: eqx.nn.MultiheadAttention
        mlp: eqx.nn.MLP

        def __init__(self, dim, key):
            k1, k2 = jax.random.split(key)
            self.norm = eqx.nn.LayerNorm(dim)
            self.attention = eqx.nn.MultiheadAttention(4, dim, key=k1)
            self.mlp = eqx.nn.MLP(dim, dim, 2 * dim, depth=1, key=k2)

        def __call__(self, x):
            h = jax.vmap(self.norm)(x)
            x = x + self.attention(h, h, h)
            return x + jax.vmap(self.mlp)(x)

    class Decoder(eqx.Module):
        embed: eqx.nn.Embedding
        blocks: list
        norm: eqx.nn.RMSNorm
        unembed: eqx.nn.Linear

        def __init__(self, key, vocab=97, dim=32, layers=2):
            keys = jax.random.split(key, layers + 2)
            self.embed = eqx.nn.Embedding(vocab, dim, key=keys[0])
            self.blocks = [Block(dim, k) for k in keys[2:]]
            self.norm = eqx.nn.RMSNorm(dim)
            self.unembed = eqx.nn.Linear(dim, vocab, use_bias=False, key=keys[1])

        def __call__(self, tokens):
            x = jax.vmap(self.embed)(tokens)
            for block in self.blocks:
                x = block(x)
            return jax.vmap(self.unembed)(jax.vmap(self.norm)(x))

    def mlp(key):
        return eqx.nn.MLP(12, 10, 32, depth=3, key=key)

    return CNN, mlp, Decoder


def _equinox(index):
    def build():
        import jax

        model = _equinox_models()[index](jax.random.key(0))
        x = [
            jax.random.normal(jax.random.key(1), (2, 1, 8, 8)),
            jax.random.normal(jax.random.key(1), (2, 12)),
            jax.random.randint(jax.random.key(1), (2, 8), 0, 97),
        ][index]
        return model, x

    return build


JAX = [
    Case("flax nnx mnist cnn", "nnx", _nnx(0), outputs=("linear2",), inputs=("conv1",), fast=True),
    Case("flax nnx decoder", "nnx", _nnx(1), outputs=("lm_head",)),
    Case(
        "flax linen imagenet resnet",
        "linen",
        _linen(0),
        outputs=("Dense_0",),
        inputs=("conv_init",),
        adamw=("bn_init", "*.norm_proj"),
        judgement={"*.conv_proj.kernel": "pointwise"},
    ),
    Case("flax linen mlp", "linen", _linen(1), outputs=("Dense_2",), inputs=("Dense_0",)),
    Case("equinox mnist cnn", "equinox", _equinox(0), outputs=("layers.8",), inputs=("layers.0",), fast=True),
    Case("equinox mlp", "equinox", _equinox(1), outputs=("layers.3",), inputs=("layers.0",)),
    Case("equinox decoder", "equinox", _equinox(2), outputs=("unembed",)),
]

CASES = TORCH_HF + TORCH_OWN + MLX + JAX
#: the default run's subset: every framework, and each kind of mis-route the recipe guards against
FAST = [
    "bert-question-answering",
    "equinox mlp",
    "flax linen mlp",
    "gpt-oss",
    "gpt2",
    "llama",
    "mlx-examples transformer_lm",
    "mlx-lm llama",
    "mlx-lm llama, tied, MLP as wide as the vocabulary",
    "nanogpt",
    "resnet",
    "vit",
    "whisper",
]
for _case in CASES:
    _case.fast = _case.name in FAST


# ---------------------------------------------------------------------- running treeopt on a case
@dataclasses.dataclass
class Result:
    case: Case
    expected: dict[str, Expected]
    routes: dict[str, str]  # path -> "muon" or "adamw", as treeopt routed it
    ndim: dict[str, str]  # path -> the route of the ``ndim >= 2`` heuristic
    multi: Any  # the MultiOptimizer
    plan: Any
    steps: int = 0  # steps taken (JAX keeps them in the state it returns)

    def misroutes(self) -> dict[str, tuple[Expected, str]]:
        return {
            p: (e, self.routes.get(p, "missing")) for p, e in self.expected.items() if self.routes.get(p) != e.route
        }

    def ndim_misroutes(self) -> dict[str, tuple[Expected, str]]:
        return {p: (e, self.ndim[p]) for p, e in self.expected.items() if self.ndim[p] != e.route}


def _family(name: str) -> str:
    return MUON if name == "muon" else ADAMW


def _routes(multi, paths) -> dict[str, str]:
    routes = {}
    for path in paths:
        group = multi.route(path)
        routes[path] = "unrouted" if group is None else _family(multi.names[group])
    return routes


def _ndim(shapes: dict[str, tuple]) -> dict[str, str]:
    return {p: MUON if len(s) >= 2 else ADAMW for p, s in shapes.items()}


def _torch_loss(out):
    import torch

    tensors = []

    def collect(node):
        if isinstance(node, torch.Tensor):
            if node.is_floating_point() and node.requires_grad:
                tensors.append(node)
        elif isinstance(node, dict):
            for value in node.values():
                collect(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                collect(value)

    collect(out)
    return sum(t.float().square().mean() for t in tensors)


def run_torch(case: Case, preset) -> Result:
    import treeopt.torch

    model, inputs = case.build()
    expected = expected_torch(case, model)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n in expected}
    opt = treeopt.torch.Optimizer(model, preset())  # as docs/torch.md builds it
    _torch_loss(model(**inputs)).backward()
    opt.step()
    multi = opt.optimizer
    return Result(case, expected, _routes(multi, expected), _ndim(shapes), multi, opt.plan(), int(multi.step))


def run_mlx(case: Case, preset) -> Result:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    model, x = case.build()
    expected = expected_mlx(case, model)
    shapes = {p: tuple(a.shape) for p, a in tree_flatten(model.trainable_parameters())}

    def loss(model, x):
        out = model(x)
        return (out.astype(mx.float32) ** 2).mean()

    opt = preset()  # as mlx.optimizers: opt.update(model, grads)
    _, grads = nn.value_and_grad(model, loss)(model, x)
    opt.update(model, grads)
    mx.eval(model.parameters(), opt.state)
    return Result(case, expected, _routes(opt, expected), _ndim(shapes), opt, opt.plan(), int(opt.step))


def run_jax(case: Case, preset) -> Result:
    import jax
    import optax

    import treeopt.jax
    from treeopt.jax import path_of

    multi = preset()
    tx = treeopt.jax.as_optax(multi)
    if case.framework == "nnx":
        from flax import nnx

        model, x = case.build()
        expected = expected_nnx(case, model)
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)  # flax's docs
        grads = nnx.grad(lambda m: (m(x) ** 2).mean())(model)
        optimizer.update(model, grads)
        params, state = nnx.state(model, nnx.Param), optimizer.opt_state
    elif case.framework == "linen":
        model, variables, x = case.build()
        params, rest = variables["params"], {k: v for k, v in variables.items() if k != "params"}
        expected = expected_linen(case, params)
        state = tx.init(params)  # flax's docs: TrainState.create(..., tx=tx) calls tx.init(params)

        def loss(p):
            out, _ = model.apply({"params": p, **rest}, x, mutable=list(rest))
            return (out**2).mean()

        updates, state = tx.update(jax.grad(loss)(params), state, params)
        params = optax.apply_updates(params, updates)
    else:
        import equinox as eqx

        model, x = case.build()
        expected = expected_equinox(case, model)
        params = eqx.filter(model, eqx.is_array)
        state = tx.init(params)  # equinox's docs: optim.init(eqx.filter(model, eqx.is_array))

        @eqx.filter_grad
        def grads_of(m):
            return (jax.vmap(m)(x) ** 2).mean()

        updates, state = tx.update(grads_of(model), state, params)
        model = eqx.apply_updates(model, updates)
    shapes = {path_of(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    shapes = {p: s for p, s in shapes.items() if p in expected}
    steps = int(jax.tree_util.tree_leaves(state["states"][0]["step"])[0])
    return Result(case, expected, _routes(multi, expected), _ndim(shapes), multi, multi.plan(), steps)


def run(case: Case, preset=None) -> Result:
    import treeopt

    preset = preset or treeopt.muon_adamw
    runner = {"torch": run_torch, "mlx": run_mlx}.get(case.framework, run_jax)
    return runner(case, preset)
