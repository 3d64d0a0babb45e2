"""A zoo of tiny decoder-only causal LMs: one per text architecture of the installed transformers.

Every model is built from a config, nothing is downloaded. Sizes: hidden size 32, two layers (more
where an architecture mixes kinds of layer, so that each kind appears), 4 query heads over 2
key/value heads where the architecture has grouped-query attention, ``VOCAB`` tokens,
``MAX_POSITIONS`` positions, no dropout or router noise, and 4 experts routing 2 per token in
mixture-of-experts models (``output_router_logits=True`` where the config has it). The features
that define an architecture stay as configured by default (logit soft-capping and scaling, ALiBi,
partial rotary, attention sinks, QK-norm, ...); sliding windows, attention chunks and sparse-index
budgets shrink to ``WINDOW`` tokens so that they matter on short sequences.

Precision: most eager attentions take their softmax in float32 even in a float64 model, so float64
eager logits agree with sdpa (float64 throughout) to 1e-8 to 1e-6, not 1e-15.

``ARCHITECTURES`` are the ``model_type``s that build; ``UNBUILDABLE`` says why each other entry of
``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` is left out. ``build`` makes a fresh model and ``cached``
shares one per session.
"""

from __future__ import annotations

import functools

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

VOCAB = 96
MAX_POSITIONS = 128
WINDOW = 4

# The sizes of every model.
_SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=64,
    max_position_embeddings=MAX_POSITIONS,
)
# Merged into every config that has the field (an ``attribute_map`` alias counts).
_COMMON = dict(
    _SIZES,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    output_router_logits=True,
)
# Config fields whose float value is zeroed: dropout, layer drop, router and input jitter.
_NOISE = ("dropout", "pdrop", "layerdrop", "jitter")

# Multi-head latent attention (DeepSeek-V2 style): one key/value head per query head.
_MLA = dict(
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    head_dim=4,
    v_head_dim=8,
    num_key_value_heads=4,
)
# DeepSeek-V3.2 style sparse attention: a lightning indexer keeps ``WINDOW`` keys per query.
_INDEXER = dict(index_topk=WINDOW, index_head_dim=8, index_n_heads=2)
_SWA = dict(layer_types=["sliding_attention", "full_attention"], sliding_window=WINDOW)
_FULL_SWA = dict(layer_types=["full_attention", "sliding_attention"], sliding_window=WINDOW)
_LINEAR = dict(layer_types=["linear_attention", "full_attention"])
_GATED_DELTA = dict(
    _LINEAR,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
)
_DENSE_SPARSE = dict(mlp_layer_types=["dense", "sparse"])
_INKLING2 = dict(
    swa_num_attention_heads=4,
    swa_num_key_value_heads=2,
    swa_head_dim=8,
    sliding_window_size=WINDOW,
    d_rel=4,
    rel_extent=16,
    log_scaling_n_floor=WINDOW,
    n_layers_per_attn_res_block=1,
    unpadded_vocab_size=VOCAB,
)
_BLT_PART = dict(_SIZES, num_hidden_layers=1)

# Per-architecture settings, applied over ``_COMMON``.
_CONFIGS: dict[str, dict] = {
    "afmoe": dict(_SWA, num_dense_layers=1, num_shared_experts=1),
    "apertus": {},
    "apertus1p5_text": {},
    "arcee": {},
    "aria_text": dict(moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1),
    "axk1": dict(_MLA, **_DENSE_SPARSE, n_group=2, topk_group=1),
    "axk2": dict(_MLA, **_DENSE_SPARSE, **_INDEXER, gated_norm_rank=4),
    "bailing_hybrid": dict(
        _MLA,
        **_LINEAR,
        **_DENSE_SPARSE,
        q_lora_rank=None,
        num_experts_per_token=2,
        num_shared_experts=1,
        num_expert_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        layer_group_size=2,
        linear_head_dim=8,
        linear_num_heads=4,
    ),
    "bamba": dict(
        attn_layer_indices=[1],
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=8,
        mamba_chunk_size=4,
    ),
    "beam": dict(_SWA, **_DENSE_SPARSE, n_group=2, topk_group=1),
    "biogpt": {},
    "bitnet": {},
    "bloom": {},
    # Without a cache: building one fails (BltConfig has no num_hidden_layers).
    "blt": dict(
        local_attention_window_len=WINDOW,
        encoder_hash_byte_group_vocab=64,
        encoder_hash_byte_group_size=[3, 4],
        patcher_config=dict(_BLT_PART, sliding_window=WINDOW),
        encoder_config=dict(_BLT_PART, hidden_size_global=32, sliding_window=WINDOW),
        decoder_config=dict(_BLT_PART, hidden_size_global=32, sliding_window=WINDOW),
        global_config=_BLT_PART,
        use_cache=False,
    ),
    "codegen": dict(n_inner=64, rotary_dim=4),
    "cohere": {},
    "cohere2": _SWA,
    "cohere2_moe": _SWA,
    # The default rope_parameters ({}) has no entry for the full-attention layers.
    "cohere_compass_text": dict(
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
    ),
    "ctrl": dict(dff=64),
    "cwm": _FULL_SWA,
    # The attention reads rope_theta and clamps by clip_qkv, neither set by default.
    "dbrx": dict(
        d_model=32,
        n_heads=4,
        n_layers=2,
        max_seq_len=MAX_POSITIONS,
        attn_config=dict(kv_n_heads=2, attn_pdrop=0.0, rope_theta=10_000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2),
    ),
    "deepseek_v2": dict(_MLA, first_k_dense_replace=1, n_shared_experts=1),
    "deepseek_v3": dict(_MLA, first_k_dense_replace=1, n_group=2, topk_group=1),
    "deepseek_v32": dict(_MLA, **_INDEXER, first_k_dense_replace=1, n_group=2, topk_group=1),
    "deepseek_v4": dict(
        num_key_value_heads=1,
        head_dim=16,
        q_lora_rank=16,
        layer_types=["heavily_compressed_attention", "compressed_sparse_attention"],
        mlp_layer_types=["hash_moe", "moe"],
        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
        sliding_window=WINDOW,
        o_groups=2,
        o_lora_rank=16,
        index_n_heads=2,
        index_head_dim=8,
        index_topk=WINDOW,
        hc_mult=2,
    ),
    "diffllama": {},
    "doge": dict(keep_window_size=2 * WINDOW),
    "dory": dict(
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        num_hidden_layers=3,
        sliding_window=WINDOW,
        n_input_layers=1,
        n_recurrent_layers=1,
        n_output_layers=1,
    ),
    "dots1": dict(n_shared_experts=1, first_k_dense_replace=1),
    "dots3_note_text": dict(
        _MLA,
        **_DENSE_SPARSE,
        **_INDEXER,
        layer_types=["indexed_attention", "sliding_attention"],
        sliding_window=WINDOW,
        head_dim=12,
        shared_experts_intermediate_size=32,
        per_layer_config={"01": {"num_attention_heads": 2, "num_key_value_heads": 2}},
    ),
    "ergo": dict(
        _SWA,
        **_DENSE_SPARSE,
        first_dense_intermediate_size=64,
        shared_intermediate_size=32,
        global_attention_every_n_layers=2,
    ),
    "ernie4_5": {},
    "ernie4_5_moe": dict(moe_num_experts=4, moe_k=2, moe_num_shared_experts=1),
    "exaone4": _SWA,
    "exaone_moe": dict(_SWA, **_DENSE_SPARSE, num_shared_experts=1),
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2, ffn_hidden_size=64),
    "falcon_h1": dict(
        mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=4
    ),
    "falcon_mamba": dict(state_size=8, time_step_rank=4),
    "flex_olmo": {},
    "flint": dict(_SWA, mlp_only_layers=[0]),
    "gemma": {},
    "gemma2": _SWA,
    "gemma3_text": _SWA,
    # The last two layers reuse the keys and values of the first two.
    "gemma3n_text": dict(
        layer_types=["sliding_attention", "full_attention"] * 2,
        num_hidden_layers=4,
        sliding_window=WINDOW,
        intermediate_size=[64] * 4,
        activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0],
        num_kv_shared_layers=2,
        vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=8,
        laurel_rank=4,
    ),
    "gemma4_text": dict(
        _SWA,
        per_layer_config={"01": {"head_dim": 16}},
        vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=8,
    ),
    "gemma4_unified_text": dict(_SWA, per_layer_config={"01": {"head_dim": 16}}),
    "glm": {},
    "glm4": {},
    "glm4_moe": dict(first_k_dense_replace=1, n_shared_experts=1),
    "glm4_moe_lite": dict(_MLA, **_DENSE_SPARSE, n_shared_experts=1),
    "glm_moe_dsa": dict(_MLA, **_DENSE_SPARSE, **_INDEXER, first_k_dense_replace=1),
    "gpt2": dict(n_inner=64),
    "gpt_bigcode": dict(n_inner=64),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=WINDOW),
    "gpt_neox": {},
    "gpt_neox_japanese": {},
    "gpt_oss": _SWA,
    "gptj": dict(n_inner=64, rotary_dim=4),
    "granite": dict(
        logits_scaling=4.0,
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        attention_multiplier=0.25,
    ),
    "granite_swa": dict(_FULL_SWA, logits_scaling=4.0),
    "granitemoe": dict(logits_scaling=4.0),
    "granitemoe_swa": dict(_FULL_SWA, logits_scaling=4.0),
    "granitemoehybrid": dict(
        _LINEAR,
        logits_scaling=4.0,
        shared_intermediate_size=32,
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=8,
        mamba_chunk_size=4,
    ),
    "granitemoeshared": dict(logits_scaling=4.0, shared_intermediate_size=32),
    "helium": {},
    "hrm_text": {},
    "hunyuan_v1_dense": {},
    "hunyuan_v1_moe": dict(moe_topk=2),
    "hy_v3": dict(_DENSE_SPARSE, num_shared_experts=1),
    "hy_v4": dict(
        _MLA,
        **_DENSE_SPARSE,
        **_INDEXER,
        n_shared_experts=1,
        indexer_types=["full", "shared"],
        hc_mult=2,
    ),
    "hyperclovax": dict(logits_scaling=4.0),
    "inkling2_loop_text": dict(
        _INKLING2,
        layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding"],
        num_hidden_layers=3,
        loop_layer_index_start=1,
        loop_layer_index_end=2,
        loop_num_passes=2,
        loop_gate_rank=4,
    ),
    "inkling2_text": dict(_INKLING2, layer_types=["hybrid_sliding", "hybrid"]),
    "inkling_text": dict(
        swa_num_attention_heads=4,
        swa_num_key_value_heads=2,
        swa_head_dim=8,
        sliding_window_size=WINDOW,
        d_rel=4,
        rel_extent=16,
        layer_types=["hybrid_sliding", "hybrid"],
        mlp_layer_types=["dense", "sparse"],
        n_shared_experts=1,
    ),
    "jais2": {},
    "jamba": dict(
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=2,
        expert_layer_offset=1,
        use_mamba_kernels=False,
        mamba_d_state=8,
        mamba_dt_rank=4,
    ),
    "jetmoe": dict(kv_channels=8),
    "kimi_linear": dict(
        _MLA,
        **_LINEAR,
        **_DENSE_SPARSE,
        q_lora_rank=None,
        num_experts_per_token=2,
        num_shared_experts=1,
        linear_head_dim=8,
        linear_num_heads=4,
    ),
    "kolibri1": _SWA,
    "kolibri1_1": dict(
        head_dim=16,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "indexed_attention"],
        index_layers=[1],
        kv_source_layers=[0, 1],
        index_topk=WINDOW,
        index_pool_size=16,
        index_compression=2,
        index_num_heads=2,
        index_num_local_tokens=2,
        index_num_sink_tokens=1,
        mlp_only_layers=[0],
        mlp_only_intermediate_size=64,
    ),
    "laguna": dict(_FULL_SWA, **_DENSE_SPARSE, num_attention_heads_per_layer=[4, 4]),
    "lara_mini": dict(
        _GATED_DELTA,
        layer_types=["linear_attention", "sliding_attention", "full_attention"],
        num_hidden_layers=3,
        sliding_window=WINDOW,
    ),
    "lfm2": dict(layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "lfm3": dict(
        layer_types=["conv", "full_attention", "sliding_attention"],
        num_hidden_layers=3,
        sliding_window=WINDOW,
    ),
    "llama": {},
    "llama4_text": dict(
        layer_types=["chunked_attention", "full_attention"],
        attention_chunk_size=WINDOW,
        no_rope_layers=[1, 0],
        intermediate_size_mlp=64,
        floor_scale=WINDOW,
    ),
    "longcat_flash": dict(
        _MLA,
        num_layers=2,
        ffn_hidden_size=64,
        expert_ffn_hidden_size=32,
        moe_topk=2,
        zero_expert_num=2,
    ),
    "mamba": dict(state_size=8, time_step_rank=4),
    "mamba2": dict(
        num_heads=4, head_dim=16, state_size=8, n_groups=1, time_step_rank=4, chunk_size=4
    ),
    "mellum": _SWA,
    "mimo_v2_flash": dict(_SWA, **_DENSE_SPARSE, v_head_dim=8),
    "minicpm3": _MLA,
    "minicpm5_moe": dict(_DENSE_SPARSE, n_shared_experts=1),
    "minimax": dict(_LINEAR, block_size=WINDOW),
    "minimax_m2": {},
    "minimax_m3_vl_text": dict(
        _DENSE_SPARSE,
        dense_intermediate_size=64,
        shared_intermediate_size=32,
        rotary_dim=4,
        index_n_heads=2,
        index_head_dim=8,
        index_block_size=2,
        index_topk_blocks=2,
        index_local_blocks=1,
    ),
    "ministral": dict(sliding_window=WINDOW),
    "ministral3": {},
    "mistral": dict(sliding_window=WINDOW),
    "mixtral": {},
    "modernbert-decoder": dict(
        layer_types=["full_attention", "sliding_attention"], local_attention=2 * WINDOW
    ),
    "mpt": dict(d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=MAX_POSITIONS),
    "nanochat": {},
    "nemotron": {},
    "nemotron_h": dict(
        layer_types=["linear_attention", "moe", "full_attention", "mlp"],
        num_hidden_layers=4,
        mamba_num_heads=4,
        mamba_head_dim=16,
        ssm_state_size=8,
        n_groups=1,
        chunk_size=4,
        moe_shared_expert_intermediate_size=32,
    ),
    "olmo": {},
    "olmo2": {},
    "olmo3": _SWA,
    "olmo_hybrid": dict(
        _LINEAR,
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=16,
    ),
    "olmoe": {},
    "openai-gpt": {},
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32),
    "persimmon": {},
    "phi": {},
    "phi3": {},
    "phimoe": {},
    "qwen2": {},
    "qwen2_moe": {},
    "qwen3": {},
    "qwen3_5_moe_text": _GATED_DELTA,
    "qwen3_5_text": _GATED_DELTA,
    "qwen3_moe": {},
    "qwen3_next": _GATED_DELTA,
    "qwen4_exp_text": dict(
        _GATED_DELTA,
        layer_types=["linear_attention", "indexed_attention"],
        hc_count=2,
        hc_lowrank=4,
        indexer_n_heads=2,
        indexer_kv_heads=1,
        indexer_head_dim=8,
        indexer_budget=WINDOW,
        indexer_compress_ratio=2,
    ),
    "recurrent_gemma": dict(
        block_types=["recurrent", "attention"], lru_width=32, attention_window_size=WINDOW
    ),
    "rwkv": dict(attention_hidden_size=32, context_length=MAX_POSITIONS),
    "seed_oss": {},
    "smollm3": dict(no_rope_layers=[1, 0]),
    "solar_open": dict(n_shared_experts=1),
    "stablelm": {},
    "starcoder2": {},
    "vaultgemma": _SWA,
    "xglm": dict(ffn_dim=64),
    # The config rounds the key and value widths up to multiples of 64, the layers do not.
    "xlstm": dict(num_heads=4, qk_dim_factor=2.0, v_dim_factor=2.0),
    "youtu": _MLA,
    # Attention layers share one transformer block, which needs two of them to tie.
    "zamba": dict(
        layers_block_type=["linear_attention", "hybrid", "hybrid"],
        num_hidden_layers=3,
        attention_head_dim=16,
        n_mamba_heads=2,
        mamba_d_state=8,
        mamba_dt_rank=4,
        use_mamba_kernels=False,
    ),
    "zamba2": dict(
        layers_block_type=["linear_attention", "hybrid"],
        n_mamba_heads=4,
        mamba_d_state=8,
        chunk_size=4,
        use_mamba_kernels=False,
        adapter_rank=4,
    ),
    "zaya": dict(num_experts_per_tok=1, router_hidden_size=16),
}

ARCHITECTURES: tuple[str, ...] = tuple(sorted(_CONFIGS))

# Float64 builds of these fail, or run partly in float32 and return float32 logits.
FLOAT32_ONLY = frozenset(
    {
        "beam",  # soft-capped logits in float32
        "blt",
        "dory",
        "ergo",
        "falcon_mamba",
        "inkling2_loop_text",  # fails: float32 tensor in the output head
        "inkling2_text",  # fails: float32 tensor in the output head
        "mamba",
        "mamba2",
        "nemotron_h",
        "xglm",  # fails: finfo(float64).min into a float32 tensor
        "xlstm",
    }
)
# No ``attn_implementation="sdpa"``: ``build`` raises ValueError (transformers refuses it).
NO_SDPA = frozenset(
    {
        "bloom",
        "deepseek_v4",
        "falcon_mamba",
        "flint",
        "gemma2",
        "gpt_neo",
        "gpt_neox_japanese",
        "gpt_oss",
        "granite_swa",
        "granitemoe_swa",
        "hy_v4",
        "inkling2_loop_text",
        "inkling2_text",
        "mamba",
        "mamba2",
        "mimo_v2_flash",
        "mpt",
        "openai-gpt",
        "rwkv",
        "vaultgemma",
        "xglm",
        "xlstm",
    }
)
# Mixture-of-experts models whose output carries ``aux_loss`` (load balancing on router logits).
MOE = frozenset(
    {
        "dbrx",
        "deepseek_v4",
        "ernie4_5_moe",
        "flex_olmo",
        "flint",
        "gpt_oss",
        "granitemoe",
        "granitemoe_swa",
        "granitemoehybrid",
        "granitemoeshared",
        "jamba",
        "jetmoe",
        "laguna",
        "lara_mini",
        "mellum",
        "minimax",
        "minimax_m2",
        "minimax_m3_vl_text",
        "mixtral",
        "olmoe",
        "phimoe",
        "qwen2_moe",
        "qwen3_5_moe_text",
        "qwen3_moe",
        "qwen3_next",
        "qwen4_exp_text",
    }
)
# Mixture-of-experts models without ``aux_loss`` (bias-balanced or unbalanced routing).
MOE_NO_AUX = frozenset(
    {
        "afmoe",
        "aria_text",
        "axk1",
        "axk2",
        "bailing_hybrid",
        "beam",
        "cohere2_moe",
        "deepseek_v2",
        "deepseek_v3",
        "deepseek_v32",
        "dots1",
        "dots3_note_text",
        "ergo",
        "exaone_moe",
        "glm4_moe",
        "glm4_moe_lite",
        "glm_moe_dsa",
        "hunyuan_v1_moe",
        "hy_v3",
        "hy_v4",
        "inkling2_loop_text",
        "inkling2_text",
        "inkling_text",
        "kimi_linear",
        "kolibri1",
        "kolibri1_1",
        "lfm2_moe",
        "llama4_text",
        "longcat_flash",
        "mimo_v2_flash",
        "minicpm5_moe",
        "nemotron_h",
        "solar_open",
        "zaya",
    }
)
# These keep tensors from the last forward on their modules (recurrent state): after a forward
# with autograd on, ``copy.deepcopy`` of the model fails.
STATEFUL = frozenset({"recurrent_gemma"})
# Largest |difference| of log-probs on real tokens between two sequences run one at a time and
# right-padded in one batch with a 2-D ``attention_mask``, where it exceeds 1e-6 in float64 (1e-4
# in float32 for FLOAT32_ONLY), eager or sdpa.
PADDED_MISMATCH: dict[str, float] = {"hy_v4": 2e-3}

_ENCODER = "bidirectional encoder (BERT family); causal only as the decoder of an encoder-decoder"
_SEQ2SEQ = "decoder half of an encoder-decoder model"
_MULTIMODAL = "multimodal (vision/audio) model"

# Every other model_type of MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, with why it is left out.
UNBUILDABLE: dict[str, str] = {
    "bart": _SEQ2SEQ,
    "bert": _ENCODER,
    "bert-generation": _ENCODER,
    "big_bird": _ENCODER,
    "bigbird_pegasus": _SEQ2SEQ,
    "blenderbot": _SEQ2SEQ,
    "blenderbot-small": _SEQ2SEQ,
    "camembert": _ENCODER,
    "cpmant": "bidirectional (attends to every position) and ignores attention_mask",
    "data2vec-text": _ENCODER,
    "dots3_note": _MULTIMODAL + "; its text model is dots3_note_text",
    "electra": _ENCODER,
    "emu3": _MULTIMODAL + " (image tokens from a VQ model)",
    "ernie": _ENCODER,
    "exaone": "alias: ExaoneConfig builds LlamaForCausalLM (see llama)",
    "fuyu": _MULTIMODAL + " (image patches)",
    "gemma3": _MULTIMODAL + "; its text model is gemma3_text",
    "gemma3n": _MULTIMODAL + " (needs timm); its text model is gemma3n_text",
    "gemma4": _MULTIMODAL + "; its text model is gemma4_text",
    "gemma4_assistant": "speculative-decoding drafter: reads a target model's keys and values",
    "gemma4_unified": _MULTIMODAL + "; its text model is gemma4_unified_text",
    "gemma4_unified_assistant": "speculative-decoding drafter: reads a target model's keys and values",
    "git": _MULTIMODAL + " (image-to-text)",
    "got_ocr2": _MULTIMODAL + " (OCR)",
    "gpt-sw3": "alias: GPT2Config and GPT2LMHeadModel (see gpt2)",
    "internlm3": "alias: InternLM3Config builds LlamaForCausalLM (see llama)",
    "iquestcoder": "alias: IQuestCoderConfig builds LlamaForCausalLM (see llama)",
    "llama4": _MULTIMODAL + "; its text model is llama4_text",
    "marian": _SEQ2SEQ,
    "mbart": _SEQ2SEQ,
    "megatron-bert": _ENCODER,
    "mllama": _MULTIMODAL + " (text decoder with image cross-attention layers)",
    "moshi": _MULTIMODAL + " (speech-text)",
    "moss_transcribe_diarize": _MULTIMODAL + " (speech transcription)",
    "musicgen": _MULTIMODAL + " (text-to-music over audio codebooks)",
    "musicgen_melody": _MULTIMODAL + " (text-to-music over audio codebooks)",
    "mvp": _SEQ2SEQ,
    "param2moe": "alias: Param2MoeConfig builds Glm4MoeForCausalLM (see glm4_moe)",
    "pegasus": _SEQ2SEQ,
    "phi4_multimodal": _MULTIMODAL,
    "plbart": _SEQ2SEQ,
    "prophetnet": _SEQ2SEQ + " (n-gram stream decoder)",
    "qwen3_5": _MULTIMODAL + "; its text model is qwen3_5_text",
    "qwen3_5_moe": _MULTIMODAL + "; its text model is qwen3_5_moe_text",
    "qwen4_exp": _MULTIMODAL + "; its text model is qwen4_exp_text",
    "reformer": (
        "LSH attention lets later tokens change earlier outputs; training needs sequence length "
        "== prod(axial_pos_shape)"
    ),
    "rembert": _ENCODER,
    "roberta": _ENCODER,
    "roberta-prelayernorm": _ENCODER,
    "roc_bert": _ENCODER,
    "roformer": _ENCODER,
    "sarvam_mla": "alias: SarvamMLAConfig builds DeepseekV3ForCausalLM (see deepseek_v3)",
    "sarvam_moe": "alias: SarvamMoEConfig builds Glm4MoeForCausalLM (see glm4_moe)",
    "trocr": _SEQ2SEQ + " (OCR, vision encoder)",
    "whisper": _SEQ2SEQ + " (speech recognition)",
    "xlm": "bidirectional cross-lingual encoder (causal only with causal=True), language embeddings",
    "xlm-roberta": _ENCODER,
    "xlm-roberta-xl": _ENCODER,
    "xlnet": "permutation language model: bidirectional without a perm_mask, no position limit",
    "xmod": _ENCODER + "; needs a language adapter set",
}


def config(name: str, attn_implementation: str = "eager") -> PreTrainedConfig:
    """The tiny config of ``name``: ``_COMMON`` where the field exists, noise off, ``_CONFIGS``."""
    default = CONFIG_MAPPING[name]()
    fields = default.to_dict()
    aliases = type(default).attribute_map
    kwargs = {k: v for k, v in _COMMON.items() if k in fields or aliases.get(k) in fields}
    kwargs.update(
        {k: 0.0 for k, v in fields.items() if isinstance(v, float) and any(n in k for n in _NOISE)}
    )
    kwargs.update(_CONFIGS[name])
    return AutoConfig.for_model(name, attn_implementation=attn_implementation, **kwargs)


def build(
    name: str, dtype: torch.dtype = torch.float64, attn_implementation: str = "eager"
) -> torch.nn.Module:
    """A fresh tiny ``name`` model in training mode, ``attn_implementation`` "eager" or "sdpa".

    Initialized under ``torch.manual_seed(0)`` in float32 and then cast to ``dtype``, so every
    dtype starts from the same weights. Experts run eagerly (grouped-mm kernels take no float64).
    """
    cfg = config(name, attn_implementation)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        cfg,
        dtype=torch.float32,
        attn_implementation=attn_implementation,
        experts_implementation="eager",
    )
    return model.to(dtype)


@functools.cache
def cached(
    name: str, dtype: torch.dtype = torch.float64, attn_implementation: str = "eager"
) -> torch.nn.Module:
    """``build(name, dtype, attn_implementation)`` once per session; deepcopy it before any use
    that modifies it (training, ``.eval()``, ``.to()``)."""
    return build(name, dtype, attn_implementation)
