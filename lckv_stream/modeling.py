"""The LCKV causal LM: one Llama-shaped model for LCKV, CLA, YOCO and plain Llama layer maps.

Three ways to run it, all through `forward`:
- parallel (default): the T new tokens of every layer at once; layers that read a KV from above are
  iterated `forward_passes` times, each iteration using the KVs of the previous one (zeros at first),
  with gradients through the last `backward_passes` only. One token (decode) needs one pass: exact.
- sequential: one token at a time through the cache, exact (`use_sequential` or `sequential=True`).
- with a `SinkWindowCache` as `past_key_values`: new tokens attend to the cached tokens and are
  appended to the cache afterwards (StreamingLLM eviction and positions).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

from .attention import ForwardContext, Rope
from .cache import SinkWindowCache
from .config import LCKVLlamaConfig

# Newer transformers name the output's cache `cache` and warn on the old `past_key_values`: pass
# whichever this version declares.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class LCKVLlamaAttention(nn.Module):
    """Attention that reads the KV of `layer_map.sources[layer]`; k/v projections only on producers."""

    def __init__(self, config: LCKVLlamaConfig, layer_idx: int) -> None:
        super().__init__()
        layer_map = config.layer_map
        self.layer_idx = layer_idx
        self.source = layer_map.sources[layer_idx]
        self.no_diagonal = config.force_nodiag or layer_map.attends_above(layer_idx)
        self.sliding = layer_map.sliding[layer_idx]
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.computes_kv = layer_map.computes_kv(layer_idx)
        if self.computes_kv:
            self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
            self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.qkv_weight: torch.Tensor | None = None  # set by fusion.fuse_projections (inference)

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        batch, steps, _ = x.shape
        return x.view(batch, steps, heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        if self.qkv_weight is not None and not torch.is_grad_enabled():
            kv_width = self.num_kv_heads * self.head_dim
            q, k, v = nn.functional.linear(hidden, self.qkv_weight).split(
                [self.num_heads * self.head_dim, kv_width, kv_width], dim=-1)
        else:
            q = self.q_proj(hidden)
            k, v = (self.k_proj(hidden), self.v_proj(hidden)) if self.computes_kv else (None, None)
        if self.computes_kv:
            context.produce(self.layer_idx, self._heads(k, self.num_kv_heads), self._heads(v, self.num_kv_heads))
        query = self._heads(q, self.num_heads)
        out = context.attend(query, self.source, self.no_diagonal, self.sliding)
        batch, _, steps, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(batch, steps, -1))


class LCKVLlamaMLP(nn.Module):
    """Llama's gated MLP (same weight names), with an optional fused gate/up weight for inference."""

    def __init__(self, config: LCKVLlamaConfig) -> None:
        super().__init__()
        size, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(size, inner, bias=bias)
        self.up_proj = nn.Linear(size, inner, bias=bias)
        self.down_proj = nn.Linear(inner, size, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]
        self.gate_up_weight: torch.Tensor | None = None  # set by fusion.fuse_projections (inference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is not None and not torch.is_grad_enabled():
            gate, up = nn.functional.linear(x, self.gate_up_weight).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act_fn(gate) * up)


class LCKVLlamaDecoderLayer(nn.Module):
    def __init__(self, config: LCKVLlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = LCKVLlamaAttention(config, layer_idx)
        self.mlp = LCKVLlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), context)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LCKVLlamaPreTrainedModel(PreTrainedModel):
    config_class = LCKVLlamaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["LCKVLlamaDecoderLayer"]
    # Checkpoints may carry k/v projections for layers that read another layer's KV: they are unused.
    _keys_to_ignore_on_load_unexpected = [r"self_attn\.[kv]_proj\."]


class LCKVLlamaModel(LCKVLlamaPreTrainedModel):
    def __init__(self, config: LCKVLlamaConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(
            LCKVLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.groups = config.layer_map.iteration_groups()
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor,
        cache: SinkWindowCache | None = None,
        forward_passes: int | None = None,
        backward_passes: int | None = None,
    ) -> torch.Tensor:
        """Hidden states of the new tokens; appends them to `cache` when one is given."""
        config = self.config
        steps = input_ids.shape[1]
        hidden = self.embed_tokens(input_ids)
        rope = Rope(self.rotary_emb.inv_freq, self.rotary_emb.attention_scaling)
        context = ForwardContext.build(
            rope, cache, input_ids,
            groups=config.num_attention_heads // config.num_key_value_heads,
            sliding_window=config.sliding_window, dtype=hidden.dtype,
        )
        passes = forward_passes or config.forward_passes
        grad_passes = config.backward_passes if backward_passes is None else backward_passes
        for start, stop, cyclic in self.groups:
            layers = self.layers[start:stop]
            # One new token has no unknown KV above it (its own is masked): one pass is exact.
            iterations = passes if cyclic and steps > 1 else 1
            last_without_grad = iterations - grad_passes if cyclic else 0
            group_input = hidden
            for iteration in range(iterations):
                with_grad = torch.is_grad_enabled() and iteration >= last_without_grad
                with torch.set_grad_enabled(with_grad):
                    hidden = group_input
                    for layer in layers:
                        hidden = layer(hidden, context)
        context.finish(input_ids)
        return self.norm(hidden)


class LCKVLlamaForCausalLM(LCKVLlamaPreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LCKVLlamaConfig) -> None:
        super().__init__(config)
        self.model = LCKVLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def new_cache(
        self, sink: int, window: int, batch_size: int = 1, device: torch.device | str | None = None
    ) -> SinkWindowCache:
        """A sink + window cache shaped for this model, on its device and in its dtype."""
        return SinkWindowCache.for_model(
            self.config, sink, window, batch_size, dtype=self.dtype, device=device or self.device
        )

    def forward(
        self,
        input_ids: torch.LongTensor,
        past_key_values: SinkWindowCache | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        sequential: bool | None = None,
        forward_passes: int | None = None,
        backward_passes: int | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits for the new tokens (the last `logits_to_keep` if > 0) and the loss if labels are given.

        past_key_values: a `SinkWindowCache` to attend to and append to (None: no cache).
        sequential: encode token by token (default: config.use_sequential).
        """
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padding is not supported: pass sequences of equal length without padding")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, tokens] with at least one token, got {tuple(input_ids.shape)}")
        sequential = self.config.use_sequential if sequential is None else sequential
        if sequential and input_ids.shape[1] > 1:
            hidden = self._sequential(input_ids, past_key_values)
        else:
            hidden = self.model(input_ids, past_key_values, forward_passes, backward_passes)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: past_key_values})

    def _sequential(self, input_ids: torch.LongTensor, cache: SinkWindowCache | None) -> torch.Tensor:
        """Exact token-by-token encoding; without a cache, a temporary one that holds everything."""
        batch, steps = input_ids.shape
        if cache is None:
            cache = self.new_cache(sink=0, window=steps, batch_size=batch, device=input_ids.device)
        outputs = [self.model(input_ids[:, i : i + 1], cache) for i in range(steps)]
        return torch.cat(outputs, dim=1)


def register_auto_classes() -> None:
    """Make `lckv-llama` checkpoints loadable through AutoConfig / AutoModel(ForCausalLM)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(LCKVLlamaConfig.model_type, LCKVLlamaConfig, exist_ok=True)
    AutoModel.register(LCKVLlamaConfig, LCKVLlamaModel, exist_ok=True)
    AutoModelForCausalLM.register(LCKVLlamaConfig, LCKVLlamaForCausalLM, exist_ok=True)
