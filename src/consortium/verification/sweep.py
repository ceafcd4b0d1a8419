"""Honest and cheating error of every layer range, measured in one pass per start layer.

The honest error of an audit depends on the layer range (it grows with depth and jumps at the
layers that make large activations: layers 0-3 of SmolLM2 in fp16 reach a rel-L2 that thirds of
the model never do) and on the numeric classes of worker and auditor. For a start layer a, each
configuration runs layers a .. n-1 of a whole-model stage once from the same input (the fp32
reference pipeline's hidden state at layer a, as the previous stage committed it), and its output
after layer b-1 is what a stage [a, b) commits (b = n: the logits). So every range that starts at
a sampled layer costs one pass per configuration, and every (worker, auditor) pair of
configurations is compared on bit-identical inputs, as an audit compares them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from consortium.model.gguf_file import GGUFModel
from consortium.model.model import Stage, StageSpec
from consortium.verification.misbehave import Misbehaviour
from consortium.verification.tolerance import class_of, compare_rows, worst_class

Rows = tuple[Tensor, Tensor]  # rel_l2 [S], max_rel [S] of one prompt's rows


@dataclass(frozen=True)
class Config:
    name: str
    device: str
    dtype: str
    packed: bool = False
    decode: bool = False  # one position per call (as generation runs) instead of one prefill

    @property
    def klass(self) -> str:
        return class_of(self.dtype, self.packed, self.device)

    def spec(self, n_layers: int) -> StageSpec:
        return StageSpec(0, n_layers, device=self.device, dtype=self.dtype, packed=self.packed)


REF = Config("cpu_fp32_prefill", "cpu", "fp32")


@dataclass
class Sweep:
    """Per-row errors keyed (name, a, b): `name` is a pair "worker|auditor" of configurations or
    "cheat:<kind>" (against the fp32 reference); one (rel_l2, max_rel) per prompt."""

    n_layers: int
    starts: list[int]
    rows: dict[tuple[str, int, int], list[Rows]] = field(default_factory=dict)
    klass: dict[str, str] = field(default_factory=dict)  # name -> class of the comparison

    def ranges(self) -> list[tuple[int, int]]:
        return [(a, b) for a in self.starts for b in range(a + 1, self.n_layers + 1)]

    def honest_rows(self, names: list[str], r: tuple[int, int]) -> list[Rows]:
        """Per prompt, the finite rows of these comparisons on range r (a configuration that
        overflows on some model is unusable there; `non_finite` counts how often)."""
        out = []
        for name in names:
            for rel, mx in self.rows[(name, *r)]:
                ok = torch.isfinite(rel) & torch.isfinite(mx)
                if bool(ok.any()):
                    out.append((rel[ok], mx[ok]))
        return out

    def non_finite(self, names: list[str]) -> int:
        return sum(
            int((~torch.isfinite(u[0])).sum()) for k, v in self.rows.items() if k[0] in names for u in v
        )

    def add(self, name: str, a: int, outs: list[Tensor], refs: list[Tensor]) -> None:
        for j, (out, ref) in enumerate(zip(outs, refs, strict=True)):
            cmp = compare_rows(out, ref)
            self.rows.setdefault((name, a, a + j + 1), []).append((cmp.rel_l2, cmp.max_rel))


def chain(stage: Stage, start: int, x: Tensor, decode: bool) -> list[Tensor]:
    """What every stage [start, b) of the whole-model `stage` outputs for input x (token ids if start
    is 0), b = start+1 .. n: hidden states, then the logits of every position."""
    n = stage.spec.end
    cache = stage.new_cache(x.shape[0])
    outs: list[list[Tensor]] = [[] for _ in range(start, n)]
    steps = [(i, i + 1) for i in range(x.shape[0])] if decode else [(0, x.shape[0])]
    with torch.inference_mode():
        for p, q in steps:
            h = stage.embed(x[p:q]) if start == 0 else x[p:q].to(stage.spec.device, torch.float32)
            for i in range(start, n):
                h = stage.layers[i](h, stage.freqs_cis[p:q], [(cache.k[i], cache.v[i])], [(p, q - p)])
                if i < n - 1:
                    outs[i - start].append(h.float().cpu())
            outs[-1].append(stage.output(stage.norm(h)).float().cpu())
    return [torch.cat(o) for o in outs]


def _last_layer_cheats(ref: Stage, start: int, x: Tensor, outs: list[Tensor]) -> dict[str, list[Tensor]]:
    """skip-layer and wrong-weights on every range [start, b): the range's last layer skipped, or
    run with the weights of the layer before it, on the honest output of [start, b-1)."""
    n = ref.spec.end
    head = lambda h: ref.output(ref.norm(h)).float()  # noqa: E731
    skip, wrong = [], []
    with torch.inference_mode():
        h = x.float() if start else ref.embed(x)  # the input of layer b-1, for b = start+1 .. n
        for b in range(start + 1, n + 1):
            cache = ref.new_cache(h.shape[0])
            kv, span = [(cache.k[0], cache.v[0])], [(0, h.shape[0])]
            w = ref.layers[b - 2 if b > 1 else 1](h, ref.freqs_cis[: h.shape[0]], kv, span)
            skip.append(head(h) if b == n else h)
            wrong.append(head(w) if b == n else w)
            h = outs[b - 1 - start] if b < n else h
    return {"skip-layer": skip, "wrong-weights": wrong}


def run_sweep(
    gguf: GGUFModel,
    ids: list[Tensor],
    configs: list[Config],
    cheats: list[str],
    starts: list[int],
    log: Callable[[str], None] = print,
) -> Sweep:
    """Every honest (worker, auditor) pair -- auditors are the prefill configurations -- and every
    cheat against the fp32 reference, on every range starting at `starts`."""
    n = gguf.args.n_layers
    stages = {c: Stage(gguf, c.spec(n)) for c in [REF, *configs]}
    parsed = [Misbehaviour.parse(c, enabled=True) for c in cheats]
    weight_cheats = {
        m.kind: m.corrupt_stage(Stage(gguf, REF.spec(n))) for m in parsed if m.kind.endswith("-weights")
    }
    weight_cheats.pop("wrong-weights", None)  # measured per range on the last layer instead
    inputs = [[x, *chain(stages[REF], 0, x, False)[:-1]] for x in ids]  # reference hidden per layer
    sweep = Sweep(n, starts)
    auditors = [c for c in stages if not c.decode]
    for a in starts:
        outs = {c: [chain(st, a, inp[a], c.decode) for inp in inputs] for c, st in stages.items()}
        for w in stages:
            for u in auditors:
                if w != u:
                    name = f"{w.name}|{u.name}"
                    sweep.klass[name] = worst_class(w.klass, u.klass)
                    for p in range(len(ids)):
                        sweep.add(name, a, outs[w][p], outs[u][p])
        for p, inp in enumerate(inputs):
            ref = outs[REF][p]
            by_kind = {k: chain(st, a, inp[a], False) for k, st in weight_cheats.items()}
            by_kind |= _last_layer_cheats(stages[REF], a, inp[a], ref)
            for m, text in zip(parsed, cheats, strict=True):
                bad = by_kind.get(m.kind) or [m.corrupt_output(o, step=p, gguf=gguf) for o in ref]
                sweep.klass["cheat:" + text] = "cheat"
                sweep.add("cheat:" + text, a, bad, ref)
        log(f"sweep: ranges from layer {a} measured")
    return sweep
