"""Reading GGUF files: metadata -> ModelArgs, and tensors of a layer range only.

The file is memory-mapped by `gguf.GGUFReader`; a tensor's bytes are touched only
when `dequantize` or `raw` is called for it, so a stage never reads layers it does
not run.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFEndian, GGUFReader, GGUFValueType, ReaderField, ReaderTensor
from gguf.quants import dequantize

from consortium.errors import ModelFileError, UnsupportedModelError
from consortium.model.files import cached_sha256

if TYPE_CHECKING:
    from consortium.model.pack_cache import PackCache

SUPPORTED_ARCHS = ("llama",)
Q = GGMLQuantizationType
SUPPORTED_QUANTS = frozenset(
    {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
)
# Per-layer tensors of the Llama family, in GGUF naming.
LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output")
LAYER_TENSORS += ("ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
FLOATS = frozenset({Q.F32, Q.F16, Q.BF16})


@dataclass(frozen=True)
class RopeScaling:
    kind: str = "none"  # none | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192


@dataclass(frozen=True)
class ModelArgs:
    """Hyper-parameters of a Llama-family model; derived fields are properties."""

    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    norm_eps: float
    rope_base: float
    rope_dim: int
    head_dim: int
    tied_head: bool
    rope_scaling: RopeScaling = RopeScaling()
    arch: str = "llama"

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


class _Reader(GGUFReader):
    """GGUFReader over a plain ndarray view of its memory map. numpy's memmap subclass runs Python
    code on every slice, and the reader slices ~5 times per vocabulary entry: a Llama-3 vocabulary
    took ~10 s to open (~30 s on a busy machine) instead of ~1."""

    @property
    def data(self) -> np.ndarray:
        return self._view

    @data.setter
    def data(self, mapped: np.memmap) -> None:  # GGUFReader.__init__ assigns its np.memmap here
        self.mapped, self._view = mapped, mapped.view(np.ndarray)

    def _build_fields(self, offs: int, count: int) -> int:
        """GGUFReader._build_fields, with flat arrays kept as _ArrayField."""
        for _ in range(count):
            orig_offs = offs
            kv_klen, kv_kdata = self._get_str(offs)
            offs += int(kv_klen.nbytes + kv_kdata.nbytes)
            raw_kv_type = self._get(offs, np.uint32)
            offs += int(raw_kv_type.nbytes)
            name, head = str(bytes(kv_kdata), encoding="utf-8"), [kv_klen, kv_kdata, raw_kv_type]
            parsed = None
            if raw_kv_type[0] == GGUFValueType.ARRAY:
                parsed = self._array_field(orig_offs, name, head, offs)
            if parsed is None:
                size, parts, idxs, types = self._get_field_parts(offs, raw_kv_type[0])
                field = ReaderField(orig_offs, name, head + parts, [i + len(head) for i in idxs], types)
            else:
                field, size = parsed
            self._push_field(field, skip_sum=True)
            offs += size
        return offs

    def _array_field(
        self, orig_offs: int, name: str, head: list[np.ndarray], offs: int
    ) -> tuple[ReaderField, int] | None:
        """A non-empty array of strings or scalars as one _ArrayField and its size in bytes; None for
        the rest (nested or empty arrays), which the base class parses."""
        raw_itype = self._get(offs, np.uint32)
        alen = self._get(offs + 4, np.uint64)
        if len(raw_itype) != 1 or len(alen) != 1:
            raise ValueError(f"metadata {name!r} runs past the end of the file")
        n, start, sub = int(alen[0]), offs + 12, int(raw_itype[0])
        if n == 0:  # the base class types an empty array [ARRAY] whatever its element type
            return None
        head = head + [raw_itype, alen]
        types = [GGUFValueType.ARRAY, GGUFValueType(sub)]
        if sub == GGUFValueType.STRING:
            if n > (len(self._view) - start) // 8:  # each string takes at least its 8-byte length
                raise ValueError(f"metadata {name!r} runs past the end of the file")
            starts, lens, end = self._string_offsets(start, n)
            blob = self._view[start:end]
            parts = head + [blob, starts - start, lens]
        elif (nptype := self.gguf_scalar_to_np.get(GGUFValueType(sub))) is not None:
            values = self._get(start, nptype, n)
            if len(values) != n:
                raise ValueError(f"metadata {name!r} runs past the end of the file")
            parts, end = head + [values], start + int(values.nbytes)
        else:
            return None
        return _ArrayField(orig_offs, name, parts, range(n), types), end - offs

    def _string_offsets(self, at: int, n: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Start and length of each of n length-prefixed strings from byte `at`, and the end."""
        length = struct.Struct(("<" if self.endianess == GGUFEndian.LITTLE else ">") + "Q").unpack_from
        buf, size = memoryview(self._view), len(self._view)
        starts, lens = [], []
        for _ in range(n):
            (ln,) = length(buf, at)  # struct.error past the end of the file
            at += 8
            starts.append(at)
            lens.append(ln)
            at += ln
            if at > size:
                raise ValueError("a metadata string runs past the end of the file")
        return np.array(starts, dtype=np.int64), np.array(lens, dtype=np.int64), at


class _ArrayField(ReaderField):
    """A metadata array as one view of its bytes (and for strings each one's start and length in
    it) instead of GGUFReader's numpy view per element: Llama-3's vocabulary and merges made ~640k
    views, ~0.19 GB in every process, though workers never tokenize. contents() is the base class's
    (the same Python values); data is range(n), so len(field.data) is still the element count."""

    def contents(self, index_or_slice: int | slice = slice(None)) -> Any:
        if self.types[-1] != GGUFValueType.STRING:
            return self.parts[-1][index_or_slice].tolist()
        blob, starts, lens = self.parts[-3:]
        if isinstance(index_or_slice, int):
            at = int(starts[index_or_slice])
            return str(blob[at : at + int(lens[index_or_slice])].tobytes(), encoding="utf-8")
        raw = blob.tobytes()
        return [
            str(raw[at : at + ln], encoding="utf-8")
            for at, ln in zip(starts[index_or_slice].tolist(), lens[index_or_slice].tolist(), strict=True)
        ]


def _field(reader: GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


class GGUFModel:
    """A memory-mapped GGUF file of a Llama-family model."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"model file not found: {self.path}")
        try:
            self.reader = _Reader(self.path, "r")
        except Exception as e:  # gguf raises ValueError/struct.error/... on garbage
            raise ModelFileError(
                f"not a readable GGUF file: {self.path} ({e}; truncated, or a tensor's type or shape "
                "disagrees with its data)"
            ) from e
        self.tensors: dict[str, ReaderTensor] = {t.name: t for t in self.reader.tensors}
        self.pack_cache: PackCache | None = None  # where packed int4 forms persist (pack_cache.py)
        self.args = self._read_args()
        self._check_quant_types()
        self._check_tensors()

    def meta(self, key: str, default=None):
        return _field(self.reader, key, default)

    def _read_args(self) -> ModelArgs:
        arch = self.meta("general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"unsupported architecture {arch!r} in {self.path.name} (supported: {', '.join(SUPPORTED_ARCHS)})"
            )

        def req(key: str):
            v = self.meta(f"{arch}.{key}")
            if v is None:
                raise ModelFileError(f"{self.path.name}: missing metadata key {arch}.{key}")
            return v

        dim, n_heads = int(req("embedding_length")), int(req("attention.head_count"))
        head_dim = int(self.meta(f"{arch}.attention.key_length", dim // n_heads))
        vocab = self.meta(f"{arch}.vocab_size")
        if vocab is None:
            vocab = len(self.reader.fields["tokenizer.ggml.tokens"].data)
        scaling = RopeScaling()
        kind = self.meta(f"{arch}.rope.scaling.type", "none")
        if kind == "linear":
            scaling = RopeScaling("linear", float(self.meta(f"{arch}.rope.scaling.factor", 1.0)))
        elif kind == "llama3" or self.meta(f"{arch}.rope.scaling.low_freq_factor") is not None:
            scaling = RopeScaling(
                "llama3",
                float(self.meta(f"{arch}.rope.scaling.factor", 8.0)),
                float(self.meta(f"{arch}.rope.scaling.low_freq_factor", 1.0)),
                float(self.meta(f"{arch}.rope.scaling.high_freq_factor", 4.0)),
                int(self.meta(f"{arch}.rope.scaling.original_context_length", 8192)),
            )
        elif kind not in ("none", "", None):
            raise UnsupportedModelError(f"unsupported rope scaling {kind!r} in {self.path.name}")
        args = ModelArgs(
            n_layers=int(req("block_count")),
            dim=dim,
            n_heads=n_heads,
            n_kv_heads=int(self.meta(f"{arch}.attention.head_count_kv", n_heads)),
            ffn_dim=int(req("feed_forward_length")),
            vocab_size=int(vocab),
            context_length=int(req("context_length")),
            norm_eps=float(self.meta(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_base=float(self.meta(f"{arch}.rope.freq_base", 10000.0)),
            rope_dim=int(self.meta(f"{arch}.rope.dimension_count", head_dim)),
            head_dim=head_dim,
            tied_head="output.weight" not in self.tensors,
            rope_scaling=scaling,
            arch=arch,
        )
        if args.rope_dim != args.head_dim:
            raise UnsupportedModelError(
                f"partial rotary embeddings (rope dim {args.rope_dim}) are not supported"
            )
        if args.n_heads % args.n_kv_heads:
            raise UnsupportedModelError(
                f"{args.n_heads} heads are not a multiple of {args.n_kv_heads} KV heads"
            )
        return args

    def _check_quant_types(self) -> None:
        for t in self.tensors.values():
            if t.tensor_type not in SUPPORTED_QUANTS:
                raise UnsupportedModelError(
                    f"unsupported quantization type {t.tensor_type.name} (tensor {t.name}) in {self.path.name}"
                )

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor the architecture needs, in GGUF order ([in] or [in, out]), from the metadata."""
        a = self.args
        out = {"token_embd.weight": (a.dim, a.vocab_size), "output_norm.weight": (a.dim,)}
        if not a.tied_head:
            out["output.weight"] = (a.dim, a.vocab_size)
        for i in range(a.n_layers):
            p = f"blk.{i}."
            out |= {p + "attn_norm.weight": (a.dim,), p + "ffn_norm.weight": (a.dim,)}
            out |= {p + "attn_q.weight": (a.dim, a.q_dim), p + "attn_k.weight": (a.dim, a.kv_dim)}
            out |= {p + "attn_v.weight": (a.dim, a.kv_dim), p + "attn_output.weight": (a.q_dim, a.dim)}
            out |= {p + "ffn_gate.weight": (a.dim, a.ffn_dim), p + "ffn_up.weight": (a.dim, a.ffn_dim)}
            out[p + "ffn_down.weight"] = (a.ffn_dim, a.dim)
        if self.has("rope_freqs.weight"):
            out["rope_freqs.weight"] = (a.rope_dim // 2,)
        return out

    def _check_tensors(self) -> None:
        """Shapes against the metadata, vectors in a float type, data inside the file and not
        overlapping: a bad file is refused when opened, never half-way through loading a stage."""
        for name, want in self.expected_shapes().items():
            t = self.tensor(name)
            got = tuple(int(d) for d in t.shape)
            if got != want:
                raise ModelFileError(
                    f"{self.path.name}: tensor {name} has shape {list(got)} but the metadata implies {list(want)}"
                )
            if len(want) == 1 and t.tensor_type not in FLOATS:
                raise ModelFileError(
                    f"{self.path.name}: tensor {name} is {t.tensor_type.name}; a vector must be F32, F16 or BF16"
                )
        size, prev = self.path.stat().st_size, None
        for t in sorted(self.tensors.values(), key=lambda t: t.data_offset):
            if prev is not None and t.data_offset < prev.data_offset + prev.n_bytes:
                raise ModelFileError(
                    f"{self.path.name}: tensor {prev.name} ({prev.tensor_type.name}, {prev.n_bytes} bytes at "
                    f"{prev.data_offset}) overlaps tensor {t.name}: its type or shape disagrees with its data"
                )
            if t.data_offset + t.n_bytes > size:
                raise ModelFileError(
                    f"{self.path.name}: tensor {t.name} ({t.tensor_type.name}, {t.n_bytes} bytes at "
                    f"{t.data_offset}) runs past the end of the file ({size} bytes): truncated, or its "
                    "type or shape disagrees with its data"
                )
            prev = t

    # --- tensors -------------------------------------------------------------------------

    def tensor(self, name: str) -> ReaderTensor:
        t = self.tensors.get(name)
        if t is None:
            raise ModelFileError(f"{self.path.name}: missing tensor {name}")
        return t

    def has(self, name: str) -> bool:
        return name in self.tensors

    def dequantize(self, name: str, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """Float32 array in PyTorch layout ([out, in] for matrices); optionally only some rows."""
        t = self.tensor(name)
        data = np.asarray(t.data if rows is None else t.data[rows])
        out = dequantize(data, t.tensor_type)
        shape = [int(s) for s in reversed(t.shape.tolist())]
        if rows is not None:
            shape[0] = data.shape[0]
        out = out.reshape(shape).astype(np.float32, copy=False)
        return out if out.flags.writeable else out.copy()  # F32 tensors come back as read-only memmap views

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes exactly as stored (quantized blocks)."""
        return np.asarray(self.tensor(name).data)

    def release(self, name: str, rows: slice | None = None) -> None:
        """Drop a tensor's file pages (or those of some of its rows) from this process's resident set
        once they are loaded (the OS page cache keeps them, and a later read faults them back in):
        the mapping must not count twice. Rows release only the pages wholly inside them, so that
        rows still being read next to them keep theirs."""
        mm = getattr(self.reader.mapped, "_mmap", None)
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        t, page = self.tensor(name), mmap.PAGESIZE
        if rows is None:
            start, end = t.data_offset // page * page, t.data_offset + t.n_bytes
        else:
            row_bytes = t.n_bytes // int(t.shape[1]) if len(t.shape) > 1 else t.n_bytes
            lo, hi, _ = rows.indices(int(t.shape[1]) if len(t.shape) > 1 else 1)
            start = -(-(t.data_offset + lo * row_bytes) // page) * page
            end = (t.data_offset + hi * row_bytes) // page * page
        if end > start:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def layer_names(self, layer: int) -> list[str]:
        return [f"blk.{layer}.{n}.weight" for n in LAYER_TENSORS]

    def layers_digest(self, start: int, end: int) -> str:
        """SHA-256 over the stored bytes of layers [start, end): binds a stage to its exact weights."""
        h = hashlib.sha256()
        for i in range(start, end):
            for name in self.layer_names(i):
                t = self.tensor(name)
                h.update(f"{name}:{t.tensor_type.name}:{list(t.shape)}".encode())
                h.update(memoryview(np.ascontiguousarray(t.data)).cast("B"))
                # Hashing faults the whole range in: without this a worker kept its layers' file
                # pages resident after loading them (8B, layers 0-11: +1.41 GB RSS).
                self.release(name)
        return h.hexdigest()

    @cached_property
    def digest(self) -> str:
        """Identity of the model: SHA-256 of the whole file (remembered while the file is unchanged)."""
        return cached_sha256(self.path)

    def quant_summary(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        return counts
