"""Neighbourhood (k x k local) self-attention over a token grid, a drop-in for timm's ``Attention``.

Every grid token attends to the ``kh x kw`` tokens around it (NAT-style windows: near the border the window is shifted
to stay inside the grid, so every query sees exactly ``kh * kw`` keys); prefix tokens (CLS, registers) attend to and
are attended by every token. Two backends compute the same function:

* ``"flex"``: ``torch.nn.attention.flex_attention`` with a ``BlockMask`` (compiled: eager flex materialises the full
  score matrix, so it saves nothing). The block table is built here from the window geometry in O(N k^2) instead of
  ``create_block_mask``'s O(N^2) evaluation (13 s at 16,384 tokens on one CPU thread, 0.1 s here). Tokens are put in
  the order that needs the fewest 128 x 128 blocks (raster rows or square-ish tiles, chosen by counting; see
  ``best_token_order``) with prefix tokens last, so grid blocks stay aligned.
* ``"tiled"``: the grid cut into query tiles; each tile attends, with ``F.scaled_dot_product_attention``, to the
  rectangle of keys its windows cover (the tile plus a k // 2 halo) and the prefix tokens, under the same mask
  restricted to that rectangle. Plain gathers and SDPA, so it trains anywhere (torch 2.14 has no FlexAttention
  backward on CPU) at O(N (t + k - 1)^2) cost and memory instead of O(N^2): the CPU training path.
* ``"sdpa_mask"``: ``F.scaled_dot_product_attention`` with the dense (N, N) boolean mask: the reference. O(N^2)
  memory: 268 MB of mask plus ~3 GB of scores per image at 16,384 tokens.

Why not NATTEN (PyPI ``natten``): 0.21.7 is an sdist only on PyPI (pre-built wheels live on whl.natten.org and stop
at torch 2.13 + CUDA); built without CUDA its only CPU path is its own "flex" backend, i.e. this same FlexAttention,
so on CPU it adds a dependency and a build for nothing. Its fused CUDA kernels are the thing to try on a GPU later,
behind the same mask semantics (its windows are the NAT windows used here).
"""
from __future__ import annotations

from typing import Callable, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.layers import Attention

__all__ = [
    "LocalAttention",
    "best_token_order",
    "block_sparsity",
    "local_attention_layer",
    "neighbourhood_mask",
    "tile_order",
    "tiled_attention",
]

Pair = Union[int, Sequence[int]]
Backend = Literal["flex", "tiled", "sdpa_mask", "auto"]
Border = Literal["shift", "clip"]

FLEX_BLOCK = 128  # FlexAttention's default block: the unit its skipping works in
# Tile shapes best_token_order considers besides raster order: 128 tokens each, so one tile is one flex block.
TILE_CANDIDATES = ((8, 16), (16, 8), (4, 32))
# Query tile side of the "tiled" backend: keys per query are (t + k - 1)^2 / t^2 of the window's k^2 (t = 8, k = 7:
# 196 keys for 64 queries); smaller tiles waste fewer keys but make more, smaller SDPA calls. Measured on one CPU
# thread, fwd+bwd, 3 heads x 64, k = 7: tiles of 4 to 16 are within 1.5x of each other, 8 the fastest at 4,096 tokens.
TILED_QUERY_TILE = 8


def _pair(value: Pair, what: str) -> tuple[int, int]:
    """(h, w) from an int or a pair."""
    if isinstance(value, int):
        return value, value
    h, w = (int(v) for v in value)
    return h, w


def _check_kernel(kernel: Pair) -> tuple[int, int]:
    kh, kw = _pair(kernel, "kernel")
    if kh < 1 or kw < 1 or kh % 2 == 0 or kw % 2 == 0:
        # an odd window has a centre: the query sits in its middle away from the border (NAT's convention)
        raise ValueError(f"kernel must be odd and >= 1 on each side so the window is centred, got {(kh, kw)}")
    return kh, kw


def _windows(coord: torch.Tensor, size: int, k: int, border: Border) -> tuple[torch.Tensor, torch.Tensor]:
    """[lo, hi) of each query's window along one axis of length ``size``."""
    half = k // 2
    if border == "shift":
        k = min(k, size)  # a kernel wider than the grid is the whole axis
        lo = (coord - half).clamp(0, size - k)
        return lo, lo + k
    if border == "clip":
        return (coord - half).clamp(min=0), (coord + half + 1).clamp(max=size)
    raise ValueError(f"border must be 'shift' or 'clip', got {border!r}")


def tile_order(grid_h: int, grid_w: int, tile: Pair) -> tuple[torch.Tensor, torch.Tensor]:
    """A token order in ``th x tw`` tiles (tiles row-major, raster inside a tile; edge tiles may be partial).

    Returns ``(perm, inv)``, int64 of shape (grid_h * grid_w,): ``perm[i]`` is the raster index of the token placed at
    position ``i`` (so ``x_tiled = x[:, perm]``) and ``inv`` undoes it (``x = x_tiled[:, inv]``).
    """
    th, tw = _pair(tile, "tile")
    if th < 1 or tw < 1:
        raise ValueError(f"tile must be >= 1 on each side, got {(th, tw)}")
    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
    tiles_w = -(-grid_w // tw)
    key = ((rows // th) * tiles_w + cols // tw) * (th * tw) + (rows % th) * tw + cols % tw
    perm = torch.argsort(key)
    return perm, torch.argsort(perm)


class _Layout:
    """Where each sequence position sits on the grid, and its window: the one source of the mask for every path.

    The sequence is the grid tokens in ``order`` (raster indices; ``None`` = raster) plus ``num_prefix`` prefix tokens,
    first (timm's layout) or last (``prefix_last``: keeps grid tiles aligned with flex blocks). Tensors are (N,).
    """

    def __init__(self, grid_h: int, grid_w: int, kernel: Pair, num_prefix: int = 0, border: Border = "shift",
                 order: Optional[torch.Tensor] = None, prefix_last: bool = False,
                 device: Optional[torch.device] = None) -> None:
        self.grid_h, self.grid_w = grid_h, grid_w
        self.kh, self.kw = _check_kernel(kernel)
        self.num_prefix, self.border = num_prefix, border
        n_grid = grid_h * grid_w
        self.n = n_grid + num_prefix
        raster = torch.arange(n_grid) if order is None else order.to("cpu", torch.int64)
        if raster.shape != (n_grid,):
            raise ValueError(f"order must hold the {n_grid} grid tokens, got shape {tuple(raster.shape)}")
        none = torch.full((num_prefix,), -1, dtype=torch.int64)
        # raster index at each sequence position (-1: prefix)
        self.raster = torch.cat([raster, none]) if prefix_last else torch.cat([none, raster])
        grid_pos = torch.arange(n_grid) + (0 if prefix_last else num_prefix)
        self.grid_pos = grid_pos  # sequence positions of the grid tokens, in `order`
        self.prefix_pos = torch.arange(num_prefix) + (n_grid if prefix_last else 0)
        pre = self.raster < 0
        r = torch.where(pre, -1, self.raster // grid_w)
        c = torch.where(pre, -1, self.raster % grid_w)
        lo_r, hi_r = _windows(r, grid_h, self.kh, border)
        lo_c, hi_c = _windows(c, grid_w, self.kw, border)
        self.tensors = {name: t.to(device) for name, t in
                        dict(pre=pre, r=r, c=c, lo_r=lo_r, hi_r=hi_r, lo_c=lo_c, hi_c=hi_c).items()}

    def mask_mod(self) -> Callable:
        """FlexAttention's ``mask_mod(b, h, q_idx, kv_idx) -> bool``; also evaluated on broadcast index grids."""
        t = self.tensors
        pre, r, c, lo_r, hi_r, lo_c, hi_c = (t[k] for k in ("pre", "r", "c", "lo_r", "hi_r", "lo_c", "hi_c"))

        def mask_mod(b, h, q_idx, kv_idx):
            rk, ck = r[kv_idx], c[kv_idx]
            local = (rk >= lo_r[q_idx]) & (rk < hi_r[q_idx]) & (ck >= lo_c[q_idx]) & (ck < hi_c[q_idx])
            return local | pre[q_idx] | pre[kv_idx]

        return mask_mod

    def dense(self, chunk: int = 2048) -> torch.Tensor:
        """The (N, N) boolean mask, built in query chunks so no int64 (N, N) intermediate is ever formed."""
        mod = self.mask_mod()
        device = self.tensors["r"].device
        kv = torch.arange(self.n, device=device)[None, :]
        out = torch.empty(self.n, self.n, dtype=torch.bool, device=device)
        for start in range(0, self.n, chunk):
            q = torch.arange(start, min(start + chunk, self.n), device=device)[:, None]
            out[start:start + q.shape[0]] = mod(None, None, q, kv)
        return out

    def pair_block_counts(self, block: int = FLEX_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
        """(allowed (query, key) pairs per (q block, kv block), pairs a full block holds): both (nb, nb), int64.

        Counts the pairs from the geometry (each grid query's window, plus the prefix rows and columns) in
        O(N (k^2 + prefix)), so the block table never needs the N x N mask.
        """
        t = {k: v.cpu() for k, v in self.tensors.items()}
        nb = -(-self.n // block)
        pos_of_raster = torch.empty(self.grid_h * self.grid_w, dtype=torch.int64)
        pos_of_raster[self.raster[self.grid_pos]] = self.grid_pos
        q = self.grid_pos
        dr = torch.arange(self.kh).repeat_interleave(self.kw)
        dc = torch.arange(self.kw).repeat(self.kh)
        kr = t["lo_r"][q][:, None] + dr[None, :]
        kc = t["lo_c"][q][:, None] + dc[None, :]
        valid = (kr < t["hi_r"][q][:, None]) & (kc < t["hi_c"][q][:, None])  # "clip" windows can be smaller
        kv = pos_of_raster[(kr * self.grid_w + kc).clamp(max=self.grid_h * self.grid_w - 1)]
        ids = ((q[:, None] // block) * nb + kv // block)[valid]
        counts = torch.bincount(ids, minlength=nb * nb)
        everything = torch.arange(self.n)
        if self.num_prefix:
            # grid queries -> prefix keys, and prefix queries -> every key (the two sets are disjoint)
            ids = torch.cat([((q[:, None] // block) * nb + self.prefix_pos[None, :] // block).reshape(-1),
                             ((self.prefix_pos[:, None] // block) * nb + everything[None, :] // block).reshape(-1)])
            counts += torch.bincount(ids, minlength=nb * nb)
        # a block cut by the sequence end never counts as full (as in create_block_mask): the kernel's full-block path
        # is only trusted on whole blocks
        return counts.view(nb, nb), torch.full((nb, nb), block * block, dtype=torch.int64)

    def block_mask(self, block: int = FLEX_BLOCK):
        """FlexAttention ``BlockMask`` (batch and heads broadcast), partial and full blocks from exact pair counts."""
        from torch.nn.attention.flex_attention import BlockMask

        counts, capacity = self.pair_block_counts(block)
        full = counts == capacity  # every pair allowed: flex skips mask_mod there
        partial = (counts > 0) & ~full
        device = self.tensors["r"].device

        def table(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            num = sel.sum(1).to(torch.int32)
            idx = torch.argsort((~sel).to(torch.int8), dim=1, stable=True).to(torch.int32)  # selected first, ascending
            return num[None, None].to(device), idx[None, None].contiguous().to(device)

        kv_num, kv_idx = table(partial)
        full_num, full_idx = table(full)
        return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
                                        mask_mod=self.mask_mod(), seq_lengths=(self.n, self.n))


def neighbourhood_mask(grid_h: int, grid_w: int, kernel: Pair, num_prefix_tokens: int = 0, border: Border = "shift",
                       order: Optional[torch.Tensor] = None, device: Optional[torch.device] = None) -> torch.Tensor:
    """Boolean (N, N) mask of k x k neighbourhood attention, N = num_prefix_tokens + grid_h * grid_w; True = attend.

    Sequence layout: prefix tokens first, then the grid tokens in raster order (or ``order``, e.g. ``tile_order``'s
    ``perm``). ``border="shift"`` (default, NAT / NATTEN / HDiT): a query near the edge takes the k x k window moved
    inside the grid, so every grid query sees exactly kh * kw grid keys (the same receptive field everywhere, and the
    semantics of NATTEN's kernels); the mask is then symmetric only between queries at least k // 2 from the border.
    ``border="clip"``: the window is cut at the edge (fewer keys at the border, like a zero-padded convolution) and the
    mask is symmetric. A kernel at least as large as the grid gives global attention. Prefix rows and columns are all
    True.
    """
    return _Layout(grid_h, grid_w, kernel, num_prefix_tokens, border, order, device=device).dense()


def block_sparsity(grid_h: int, grid_w: int, kernel: Pair, num_prefix_tokens: int = 0,
                   order: Optional[torch.Tensor] = None, border: Border = "shift", prefix_last: bool = True,
                   block: int = FLEX_BLOCK) -> float:
    """Percentage of ``block x block`` (query, key) tiles with no allowed pair, which FlexAttention skips.

    Same definition as ``BlockMask.sparsity()``; computed from the geometry in O(N k^2).
    """
    layout = _Layout(grid_h, grid_w, kernel, num_prefix_tokens, border, order, prefix_last)
    counts, _ = layout.pair_block_counts(block)
    return 100.0 * (1.0 - (counts > 0).sum().item() / counts.numel())


def best_token_order(grid_h: int, grid_w: int, kernel: Pair, num_prefix_tokens: int = 0, border: Border = "shift",
                     block: int = FLEX_BLOCK) -> tuple[Optional[tuple[int, int]], float]:
    """The token order (``None`` = raster, else a tile shape) whose flex block table is sparsest, and that sparsity.

    Counted rather than assumed: raster order wins while a block is a whole number of rows (7 blocks per query block
    at 128 x 128 with a 7 x 7 kernel), 128-token tiles win once rows are wider than a block (at most 9 blocks).
    """
    best: tuple[Optional[tuple[int, int]], float] = (None, block_sparsity(
        grid_h, grid_w, kernel, num_prefix_tokens, None, border, block=block))
    for tile in TILE_CANDIDATES:
        perm, _ = tile_order(grid_h, grid_w, tile)
        s = block_sparsity(grid_h, grid_w, kernel, num_prefix_tokens, perm, border, block=block)
        if s > best[1] + 1e-9:
            best = (tile, s)
    return best


class _TiledPlan:
    """Index tensors of the "tiled" backend for one grid and kernel (built once per device, O(N (t + k - 1)^2)).

    Grid tokens (raster index) are grouped in ``t x t`` query tiles (T tiles, Q = t * t slots; edge tiles are padded
    with a repeat of one of their own tokens, whose output is dropped). Each tile's keys are the rectangle its queries'
    windows cover (K slots, padded likewise and masked out). ``query`` (T, Q) and ``key`` (T, K) are raster indices,
    ``allowed`` (T, Q, K) is the neighbourhood mask restricted to them and ``slot`` (N_grid,) is where each token's
    output sits in the flattened (T * Q) tile output.
    """

    def __init__(self, grid_h: int, grid_w: int, kernel: tuple[int, int], border: Border, tile: int,
                 device: Optional[torch.device]) -> None:
        kh, kw = kernel
        r = torch.arange(grid_h)
        c = torch.arange(grid_w)
        lo_r, hi_r = _windows(r, grid_h, kh, border)
        lo_c, hi_c = _windows(c, grid_w, kw, border)
        row_tiles = [torch.arange(s, min(s + tile, grid_h)) for s in range(0, grid_h, tile)]
        col_tiles = [torch.arange(s, min(s + tile, grid_w)) for s in range(0, grid_w, tile)]
        queries, keys, allowed = [], [], []
        q_slots, k_slots = tile * tile, 0
        for rows in row_tiles:
            key_rows = torch.arange(int(lo_r[rows].min()), int(hi_r[rows].max()))
            for cols in col_tiles:
                key_cols = torch.arange(int(lo_c[cols].min()), int(hi_c[cols].max()))
                qr, qc = rows.repeat_interleave(len(cols)), cols.repeat(len(rows))
                kr, kc = key_rows.repeat_interleave(len(key_cols)), key_cols.repeat(len(key_rows))
                ok = ((kr[None] >= lo_r[qr][:, None]) & (kr[None] < hi_r[qr][:, None])
                      & (kc[None] >= lo_c[qc][:, None]) & (kc[None] < hi_c[qc][:, None]))
                queries.append(qr * grid_w + qc)
                keys.append(kr * grid_w + kc)
                allowed.append(ok)
                k_slots = max(k_slots, len(kr))
        T = len(queries)
        self.query = torch.empty(T, q_slots, dtype=torch.int64)
        self.key = torch.empty(T, k_slots, dtype=torch.int64)
        self.allowed = torch.zeros(T, q_slots, k_slots, dtype=torch.bool)
        self.slot = torch.empty(grid_h * grid_w, dtype=torch.int64)
        for t, (q, k, ok) in enumerate(zip(queries, keys, allowed)):
            self.query[t, :len(q)], self.query[t, len(q):] = q, q[0]  # padding slots repeat the tile's first query
            self.key[t, :len(k)], self.key[t, len(k):] = k, k[0]  # padding keys stay masked out
            self.allowed[t, :len(q), :len(k)] = ok
            self.allowed[t, len(q):, 0] = True  # padding queries need one allowed key, else their softmax is NaN
            self.slot[q] = t * q_slots + torch.arange(len(q))
        for name in ("query", "key", "allowed", "slot"):
            setattr(self, name, getattr(self, name).to(device))


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _TiledPlan, num_prefix: int,
                    dropout_p: float = 0.0) -> torch.Tensor:
    """Neighbourhood attention by query tiles: (B, H, N, D) q, k, v in timm's layout -> (B, H, N, D).

    Grid queries attend to their tile's key rectangle plus the prefix keys; prefix queries attend to everything
    (P x N scores, linear in N). Same function as SDPA with the dense mask, up to float rounding.
    """
    B, H, N, D = q.shape
    P = num_prefix
    qg, kg, vg = q[:, :, P:], k[:, :, P:], v[:, :, P:]
    T, Q = plan.query.shape
    K = plan.key.shape[1]

    def tiles(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        # (B, H, N_grid, D) -> (B * T, H, slots, D)
        out = x.index_select(2, index.reshape(-1)).view(B, H, T, index.shape[1], D)
        return out.transpose(1, 2).reshape(B * T, H, index.shape[1], D)

    q_t, k_t, v_t = tiles(qg, plan.query), tiles(kg, plan.key), tiles(vg, plan.key)
    mask = plan.allowed
    if P:
        # every grid query also sees the prefix keys
        k_t = torch.cat([k[:, :, :P].unsqueeze(1).expand(B, T, H, P, D).reshape(B * T, H, P, D), k_t], dim=2)
        v_t = torch.cat([v[:, :, :P].unsqueeze(1).expand(B, T, H, P, D).reshape(B * T, H, P, D), v_t], dim=2)
        mask = torch.cat([mask.new_ones(T, Q, P), mask], dim=2)
    mask = mask.unsqueeze(0).expand(B, T, Q, K + P).reshape(B * T, 1, Q, K + P)
    out = F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=mask, dropout_p=dropout_p)
    out = out.view(B, T, H, Q, D).transpose(1, 2).reshape(B, H, T * Q, D).index_select(2, plan.slot)
    if P:
        prefix = F.scaled_dot_product_attention(q[:, :, :P], k, v, dropout_p=dropout_p)
        out = torch.cat([prefix, out], dim=2)
    return out


_compiled_flex: Optional[Callable] = None


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, compiled: bool) -> torch.Tensor:
    """flex_attention, compiled once per process (torch.compile caches a graph per shape)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention(q, k, v, block_mask=block_mask)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)


class LocalAttention(Attention):
    """timm ``Attention`` whose tokens attend only to their k x k grid neighbourhood (plus the prefix tokens).

    Subclasses timm's ``Attention`` so the parameters (``qkv``, ``q_norm``/``k_norm``, ``norm``, ``gate``, ``proj``),
    their initialisation and the constructor keywords a timm ``Block`` passes are exactly timm's: weights load both
    ways. ``forward(x)``: (B, N, C) -> (B, N, C) with N = ``num_prefix_tokens`` + grid_h * grid_w, prefix tokens
    first, grid tokens in raster order (timm's layout). Use :func:`local_attention_layer` to bind the extra
    arguments for a timm ``Block``'s ``attn_layer``.

    Args:
        dim, num_heads, **attn_kwargs: as timm's ``Attention`` (qkv_bias, qk_norm, attn_drop, proj_drop, norm_layer...).
        kernel: Neighbourhood size k (int or (kh, kw)), odd; >= the grid gives global attention.
        grid_size: Token grid (int or (grid_h, grid_w)).
        num_prefix_tokens: Leading class / register tokens, attending to and attended by all.
        border: "shift" (NAT windows moved inside the grid; default) or "clip" (see :func:`neighbourhood_mask`).
        backend: "flex" (FlexAttention + BlockMask), "tiled" (query tiles with a halo, see :func:`tiled_attention`),
            "sdpa_mask" (SDPA with the dense mask: the reference), or "auto": flex on CUDA, tiled everywhere else
            and whenever attention dropout is active (flex has none). On CPU tiled wins both ways: torch has no CPU
            flex backward, and forward it measured 4x faster than compiled flex (pit_local_mini, 4,096 tokens, one
            thread: 186 vs 788 ms per image); on the meta device it makes FLOP counts the linear path's.
        tile: Token order for the flex path: "auto" (the sparsest by :func:`best_token_order`), None (raster) or a
            tile shape. Internal only: the input and output stay in timm's layout.
        compile: Compile flex (default True: eager flex materialises the N x N scores, so it is never faster).
    """

    def __init__(self, dim: int, num_heads: int = 8, *, kernel: Pair = 7, grid_size: Optional[Pair] = None,
                 num_prefix_tokens: int = 0, border: Border = "shift", backend: Backend = "auto",
                 tile: Union[str, Pair, None] = "auto", compile: bool = True, **attn_kwargs) -> None:
        super().__init__(dim, num_heads=num_heads, **attn_kwargs)
        if grid_size is None:
            raise ValueError("LocalAttention needs grid_size (the token grid, e.g. img_size // patch_size)")
        if backend not in ("flex", "tiled", "sdpa_mask", "auto"):
            raise ValueError(f"backend must be 'flex', 'tiled', 'sdpa_mask' or 'auto', got {backend!r}")
        if border not in ("shift", "clip"):
            raise ValueError(f"border must be 'shift' or 'clip', got {border!r}")
        if backend == "flex" and self.attn_drop.p > 0:
            raise ValueError("backend='flex' has no attention dropout: use attn_drop=0, or backend='auto'/'sdpa_mask'")
        self.grid_size = _pair(grid_size, "grid_size")
        self.kernel = _check_kernel(kernel)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.border, self.backend, self.compile = border, backend, compile
        self.tile = tile
        # Per-device caches, not buffers: derived from the config, so kept out of state_dict and rebuilt on demand.
        self._dense_masks: dict[str, torch.Tensor] = {}
        self._flex_plans: dict[str, tuple] = {}
        self._tiled_plans: dict[str, _TiledPlan] = {}

    def set_grid_size(self, grid_size: Pair) -> None:
        """Attend over a new token grid (a new input resolution); the cached masks and plans are rebuilt lazily."""
        self.grid_size = _pair(grid_size, "grid_size")
        self._dense_masks, self._flex_plans, self._tiled_plans = {}, {}, {}

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]

    def extra_repr(self) -> str:
        return (f"kernel={self.kernel}, grid_size={self.grid_size}, num_prefix_tokens={self.num_prefix_tokens}, "
                f"border={self.border!r}, backend={self.backend!r}")

    def dense_mask(self, device: torch.device) -> torch.Tensor:
        """The (N, N) mask in the input layout, cached per device."""
        key = str(device)
        if key not in self._dense_masks:
            gh, gw = self.grid_size
            self._dense_masks[key] = neighbourhood_mask(gh, gw, self.kernel, self.num_prefix_tokens, self.border,
                                                        device=device)
        return self._dense_masks[key]

    def flex_plan(self, device: torch.device) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], object]:
        """(gather index into the flex order or None, its inverse, BlockMask), cached per device.

        The flex order is the grid in the chosen token order with the prefix tokens last, so the grid's blocks start
        at position 0 and stay aligned with tiles and rows.
        """
        key = str(device)
        if key not in self._flex_plans:
            gh, gw = self.grid_size
            tile = self.tile
            if tile == "auto":
                tile, _ = best_token_order(gh, gw, self.kernel, self.num_prefix_tokens, self.border)
            order = None if tile is None else tile_order(gh, gw, tile)[0]
            layout = _Layout(gh, gw, self.kernel, self.num_prefix_tokens, self.border, order, prefix_last=True,
                             device=device)
            grid = torch.arange(gh * gw) if order is None else order
            seq = torch.cat([grid + self.num_prefix_tokens, torch.arange(self.num_prefix_tokens)])
            identity = bool(torch.equal(seq, torch.arange(seq.numel())))  # raster, no prefix: nothing to move
            perm = None if identity else seq.to(device)
            inv = None if identity else torch.argsort(seq).to(device)
            self._flex_plans[key] = (perm, inv, layout.block_mask())
        return self._flex_plans[key]

    def tiled_plan(self, device: torch.device) -> _TiledPlan:
        """Index tensors of the tiled backend, cached per device."""
        key = str(device)
        if key not in self._tiled_plans:
            gh, gw = self.grid_size
            self._tiled_plans[key] = _TiledPlan(gh, gw, self.kernel, self.border, TILED_QUERY_TILE, device)
        return self._tiled_plans[key]

    def _apply(self, fn, recurse: bool = True):
        # .to() / .cuda() / .half(): drop the per-device caches (they are rebuilt lazily on the new device)
        self._dense_masks, self._flex_plans, self._tiled_plans = {}, {}, {}
        return super()._apply(fn, recurse)

    def resolve_backend(self, x: torch.Tensor) -> str:
        """The backend a call on ``x`` uses (see the class docstring for the "auto" rule)."""
        dropout = self.training and self.attn_drop.p > 0
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.qkv.weight.requires_grad)
        if self.backend == "flex":
            if x.device.type == "cpu" and needs_grad:
                raise RuntimeError(
                    f"backend='flex' cannot train on CPU: torch {torch.__version__} has no FlexAttention backward on "
                    "CPU. Use backend='sdpa_mask' or 'auto', or run under torch.no_grad().")
            return "flex"
        if self.backend in ("sdpa_mask", "tiled"):
            return self.backend
        if x.device.type == "cuda" and not dropout:
            return "flex"
        return "tiled"

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        """(B, N, C) -> (B, N, C); N must be num_prefix_tokens + grid_h * grid_w (the whole grid, raster order)."""
        if attn_mask is not None or is_causal:
            raise ValueError("LocalAttention builds its own neighbourhood mask: attn_mask / is_causal are not "
                             "supported")
        if x.ndim != 3:
            raise ValueError(f"LocalAttention expects (B, N, C) tokens, got shape {tuple(x.shape)}")
        B, N, C = x.shape
        if N != self.num_tokens:
            gh, gw = self.grid_size
            raise ValueError(
                f"LocalAttention got {N} tokens but its grid is {gh}x{gw} with {self.num_prefix_tokens} prefix "
                f"token(s) = {self.num_tokens}: local attention needs the whole grid in raster order (a subset, e.g. "
                "MAE's kept tokens or patch dropout, has no neighbourhoods), so refuse that pairing")
        backend = self.resolve_backend(x)
        perm = inv = block_mask = None
        if backend == "flex":
            perm, inv, block_mask = self.flex_plan(x.device)
            if perm is not None:
                x = x.index_select(1, perm)  # into the block-friendly order; every op until attention is per token
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if backend == "flex":
            x = _flex(q, k, v, block_mask, self.compile)
        elif backend == "tiled":
            x = tiled_attention(q, k, v, self.tiled_plan(x.device), self.num_prefix_tokens,
                                dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense_mask(x.device),
                                               dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        if inv is not None:
            x = x.index_select(1, inv)  # back to the input layout
        x = self.proj(x)
        return self.proj_drop(x)


def local_attention_layer(**defaults) -> type[LocalAttention]:
    """A ``LocalAttention`` subclass with ``defaults`` bound, for a timm ``Block(attn_layer=...)``.

    timm calls ``issubclass(attn_layer, ...)`` on it, so a ``functools.partial`` would fail; a subclass passes.
    Example: ``Block(dim, heads, attn_layer=local_attention_layer(kernel=7, grid_size=28, num_prefix_tokens=1))``.
    """
    unknown = set(defaults) - {"kernel", "grid_size", "num_prefix_tokens", "border", "backend", "tile", "compile"}
    if unknown:
        raise TypeError(f"local_attention_layer got unknown arguments {sorted(unknown)}")

    def __init__(self, dim: int, num_heads: int = 8, **kwargs) -> None:
        LocalAttention.__init__(self, dim, num_heads, **{**defaults, **kwargs})

    name = "LocalAttention_k{}".format("x".join(map(str, _pair(defaults.get("kernel", 7), "kernel"))))
    return type(name, (LocalAttention,), {"__init__": __init__, "__module__": __name__})
