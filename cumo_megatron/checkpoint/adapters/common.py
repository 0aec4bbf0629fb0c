"""What the state-dict adapters share: conversion rules, streaming in both directions, errors.

An adapter describes a layout as a list of `Rule` s, each tying one of our tensors to one or more
source tensors with a pair of inverse functions. The same list drives both directions, so import
and export cannot drift apart, and the source keys a list does not mention are exactly the ones an
export must pass through for a bit-exact round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch

from cumo_megatron.errors import EXIT_CHECKPOINT, UserError

Shape = tuple[int, ...]


class CheckpointError(UserError, ValueError):
    """A checkpoint does not fit the configuration or the layout it claims."""

    label = "checkpoint error"
    exit_status = EXIT_CHECKPOINT


class MissingKeyError(CheckpointError, KeyError):
    """A tensor the conversion needs is not in the checkpoint."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Rule:
    """One of our tensors and the source tensors it is made of.

    ``ours``/``theirs`` are full key names; ``to_ours(*theirs) -> ours`` and
    ``to_theirs(ours) -> tuple(theirs)`` are inverse and never change dtype; the shapes are what a
    checkpoint matching the configuration holds.
    """

    ours: str
    theirs: tuple[str, ...]
    ours_shape: Shape
    theirs_shapes: tuple[Shape, ...]
    to_ours: Callable[..., torch.Tensor]
    to_theirs: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def identity_rule(ours: str, theirs: str, shape: Shape) -> Rule:
    """A tensor stored the same way on both sides."""
    return Rule(ours, (theirs,), shape, (shape,), lambda t: t, lambda t: (t,))


def reshape_rule(ours: str, theirs: str, ours_shape: Shape, theirs_shape: Shape) -> Rule:
    """A tensor whose elements agree but whose shape differs (e.g. a class token ``[h]`` vs ``[1, 1, h]``)."""
    return Rule(
        ours, (theirs,), ours_shape, (theirs_shape,),
        lambda t: t.reshape(ours_shape), lambda t: (t.reshape(theirs_shape),),
    )


def fuse_qkv_per_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Separate q, k, v (``[heads*d, ...]`` each) -> megatron's fused QKV for multi-head attention.

    megatron groups rows per query group; with as many groups as heads that is, per head h,
    ``[q_h (d rows); k_h (d); v_h (d)]``. Works for weights ``[h*d, in]`` and biases ``[h*d]``.
    """
    parts = [x.reshape(num_heads, x.shape[0] // num_heads, *x.shape[1:]) for x in (q, k, v)]
    return torch.stack(parts, dim=1).reshape(-1, *q.shape[1:])


def split_qkv_per_head(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv_per_head`: megatron's fused QKV -> contiguous ``(q, k, v)``."""
    grouped = qkv.reshape(num_heads, 3, qkv.shape[0] // (3 * num_heads), *qkv.shape[1:])
    return tuple(grouped[:, i].reshape(-1, *qkv.shape[1:]).contiguous() for i in range(3))


def fetch(src: Mapping[str, torch.Tensor], key: str, shape: Shape, where: str) -> torch.Tensor:
    """``src[key]``, checked against ``shape``; errors name the key and ``where`` it was looked for."""
    if key not in src:
        raise MissingKeyError(f"{where}: tensor {key!r} is missing (expected shape {list(shape)})")
    tensor = src[key]
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(
            f"{where}: tensor {key!r} has shape {list(tensor.shape)}, expected {list(shape)} "
            "from the configuration; check that the configuration matches the checkpoint"
        )
    return tensor


class RuleStream:
    """Our tensors made from sources by rules, read only when asked for.

    Iterating yields ``(our name, tensor)`` in rule order (a stream, as the adapters' callers
    consume it); `names` / `shape` / `get` give random access for a writer that chooses its own
    order (`cumo_megatron.checkpoint.streaming`). ``a + b`` concatenates two streams.
    """

    def __init__(self, entries: Sequence[tuple[Rule, Mapping[str, torch.Tensor], str]]):
        self._entries = list(entries)
        self._by_name = {rule.ours: (rule, src, where) for rule, src, where in self._entries}

    @classmethod
    def of(cls, rules: Sequence[Rule], src: Mapping[str, torch.Tensor], where: str) -> "RuleStream":
        """The stream of ``rules`` over one source (``where`` names it in errors)."""
        return cls([(rule, src, where) for rule in rules])

    def __add__(self, other: "RuleStream") -> "RuleStream":
        return RuleStream(self._entries + other._entries)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for rule, src, where in self._entries:
            yield rule.ours, self._make(rule, src, where)

    def names(self) -> list[str]:
        """Our tensor names, in rule order."""
        return [rule.ours for rule, _, _ in self._entries]

    def shape(self, name: str) -> Shape:
        """The shape ``name`` will have (from the configuration; nothing is read)."""
        return tuple(self._by_name[name][0].ours_shape)

    def get(self, name: str) -> torch.Tensor:
        """Make our tensor ``name`` now (reading its source tensors)."""
        return self._make(*self._by_name[name])

    @staticmethod
    def _make(rule: Rule, src: Mapping[str, torch.Tensor], where: str) -> torch.Tensor:
        tensors = [fetch(src, key, shape, where) for key, shape in zip(rule.theirs, rule.theirs_shapes)]
        return rule.to_ours(*tensors)


def stream_to_ours(rules: Sequence[Rule], src: Mapping[str, torch.Tensor], where: str) -> RuleStream:
    """Our tensors rule by rule, each source tensor read only when its rule runs (`RuleStream`)."""
    return RuleStream.of(rules, src, where)


def stream_to_theirs(
    rules: Sequence[Rule],
    src: Mapping[str, torch.Tensor],
    where: str,
    passthrough: Optional[Mapping[str, torch.Tensor]] = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield source-layout tensors rule by rule, then ``passthrough`` unchanged.

    A passthrough key that a rule also writes is an error: one of the two would be lost.
    """
    written = {key for rule in rules for key in rule.theirs}
    if passthrough is not None:
        clash = sorted(written.intersection(passthrough.keys()))
        if clash:
            raise CheckpointError(
                f"{where}: passthrough tensors {clash[:5]} are also converted from the model; "
                "pass only the keys the import did not consume (the *_unused_keys helpers)"
            )
    for rule in rules:
        tensor = fetch(src, rule.ours, rule.ours_shape, where)
        yield from zip(rule.theirs, rule.to_theirs(tensor))
    if passthrough is not None:
        for key in passthrough.keys():
            yield key, passthrough[key]


def describe_keys(keys: Iterable[str], limit: int = 8) -> str:
    """A short sample of key names for error messages."""
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{len(keys)} keys: {shown}{more}" if keys else "no keys"
