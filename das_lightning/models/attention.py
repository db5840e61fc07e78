"""An attention processor that ``torch.func.vmap`` can trace, for per-sample gradients.

diffusers' default ``AttnProcessor2_0`` calls ``F.scaled_dot_product_attention``, which has no vmap batching
rule on CPU: vmap falls back to a slow per-sample loop (with a warning), and older stacks failed outright. The
old workaround deleted the function from ``torch.nn.functional``; here the same maths is written with plain
matmul + softmax, and installed per model, touching nothing global.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention


class MatmulAttnProcessor:
    """Same result as diffusers' ``AttnProcessor2_0`` (and ``AttnProcessor``), with matmul + softmax.

    Supports what those two support: spatial_norm, 4-D (B, C, H, W) inputs, group_norm, cross-attention with
    ``encoder_hidden_states`` (and norm_cross), norm_q / norm_k, additive or boolean ``attention_mask``,
    upcast_attention / upcast_softmax, residual_connection and rescale_output_factor. The scale is
    ``attn.scale`` (1/sqrt(head_dim) unless the module was built with ``scale_qk=False``).
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        # (batch, heads, sequence, head_dim), as scaled_dot_product_attention sees them
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        out_dtype = query.dtype
        if attn.upcast_attention:
            query, key = query.float(), key.float()
        scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:  # boolean masks mark what may be attended, as in SDPA
                scores = scores.masked_fill(~attention_mask, float("-inf"))
            else:
                scores = scores + attention_mask.to(scores.dtype)
        if attn.upcast_softmax:
            scores = scores.float()
        probabilities = scores.softmax(dim=-1).to(value.dtype)
        hidden_states = torch.matmul(probabilities, value)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(out_dtype)
        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout (identity in eval mode)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def use_vmap_friendly_attention(model: torch.nn.Module) -> int:
    """Install :class:`MatmulAttnProcessor` on every diffusers ``Attention`` module of ``model``.

    Walks the modules rather than calling ``model.set_attn_processor`` so that it also reaches attention
    inside wrappers (e.g. a PEFT model) and models without that method. Returns how many modules were set.
    """
    processor = MatmulAttnProcessor()
    attention_modules = [module for module in model.modules() if isinstance(module, Attention)]
    for module in attention_modules:
        module.set_processor(processor)
    return len(attention_modules)
