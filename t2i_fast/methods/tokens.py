"""New tokens: add them to the tokenizer and train only their embedding rows.

Rather than training the whole embedding matrix and restoring the untouched rows after every step (and
undoing weight decay on them), the new rows live in their own parameter and are substituted in the
forward pass; the original matrix is frozen and stays bit-identical.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import check_token
from ..errors import UserError


def token_names(token: str, num_vectors: int) -> list[str]:
    """diffusers' convention for multi-vector tokens: token, token_1, token_2, ..."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def expand_token(prompt: str, token: str, num_vectors: int) -> str:
    """Write a multi-vector token as its vector tokens, as diffusers' maybe_convert_prompt does."""
    return prompt.replace(token, " ".join(token_names(token, num_vectors))) if num_vectors > 1 else prompt


class WrappedEmbedding(nn.Module):
    """A module in the place of a frozen nn.Embedding `base`, which transformers code still reads as an embedding
    (weight, num_embeddings, embedding_dim)."""

    def __init__(self, base: nn.Embedding):
        super().__init__()
        self.base = base.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim


class AddedTokenEmbedding(WrappedEmbedding):
    """An nn.Embedding whose rows from `first_id` on come from the trainable `new` parameter (n, dim)."""

    def __init__(self, base: nn.Embedding, first_id: int, init: torch.Tensor):
        super().__init__(base)
        self.first_id = first_id
        self.new = nn.Parameter(init.detach().clone().float())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        emb = self.base(input_ids)
        is_new = input_ids >= self.first_id
        rows = self.new.to(emb.dtype)[(input_ids - self.first_id).clamp(0, len(self.new) - 1)]
        return torch.where(is_new[..., None], rows, emb)

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the trained rows into the base matrix (for sampling with the patched encoder removed)."""
        self.base.weight[self.first_id:self.first_id + len(self.new)] = self.new.to(self.base.weight.dtype)


@torch.no_grad()
def word_embedding(tokenizer, embedding: nn.Module, word: str, unknown: str) -> torch.Tensor:
    """(D,) the mean input embedding of `word`'s tokens, fp32 (a multi-piece word is averaged, so byte-level
    tokenizers work too); UserError(unknown) where the word tokenizes to nothing."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise UserError(unknown)
    return embedding.weight[ids].float().mean(0)


def add_tokens(tokenizer, text_encoder, token: str, num_vectors: int, initializer: str | None,
               flag: str = "--token") -> AddedTokenEmbedding:
    """Add `token` (num_vectors rows) to the tokenizer and patch the text encoder's input embedding.

    Rows start from the mean embedding of the initializer word's tokens (a multi-piece word is averaged,
    so byte-level tokenizers work too), or from a random existing row when no initializer is given.
    """
    return add_token_set(tokenizer, text_encoder, [(token, num_vectors, initializer)], flag)


def add_token_set(tokenizer, text_encoder, specs: list[tuple[str, int, str | None]],
                  flag: str = "--token") -> AddedTokenEmbedding:
    """Add several distinct tokens, each (token, num_vectors, initializer), in one AddedTokenEmbedding.

    Their rows are consecutive ids in `specs` order, all in the one trainable `new` parameter, so every
    token trains (no id comparison that could miss one); `patched.token_rows[token]` is its row slice.
    """
    vocab = tokenizer.get_vocab()
    names_of = [token_names(token, n) for token, n, _ in specs]
    all_names = [n for names in names_of for n in names]
    for token, _, _ in specs:
        check_token(token, flag)
    clash = [n for n in all_names if n in vocab or n + "</w>" in vocab]
    if clash:
        raise UserError(f"{flag} {clash[0]!r} is already in the tokenizer's vocabulary; choose a new string, "
                        f"e.g. '<{clash[0].strip('<>')}-new>'")
    if len(set(all_names)) != len(all_names):
        raise UserError(f"{flag}: tokens must differ, got {[t for t, _, _ in specs]}")
    embedding = text_encoder.get_input_embeddings()
    if isinstance(embedding, AddedTokenEmbedding):
        raise UserError("the text encoder already has trainable tokens; add all tokens in one call")
    inits = []
    with torch.no_grad():
        for k, (token, num_vectors, initializer) in enumerate(specs):
            if initializer:
                vector = word_embedding(tokenizer, embedding, initializer, f"initializer word {initializer!r} "
                                        f"tokenizes to nothing; pass --initializer WORD")
                inits.append(vector[None].repeat(num_vectors, 1))
            else:
                gen = torch.Generator().manual_seed(k)
                inits.append(embedding.weight[torch.randint(len(vocab) - 2, (num_vectors,), generator=gen)].float())
    added = tokenizer.add_tokens(all_names)
    ids = tokenizer.convert_tokens_to_ids(all_names)
    if added != len(all_names) or ids != list(range(ids[0], ids[0] + len(ids))):
        raise UserError(f"{flag} {specs[0][0]!r} could not be added to the tokenizer (it may split into existing "
                        f"special tokens); choose another string")
    first_id = ids[0]
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    base = text_encoder.get_input_embeddings().requires_grad_(False)
    patched = AddedTokenEmbedding(base, first_id, torch.cat(inits))
    start, rows = 0, {}
    for (token, _, _), names in zip(specs, names_of):
        rows[token] = slice(start, start + len(names))
        start += len(names)
    patched.token_rows = rows
    text_encoder.set_input_embeddings(patched)
    return patched


def remove_patch(text_encoder) -> None:
    """Write the trained rows back and restore the plain nn.Embedding."""
    emb = text_encoder.get_input_embeddings()
    if isinstance(emb, AddedTokenEmbedding):
        emb.write_back()
        text_encoder.set_input_embeddings(emb.base)
