"""Learnable class-agnostic prompts, Eq. (2)-(3), and their text features g_n, g_a."""

from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from .joint_space import project_to_joint_space


class CNCPromptLearner(nn.Module):
    r"""One learnable prompt pair per tapped layer i (Eq. 2-3):

        p_n^i = [V_1^n] ... [V_M^n] [object]
        p_a^i = [V_1^a] ... [V_M^a] [damaged] [object]

    The M context vectors live in the text encoder's token-embedding space; the class words are
    fixed token ids from the config, so no tokenizer is needed at run time.
    """

    def __init__(self, num_layers: int, prompt_length: int, width: int, normal_token_ids, abnormal_token_ids,
                 bos_token_id: int, eos_token_id: int):
        super().__init__()
        self.prompt_length = prompt_length
        self.word_ids = (list(normal_token_ids), list(abnormal_token_ids))
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        # [layer i, (normal, abnormal), M, width]; initialised in CNCPreTrainedModel._init_weights.
        self.context = nn.Parameter(torch.empty(num_layers, 2, prompt_length, width))

    def token_ids(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Template ids (2, S) with placeholders where the context goes, and the EOT positions (2,).

        Built from plain ints on every call (two short rows): a buffer made in __init__ would
        not survive transformers' meta-device loading.
        """
        rows = [[self.bos_token_id] + [self.eos_token_id] * self.prompt_length + words + [self.eos_token_id]
                for words in self.word_ids]
        length = max(len(r) for r in rows)
        eot = [len(r) - 1 for r in rows]
        # Padding after EOT is never seen by EOT under the causal mask.
        rows = [r + [self.eos_token_id] * (length - len(r)) for r in rows]
        return torch.tensor(rows, device=device), torch.tensor(eot, device=device)

    def forward(self, text_model: nn.Module, text_projection: nn.Module) -> torch.Tensor:
        """Text features G(p) of every prompt: (num_layers, 2, projection_dim), L2-normalised, float32.

        Index [i, 0] is g_n^i and [i, 1] is g_a^i. Gradients reach `context` through the frozen
        text encoder.
        """
        num_layers, _, m, width = self.context.shape
        ids, eot = self.token_ids(self.context.device)
        words = text_model.embeddings.token_embedding(ids).to(self.context.dtype)  # (2, S, width)
        words = words.unsqueeze(0).expand(num_layers, -1, -1, -1)
        embeds = torch.cat([words[:, :, :1], self.context, words[:, :, 1 + m:]], dim=2)
        embeds = embeds.reshape(num_layers * 2, -1, width)
        hidden = text_model.embeddings(inputs_embeds=embeds)
        mask = create_causal_mask(config=text_model.config, inputs_embeds=hidden, attention_mask=None, cache=None)
        hidden = text_model.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        hidden = text_model.final_layer_norm(hidden)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), eot.repeat(num_layers)]
        return project_to_joint_space(pooled, text_projection).reshape(num_layers, 2, -1)
