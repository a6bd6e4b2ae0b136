"""Continuous batching: many requests decoded together, each joining and leaving one running batch between
steps (iteration-level scheduling, Yu et al. 2022, "Orca"), over one KV cache.

Every request (a `BatchJob`: its prompts, its own GenerationSettings, a callback for its text) owns a few
consecutive rows of the batch. A newly admitted job is prefilled on its own rows (one forward pass over its
left-padded prompts), then its cache rows are merged into the running cache, aligned on the right: every row's
newest token sits in the last column, and the columns to its left that are not its own are masked out. Rotary
or learned positions are counted per row, so a row's logits do not depend on how much padding it carries.
Sampling, stop ids, stop strings and max_new_tokens are per job; with a seed, a job draws from its own
generator. A job leaves the batch as soon as all its rows have ended, freeing its rows for the next one.

No threads here: `tunelab.serve` drives `add` and `step` from its scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from tunelab.generate.decode import Completion, GenerationSettings, TextStreams, max_positions, stop_ids_of
from tunelab.generate.sampling import next_tokens
from tunelab.models.base import Model
from tunelab.nn.kv_cache import KVCache


@dataclass(eq=False)
class BatchJob:
    """One request's rows: its prompts and settings; `emit` gets each step's new text of its rows.
    The batch fills in `completions` when the job ends."""

    prompts: list[list[int]]
    settings: GenerationSettings
    emit: Callable[[list[str]], None] = lambda pieces: None
    completions: list[Completion] | None = None
    # set by ContinuousBatch.add
    steps: int = 0  # tokens to generate (max_new_tokens, cut by a model's learned-position limit)
    done_steps: int = 0
    streams: TextStreams | None = field(default=None, repr=False)
    generator: torch.Generator | None = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return len(self.prompts)


class ContinuousBatch:
    """The running batch of a decoder: `add(jobs)` prefills and admits them, `step()` decodes one token of
    every row; both return the jobs that have ended (already removed). `remove(jobs)` drops jobs (a client
    went away)."""

    def __init__(self, model: Model, tokenizer, *, headroom: int = 64) -> None:
        if not model.is_decoder or "lm" not in model.heads or model.is_recurrent:
            raise TypeError(f"continuous batching needs a Transformer decoder with an LM head, not {model.family}")
        self.model, self.tokenizer, self.headroom = model, tokenizer, headroom
        self.device = next(model.parameters()).device
        self.limit = max_positions(model)
        self.jobs: list[BatchJob] = []  # in row order
        self.cache: KVCache | None = None  # [B rows, ..., length L]
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # [B, L]: 1 where a column holds the row's own token
        self.next_ids = torch.zeros(0, dtype=torch.long)  # [B]: each row's newest token, not yet in the cache
        self.positions = torch.zeros(0, dtype=torch.long)  # [B]: the position of that token

    @property
    def rows(self) -> int:
        return sum(j.rows for j in self.jobs)

    def __len__(self) -> int:
        return len(self.jobs)

    # ------------------------------------------------------------------------------------------ admission

    @torch.inference_mode()
    def add(self, jobs: list[BatchJob]) -> list[BatchJob]:
        """Prefill `jobs` together, take each one's first token and merge their rows into the batch. Returns
        the jobs that ended at once (max_new_tokens 0 or 1, EOS first). Raises (batch unchanged) on bad input."""
        ended, fresh = [], []
        for job in jobs:
            if any(len(p) == 0 for p in job.prompts):
                raise ValueError("every prompt needs at least one token")
            longest = max(len(p) for p in job.prompts)
            if self.limit is not None and longest > self.limit:
                raise ValueError(f"the prompt has {longest} tokens; this model takes at most {self.limit}")
            job.steps = job.settings.max_new_tokens
            if self.limit is not None:
                job.steps = min(job.steps, self.limit - longest)
            stop_ids = stop_ids_of(self.model, self.tokenizer, job.settings)
            job.streams = TextStreams(self.tokenizer, job.rows, job.settings.stop, stop_ids)
            if job.settings.seed is not None:
                job.generator = torch.Generator(device=self.device).manual_seed(job.settings.seed)
            if job.steps == 0:
                self._finish(job)
                ended.append(job)
            else:
                fresh.append(job)
        if not fresh:
            return ended
        prompts = [p for job in fresh for p in job.prompts]
        B, P = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(B, P, dtype=torch.long, device=self.device)
        mask = torch.zeros(B, P, dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):  # left padding: every row's last token in the last column
            ids[row, P - len(prompt):] = torch.tensor(prompt, device=self.device)
            mask[row, P - len(prompt):] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # [B, P]
        cache = self.model.new_cache(B, P)
        hidden = self.model(ids, mask, position_ids=positions, cache=cache, heads=()).hidden  # [B, P, D]
        logits = self.model.heads["lm"](hidden[:, -1])  # [B, V]
        first = self._sample(fresh, logits)
        self._merge(fresh, cache, mask, first, mask.sum(dim=1))
        return ended + self._advance(fresh, first)

    def _merge(self, jobs: list[BatchJob], cache: KVCache, mask: torch.Tensor, next_ids: torch.Tensor,
               positions: torch.Tensor) -> None:
        """Append the rows of a prefilled cache to the batch, both right-aligned on the newer length."""
        B, k = self.rows, next_ids.shape[0]
        L = self.cache.length if self.cache is not None else 0
        P = cache.length
        new_len = max(L, P)
        merged = self.model.new_cache(B + k, new_len + self.headroom)
        for buffers, old, added in ((merged.keys, self.cache.keys if B else None, cache.keys),
                                    (merged.values, self.cache.values if B else None, cache.values)):
            for layer, buffer in enumerate(buffers):
                if B:
                    buffer[:B, :, new_len - L:new_len] = old[layer][:, :, :L]
                buffer[B:, :, new_len - P:new_len] = added[layer][:, :, :P]
        merged.length = new_len
        full_mask = torch.zeros(B + k, new_len, dtype=torch.long, device=self.device)
        if B:
            full_mask[:B, new_len - L:] = self.mask
        full_mask[B:, new_len - P:] = mask
        self.cache, self.mask = merged, full_mask
        self.next_ids = torch.cat([self.next_ids.to(self.device), next_ids])
        self.positions = torch.cat([self.positions.to(self.device), positions])
        self.jobs = self.jobs + jobs

    # ------------------------------------------------------------------------------------------ decoding

    @torch.inference_mode()
    def step(self) -> list[BatchJob]:
        """Decode one token of every row; returns the jobs that ended (removed from the batch)."""
        if not self.jobs:
            return []
        if self.cache.length + 1 > self.cache.max_len:
            self._compact()
        B = self.rows
        mask = torch.cat([self.mask, torch.ones(B, 1, dtype=self.mask.dtype, device=self.device)], dim=1)
        hidden = self.model(self.next_ids[:, None], mask, position_ids=self.positions[:, None], cache=self.cache,
                            heads=()).hidden  # [B, 1, D]
        self.mask, self.positions = mask, self.positions + 1
        logits = self.model.heads["lm"](hidden[:, -1])  # [B, V]
        self.next_ids = self._sample(self.jobs, logits)
        return self._advance(self.jobs, self.next_ids)

    def _sample(self, jobs: list[BatchJob], logits: torch.Tensor) -> torch.Tensor:
        """Each job's next tokens from its own rows of `logits` [B, V], with its own settings and generator."""
        out, row = [], 0
        for job in jobs:
            s = job.settings
            out.append(next_tokens(logits[row:row + job.rows], temperature=s.temperature, top_k=s.top_k,
                                   top_p=s.top_p, generator=job.generator))
            row += job.rows
        return torch.cat(out)

    def _advance(self, jobs: list[BatchJob], tokens: torch.Tensor) -> list[BatchJob]:
        """Feed `jobs` (in row order) their rows of `tokens`; remove and return the jobs that have ended."""
        values, ended, row = tokens.tolist(), [], 0
        for job in jobs:
            pieces = job.streams.feed(values[row:row + job.rows])
            row += job.rows
            job.done_steps += 1
            if any(pieces):
                job.emit(pieces)
            if job.streams.finished or job.done_steps >= job.steps:
                self._finish(job)
                ended.append(job)
        self.remove(ended)
        return ended

    def _finish(self, job: BatchJob) -> None:
        tail = job.streams.finish()
        if any(tail):
            job.emit(tail)
        job.completions = job.streams.completions(job.prompts)

    # ------------------------------------------------------------------------------------------ housekeeping

    def remove(self, jobs: list[BatchJob]) -> None:
        """Drop the rows of `jobs` (those in the batch) and the cache columns no row uses any more."""
        gone = {id(j) for j in jobs}
        if not any(id(j) in gone for j in self.jobs):
            return
        keep, row = [], 0
        for job in self.jobs:
            if id(job) not in gone:
                keep.extend(range(row, row + job.rows))
            row += job.rows
        self.jobs = [j for j in self.jobs if id(j) not in gone]
        if not keep:
            self.cache = None
            self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
            self.next_ids = torch.zeros(0, dtype=torch.long, device=self.device)
            self.positions = torch.zeros(0, dtype=torch.long, device=self.device)
            return
        index = torch.tensor(keep, device=self.device)
        self.cache.keys = [k.index_select(0, index) for k in self.cache.keys]
        self.cache.values = [v.index_select(0, index) for v in self.cache.values]
        self.mask, self.next_ids, self.positions = self.mask[index], self.next_ids[index], self.positions[index]

    def _compact(self) -> None:
        """A new cache with room for `headroom` more steps, without the leading columns no row uses."""
        L = self.cache.length
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else L
        keep = L - start
        cache = self.model.new_cache(self.rows, keep + self.headroom)
        for new, old in ((cache.keys, self.cache.keys), (cache.values, self.cache.values)):
            for layer, buffer in enumerate(new):
                buffer[:, :, :keep] = old[layer][:, :, start:L]
        cache.length = keep
        self.cache, self.mask = cache, self.mask[:, start:]
