"""ELL layout with a CSR overflow for sparse embedding tables, and its compiled scoring kernel.

Why this layout: scoring a candidate is one random row access. In CSR a row costs three
scattered reads (``indptr``, ``indices``, ``data``), which made a compiled CSR loop no faster
than a dense gather + BLAS matvec at 1,000 candidates (~20 µs each, cold rows). Here the first
``width`` entries of every row sit at a fixed offset (ELLPACK: ``cols`` and ``vals`` of shape
``(rows, width)``, padding = column 0 with value 0), so a row is one short contiguous read; the
few rows longer than ``width`` keep their extra entries in a CSR overflow. ``width`` holds nine
rows in ten whole unless that would pad more than half the entries (``default_width``).

The overflow is indexed by the rows that have one, not by every row: a pointer per row cost 4
bytes a row, a sixth of a 90 %-sparse table of width 32, to serve the one row in ten that
overflows. A bit per row (``ov_bits``) says whether a row has one, and a count per 64 rows
(``ov_rank``: overflowing rows before each block) turns that bit into the row's place in
``ov_ptr`` with at most eight byte popcounts (rank over a bit vector, as succinct indexes do).
That costs 1/16 byte a row. It replaced a sorted list of the overflowing rows, searched per row:
4 bytes per overflowing row, and ~17 dependent cache misses per look-up in a table of 1e6 rows,
which made the 90 %-sparse model there slower than dense (0.54x on pre-hashed rows,
``benchmarks/dsl_product.py``).

The kernels are compiled with numba (``cache=True``: compiled once per machine, then loaded).
"""

from __future__ import annotations

import numba
import numpy as np

_POPCOUNT8 = np.array([bin(b).count("1") for b in range(256)], dtype=np.int32)


@numba.njit(cache=True, inline="always", boundscheck=False, nogil=True)
def _overflow_slot(ov_bits: np.ndarray, ov_rank: np.ndarray, r: int) -> int:
    """Row ``r``'s place among the overflowing rows: the block's count plus the set bits before
    ``r`` in its block (``ov_bits`` is little-endian: row ``r`` is bit ``r & 7`` of byte ``r >> 3``)."""
    o: int = ov_rank[r >> 6]
    for byte in range((r >> 6) << 3, r >> 3):
        o += _POPCOUNT8[ov_bits[byte]]
    o += _POPCOUNT8[ov_bits[r >> 3] & ((1 << (r & 7)) - 1)]
    return o


@numba.njit(cache=True, fastmath=True, boundscheck=False, nogil=True)
def _ell_dot(
    cols: np.ndarray,
    vals: np.ndarray,
    ov_bits: np.ndarray,
    ov_rank: np.ndarray,
    ov_ptr: np.ndarray,
    ov_cols: np.ndarray,
    ov_vals: np.ndarray,
    rows: np.ndarray,
    vector: np.ndarray,
    out: np.ndarray,
) -> None:
    width = cols.shape[1]
    for k in range(rows.size):
        r = rows[k]
        acc = np.float32(0.0)
        for j in range(width):
            acc += vals[r, j] * vector[cols[r, j]]
        if (ov_bits[r >> 3] >> (r & 7)) & 1:  # a bit per row: most rows never look further
            o = _overflow_slot(ov_bits, ov_rank, r)
            for j in range(ov_ptr[o], ov_ptr[o + 1]):
                acc += ov_vals[j] * vector[ov_cols[j]]
        out[k] = acc


@numba.njit(cache=True, boundscheck=False, nogil=True)
def _ell_rows_dense(
    cols: np.ndarray,
    vals: np.ndarray,
    ov_bits: np.ndarray,
    ov_rank: np.ndarray,
    ov_ptr: np.ndarray,
    ov_cols: np.ndarray,
    ov_vals: np.ndarray,
    rows: np.ndarray,
    out: np.ndarray,
) -> None:
    width = cols.shape[1]
    for k in range(rows.size):
        r = rows[k]
        for j in range(width):
            out[k, cols[r, j]] += vals[r, j]  # padding adds 0 to column 0
        if (ov_bits[r >> 3] >> (r & 7)) & 1:
            o = _overflow_slot(ov_bits, ov_rank, r)
            for j in range(ov_ptr[o], ov_ptr[o + 1]):
                out[k, ov_cols[j]] += ov_vals[j]


def default_width(row_lengths: np.ndarray, coverage: float = 0.9, max_padding: float = 0.5) -> int:
    """The ELL width that holds every entry of ``coverage`` of the rows, narrowed until padding
    is at most ``max_padding`` of the entries (a few long rows among many short ones, as in a
    hashed table where touched rows are full, would otherwise make the table mostly padding).

    Not the byte-minimal width: per entry the overflow costs the same as the ELL part and has no
    padding, so bytes alone would always pick width 0 (plain CSR), the slow layout.
    """
    if row_lengths.size == 0:
        return 0
    width = int(np.ceil(np.quantile(row_lengths, coverage)))
    nnz = int(row_lengths.sum())
    while width > 0 and int(np.clip(width - row_lengths, 0, None).sum()) > max_padding * nnz:
        width -= 1
    return width


def _index_array(rows: np.ndarray) -> np.ndarray:
    """Row ids as a contiguous int32/int64 array, without a copy when they already are one."""
    rows = np.asarray(rows)
    if rows.dtype in (np.int32, np.int64) and rows.flags.c_contiguous:
        return rows
    return np.ascontiguousarray(rows, dtype=np.int64)


def _col_dtype(dim: int) -> type:
    """The narrowest column-index type: a row's ELL part should fit in as few cache lines as possible."""
    return np.uint8 if dim <= 256 else np.int16 if dim <= np.iinfo(np.int16).max else np.int32


class EllTable:
    """A sparse ``(rows, dim)`` table: fixed-width ELL part plus a CSR overflow (module docstring)."""

    __slots__ = ("cols", "nnz", "ov_bits", "ov_cols", "ov_ptr", "ov_rank", "ov_vals", "shape", "vals")

    def __init__(
        self,
        cols: np.ndarray,
        vals: np.ndarray,
        ov_rows: np.ndarray,
        ov_ptr: np.ndarray,
        ov_cols: np.ndarray,
        ov_vals: np.ndarray,
        shape: tuple[int, int],
        nnz: int,
    ) -> None:
        self.cols, self.vals = cols, vals
        self.ov_ptr, self.ov_cols, self.ov_vals = ov_ptr, ov_cols, ov_vals
        has = np.zeros(int(shape[0]), dtype=bool)
        has[ov_rows] = True
        self.ov_bits = np.packbits(has, bitorder="little")  # rows with an overflow
        per_block = np.add.reduceat(has, np.arange(0, has.size, 64)) if has.size else np.zeros(0, np.int64)
        self.ov_rank = np.zeros(per_block.size + 1, dtype=np.int32)  # overflowing rows before each block of 64
        np.cumsum(per_block, out=self.ov_rank[1:])
        self.shape = (int(shape[0]), int(shape[1]))
        self.nnz = int(nnz)

    @classmethod
    def from_csr(
        cls, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, shape: tuple[int, int], width: int | None = None
    ) -> EllTable:
        n_rows, dim = int(shape[0]), int(shape[1])
        col_dtype = _col_dtype(dim)
        lengths = np.diff(indptr).astype(np.int64)
        w = default_width(lengths) if width is None else int(width)
        row_of = np.repeat(np.arange(n_rows), lengths)
        slot = np.arange(indices.size) - np.repeat(np.asarray(indptr[:-1], dtype=np.int64), lengths)
        inside = slot < w
        cols: np.ndarray = np.zeros((n_rows, w), dtype=col_dtype)
        vals = np.zeros((n_rows, w), dtype=np.float32)
        cols[row_of[inside], slot[inside]] = indices[inside]
        vals[row_of[inside], slot[inside]] = data[inside]
        beyond = np.clip(lengths - w, 0, None)
        ov_rows = np.flatnonzero(beyond).astype(np.int32)
        ov_ptr = np.zeros(ov_rows.size + 1, dtype=np.int32)
        np.cumsum(beyond[ov_rows], out=ov_ptr[1:])
        return cls(
            cols,
            vals,
            ov_rows,
            ov_ptr,
            np.ascontiguousarray(indices[~inside], dtype=col_dtype),
            np.ascontiguousarray(data[~inside], dtype=np.float32),
            (n_rows, dim),
            int(indices.size),
        )

    @staticmethod
    def nbytes_for(indptr: np.ndarray, dim: int) -> int:
        col_bytes = np.dtype(_col_dtype(dim)).itemsize
        lengths = np.diff(indptr).astype(np.int64)
        w = default_width(lengths)
        over = np.clip(lengths - w, 0, None)
        beyond, n_over = int(over.sum()), int(np.count_nonzero(over))
        ranks = (lengths.size + 63) // 64 + 1
        return (lengths.size * w + beyond) * (col_bytes + 4) + (n_over + 1 + ranks) * 4 + (lengths.size + 7) // 8

    @property
    def ov_rows(self) -> np.ndarray:
        """The rows with an overflow, ascending (derived from ``ov_bits``; not stored)."""
        return np.flatnonzero(np.unpackbits(self.ov_bits, bitorder="little")[: self.shape[0]]).astype(np.int32)

    @property
    def width(self) -> int:
        return int(self.cols.shape[1])

    @property
    def nbytes(self) -> int:
        parts = (self.cols, self.vals, self.ov_bits, self.ov_rank, self.ov_ptr, self.ov_cols, self.ov_vals)
        return int(sum(a.nbytes for a in parts))

    def dot(self, rows: np.ndarray, vector: np.ndarray) -> np.ndarray:
        """``table[rows] @ vector``, one compiled pass over the candidates' stored entries."""
        rows = _index_array(rows)
        out = np.empty(rows.size, dtype=np.float32)
        _ell_dot(
            self.cols,
            self.vals,
            self.ov_bits,
            self.ov_rank,
            self.ov_ptr,
            self.ov_cols,
            self.ov_vals,
            rows,
            np.ascontiguousarray(vector, dtype=np.float32),
            out,
        )
        return out

    def rows_dense(self, rows: np.ndarray) -> np.ndarray:
        rows = _index_array(np.atleast_1d(rows))
        out = np.zeros((rows.size, self.shape[1]), dtype=np.float32)
        _ell_rows_dense(
            self.cols, self.vals, self.ov_bits, self.ov_rank, self.ov_ptr, self.ov_cols, self.ov_vals, rows, out
        )
        return out
