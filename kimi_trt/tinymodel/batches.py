"""The prepared corpus on the training side: batches that share a prompt prefix, loss masks
and copy weights, and the curriculum that hides the shared prefix early in training.

Needs only numpy and torch (the train step runs on a bare GPU host from a checkout).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class Corpus:
    """Token ids of all conversations (uint16, concatenated) with their loss masks.

    Most conversations open with the same tool declaration (~190 of ~270 tokens) and carry
    no loss there, so the corpus finds the prefixes that groups of conversations share;
    a batch is drawn from one group and its prefix is run once, not once per row."""

    def __init__(self, path: Path):
        z = np.load(path)
        self.tokens = z["tokens"]  # uint16; widened per batch
        self.offsets = z["offsets"]
        self.mask = np.unpackbits(z["mask_bits"])[: len(self.tokens)].astype(bool)
        self.lengths = np.diff(self.offsets)
        # (argument-begin id, call-end id): the span of a tool call's JSON arguments
        self.argument_span = tuple(int(i) for i in z["argument_span"])
        self.group, self.prefixes = self._shared_prefixes()

    def __len__(self) -> int:
        return len(self.lengths)

    def _shared_prefixes(self, key_len: int = 4) -> tuple[np.ndarray, list[np.ndarray]]:
        """(group id per conversation, each group's longest common prefix). Groups are keyed
        by their first tokens; a prefix never covers a loss-carrying target (it is prompt
        only) and leaves every member at least two tokens of its own."""
        starts = self.offsets[:-1]
        keys = np.stack([self.tokens[starts + i] for i in range(key_len)], axis=1)
        _, group = np.unique(keys, axis=0, return_inverse=True)
        group = group.reshape(-1)
        prefixes = []
        for g in range(int(group.max()) + 1):
            in_group = group == g
            members = starts[in_group]
            limit = int(self.lengths[in_group].min()) - 2
            n = 0
            while (
                n < limit
                and (self.tokens[members + n] == self.tokens[members[0] + n]).all()
                and not self.mask[members + n + 1].any()
            ):
                n += 1
            prefixes.append(self.tokens[members[0] : members[0] + n].astype(np.int64))
        return group, prefixes

    def epoch_batches(self, rng: np.random.Generator, batch_tokens: int) -> list[np.ndarray]:
        """Shuffled batches of one prefix group and similar length (little padding), each
        <= batch_tokens padded tokens after the shared prefix."""
        order = rng.permutation(len(self))
        suffix = self.lengths - np.array([len(p) for p in self.prefixes])[self.group]
        batches = []
        window = 256 * max(1, batch_tokens // int(suffix.mean()))
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            chunk = chunk[np.lexsort((suffix[chunk], self.group[chunk]))]
            i = 0
            while i < len(chunk):
                j = i + 1
                while (
                    j < len(chunk)
                    and self.group[chunk[j]] == self.group[chunk[i]]
                    and (j - i + 1) * suffix[chunk[j]] <= batch_tokens
                ):
                    j += 1
                batches.append(chunk[i:j])
                i = j
        rng.shuffle(batches)
        return batches

    def collate(self, idx: np.ndarray, copy_weight: float = 1.0) -> tuple[torch.Tensor, ...]:
        """(shared prefix [P], inputs [B,T] after it, labels [B,T] with -100 off the
        assistant turns, real lengths [B], loss weights [B,T]) for one group's rows.

        Targets that copy a token from earlier in the same dialogue (a name, a number: a
        token of the user turn or tool result that the shared prefix does not contain), and
        every target inside a tool call's arguments up to its end marker (values that are
        mapped, not copied: "pesos" -> MXN; where a name stops), weigh `copy_weight`; every
        other target weighs 1. These are the skills that are slow to appear; ~1 target in 2
        (the arguments' JSON keys and quotes included), ~1 in 8 without the in-call rule."""
        prefix = self.prefixes[int(self.group[idx[0]])]
        p = len(prefix)
        lengths = self.lengths[idx] - p
        width = int(lengths.max()) - 1
        inputs = np.zeros((len(idx), width), dtype=np.int64)
        labels = np.full((len(idx), width), -100, dtype=np.int64)
        weights = np.ones((len(idx), width), dtype=np.float32)
        in_prefix = np.zeros(2**16, dtype=bool)
        in_prefix[prefix] = True
        begin, end = self.argument_span
        for row, i in enumerate(idx):
            a, b = self.offsets[i] + p, self.offsets[i + 1]
            n = b - a - 1
            seq, target = self.tokens[a:b].astype(np.int64), self.mask[a + 1 : b]
            inputs[row, :n] = seq[:-1]
            labels[row, :n] = np.where(target, seq[1:], -100)
            if copy_weight != 1.0:  # where each token first appears outside assistant turns
                first_seen = np.full(int(seq.max()) + 1, len(seq), dtype=np.int64)
                shown = np.nonzero(~self.mask[a:b])[0]
                np.minimum.at(first_seen, seq[shown], shown)
                copies = target & (first_seen[seq[1:]] < np.arange(1, n + 1))
                in_call = (np.cumsum(seq == begin) - np.cumsum(seq == end))[:-1] > 0
                heavy = (copies & ~in_prefix[seq[1:]]) | (target & in_call)
                weights[row, :n] = np.where(heavy, copy_weight, 1.0)
        return (
            torch.from_numpy(prefix),
            torch.from_numpy(inputs),
            torch.from_numpy(labels),
            torch.from_numpy(lengths - 1),
            torch.from_numpy(weights),
        )


class PrefixCurriculum:
    """Copying curriculum: early batches hide the shared tool-declaration prefix.

    Copying an argument means one attention head finding two or three name tokens among
    every key before it. With the ~190-token declaration in front, attention starts out
    spread over ~250 keys and the gradient that would sharpen it is ~4x weaker than over
    the ~60 tokens of the dialogue itself, so copying is slow to appear (0% after 58 min of
    CPU training with the prefix always present). Batches hide the prefix (positions kept)
    with a probability that falls linearly from 1 to 0 over the first `fraction` of the
    budget; afterwards every batch sees exactly what inference sees."""

    def __init__(self, fraction: float, t0: float, t_end: float, seed: int):
        self.t0, self.span = t0, max(1e-6, fraction * (t_end - t0))
        self.rng = np.random.default_rng(seed + 1)

    def hide(self, now: float) -> bool:
        return bool(self.rng.random() < 1.0 - (now - self.t0) / self.span)
