"""The LCKV causal LM: one Llama-shaped model for LCKV, CLA, YOCO and plain Llama layer maps.

Three ways to run it, all through `forward`:
- parallel (default): the T new tokens of every layer at once; each group of layers with a cyclic
  dependency (some read a KV from above) is iterated as the official code does: `forward_passes` (m)
  times without gradients, then `backward_passes` (b) times with them, each iteration using the KVs
  of the previous one (zeros at first). One token (decode) needs one pass: exact.
- sequential: one token at a time through the cache, exact (`use_sequential`, `sequential=True`, and
  prompts of at most m + b tokens when the map reads from above).
- with a `SinkWindowCache` (or a `StreamingCache` from `generate`) as `cache`: new tokens attend to the
  cached tokens and are appended to the cache afterwards (StreamingLLM eviction and positions).
Rows may start with left padding (`attention_mask`): it is neither seen nor cached."""

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
from .generation import OUTPUT_CACHE_FIELD, LCKVGenerationMixin, StreamingCache
from .layer_map import iteration_plan

# Newer transformers name the output's cache `cache` and warn on the old `past_key_values`: pass
# whichever this version declares.


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
        self.qkv_proj: nn.Module | None = None  # set by quantize.quantize_model (inference)

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        batch, steps, _ = x.shape
        return x.view(batch, steps, heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        kv_width = self.num_kv_heads * self.head_dim
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(hidden).split([self.num_heads * self.head_dim, kv_width, kv_width], dim=-1)
        elif self.qkv_weight is not None and not torch.is_grad_enabled():
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
        self.gate_up_proj: nn.Module | None = None  # set by quantize.quantize_model (inference)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        elif self.gate_up_weight is not None and not torch.is_grad_enabled():
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
        padding: list[int] | None = None,
    ) -> torch.Tensor:
        """Hidden states of the new tokens; appends them to `cache` when one is given. `padding`: per
        row, how many of the new tokens are left padding (not seen, not cached)."""
        config = self.config
        steps = input_ids.shape[1]
        hidden = self.embed_tokens(input_ids)
        rope = Rope(self.rotary_emb.inv_freq, self.rotary_emb.attention_scaling)
        context = ForwardContext.build(
            rope, cache, input_ids,
            groups=config.num_attention_heads // config.num_key_value_heads,
            sliding_window=config.sliding_window, dtype=hidden.dtype, padding=padding,
        )
        plan = iteration_plan(
            config.forward_passes if forward_passes is None else forward_passes,
            config.backward_passes if backward_passes is None else backward_passes,
        )
        for start, stop, cyclic in self.groups:
            layers = self.layers[start:stop]
            # One new token has no unknown KV above it (its own is masked): one pass is exact.
            passes = plan if cyclic and steps > 1 else (True,)
            group_input = hidden
            for with_grad in passes:
                with torch.set_grad_enabled(torch.is_grad_enabled() and with_grad):
                    hidden = group_input
                    for layer in layers:
                        hidden = layer(hidden, context)
        context.finish(input_ids, padding)
        return self.norm(hidden)


class LCKVLlamaForCausalLM(LCKVLlamaPreTrainedModel, LCKVGenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LCKVLlamaConfig) -> None:
        super().__init__(config)
        self.model = LCKVLlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def new_cache(
        self, sink: int, window: int, batch_size: int = 1, device: torch.device | str | None = None
    ) -> SinkWindowCache:
        """A sink + window cache shaped for this model, on its device, in `cache_dtype` if the model
        has one (the CPU fast path keeps its cache more compact than its activations), else in its dtype."""
        dtype = self.__dict__.get("cache_dtype") or self.dtype
        return SinkWindowCache.for_model(self.config, sink, window, batch_size, dtype=dtype, device=device or self.device)

    def forward(
        self,
        input_ids: torch.LongTensor,
        cache: SinkWindowCache | StreamingCache | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        sequential: bool | None = None,
        forward_passes: int | None = None,
        backward_passes: int | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits for the new tokens (the last `logits_to_keep` if > 0) and the loss if labels are given.

        cache: a `SinkWindowCache` (or a `StreamingCache` holding one) to attend to and append to;
            None: no cache. `past_key_values=` is taken too (transformers' older name).
        sequential: True encodes token by token, False in parallel; None as the official code does:
            token by token when config.use_sequential, or when the map reads from above and there are
            at most forward_passes + backward_passes new tokens.
        forward_passes, backward_passes: this call's m and b (default: the config's).
        attention_mask: [batch, past + new] or [batch, new]; each row's new tokens may start with
            padding (zeros), which is neither attended to nor cached: each row is encoded as alone.
            Positions come from the cache (StreamingLLM places), so `position_ids` are not read.
        """
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, tokens] with at least one token, got {tuple(input_ids.shape)}")
        streaming = cache if isinstance(cache, StreamingCache) else None
        if streaming is not None:
            cache = streaming.bind(self, input_ids.shape[0])
        elif cache is not None and not isinstance(cache, SinkWindowCache):
            raise TypeError(f"cache must be a SinkWindowCache or a StreamingCache, got {type(cache).__name__}")
        steps = input_ids.shape[1]
        padding = left_padding(attention_mask, steps)
        if sequential is None:
            sequential = self.encodes_sequentially(steps, forward_passes, backward_passes)
        if (sequential or steps == 1) and padding is not None:
            hidden = self._sequential(input_ids, cache, attention_mask[:, -steps:].bool())
        elif sequential and steps > 1:
            hidden = self._sequential(input_ids, cache)
        else:
            hidden = self.model(input_ids, cache, forward_passes, backward_passes, padding)
        if streaming is not None:
            streaming.positions += steps
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        returned = streaming if streaming is not None else cache
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{OUTPUT_CACHE_FIELD: returned})

    def encodes_sequentially(self, steps: int, forward_passes: int | None = None,
                             backward_passes: int | None = None) -> bool:
        """Whether a call of `steps` new tokens encodes them token by token (`sequential=None`): as
        the official code does, when config.use_sequential, or when the map reads from above and
        there are at most forward_passes + backward_passes new tokens."""
        config = self.config
        m = config.forward_passes if forward_passes is None else forward_passes
        b = config.backward_passes if backward_passes is None else backward_passes
        reads_above = any(cyclic for _, _, cyclic in self.model.groups)
        return config.use_sequential or (reads_above and steps <= m + b)

    def _sequential(
        self, input_ids: torch.LongTensor, cache: SinkWindowCache | None, real: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Exact token-by-token encoding; without a cache, a temporary one that holds everything.
        `real` [batch, T]: False where a token is padding (that row skips the step: nothing cached)."""
        batch, steps = input_ids.shape
        if cache is None:
            cache = self.new_cache(sink=0, window=steps, batch_size=batch, device=input_ids.device)
        if real is None:
            return torch.cat([self.model(input_ids[:, i : i + 1], cache) for i in range(steps)], dim=1)
        active = cache.active.clone()
        outputs = []
        try:
            for i in range(steps):
                cache.active.copy_(active & real[:, i])
                outputs.append(self.model(input_ids[:, i : i + 1], cache))
        finally:
            cache.active.copy_(active)
        return torch.cat(outputs, dim=1)


def left_padding(attention_mask: torch.Tensor | None, steps: int) -> list[int] | None:
    """Per row, how many of the `steps` new tokens are left padding (None: no padding at all).

    Reads the mask on the host: padding needs per-row bookkeeping, and the engine's hot path never
    passes a mask. Refuses padding that is not on the left of the new tokens."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[1] < steps:
        raise ValueError(f"attention_mask must be [batch, past + new tokens], got {tuple(attention_mask.shape)}")
    new = attention_mask[:, -steps:].to(torch.long)
    padding = (new == 0).sum(dim=1)
    expected = (torch.arange(steps, device=new.device) >= padding.unsqueeze(1)).long()
    if not torch.equal(new, expected):
        raise ValueError("attention_mask: only left padding is supported (zeros before each row's tokens, ones after)")
    padding = padding.tolist()
    return padding if any(padding) else None


def register_auto_classes() -> None:
    """Make `lckv-llama` checkpoints loadable through AutoConfig / AutoModel(ForCausalLM)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(LCKVLlamaConfig.model_type, LCKVLlamaConfig, exist_ok=True)
    AutoModel.register(LCKVLlamaConfig, LCKVLlamaModel, exist_ok=True)
    AutoModelForCausalLM.register(LCKVLlamaConfig, LCKVLlamaForCausalLM, exist_ok=True)
