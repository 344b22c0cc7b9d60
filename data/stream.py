"""One (rank, worker) stream: raw samples of every source -> documents -> packed batches.

Resumable exactly. A source stream's position is (epoch, unit, sample) of the next tar sample
to read plus the shuffle block it is in; a block is `shuffle_buffer` raw samples (fewer once
they hold `shuffle_buffer_bytes`: a rule of the data alone, so a re-read block is the same)
permuted by a seed of their own, so resuming re-reads at most one block. The worker's state is
the source positions, the document counter (which seeds the mixture draw) and the skip
counters, taken just before the document that was being packed when the batch was cut, plus
how many of its tokens were already packed. Resuming replays that one document and drops
those tokens.
"""

from __future__ import annotations

import copy
from typing import Iterator

import numpy as np
import torch

from data.args import DataArgs
from data.decode import (
    DECODED_EXTS,
    SKIP_REASONS,
    TEXT_EXTS,
    DecodeOptions,
    SkipSample,
    decode_sample,
    drop_unused_members,
)
from data.packing import Packer
from data.shards import SHARD_ERRORS, ReadLimits, ReadUnit, plan_epoch, read_unit, resampled_unit, seeded_rng
from data.tokenizer import TokenizedDocument, Tokenizer, encode_document
from data.vision import max_tiles_for_length

# A stream that reads this many shards in a row without one good sample is misconfigured;
# raising beats spinning forever.
_MAX_EMPTY_UNITS = 64


class SourceStream:
    """Raw samples of one source for one stream, in a seeded order; error items included."""

    def __init__(self, urls: list[str], stream: int, num_streams: int, seed: int, source: int, args: DataArgs):
        self.urls, self.stream, self.num_streams, self.seed, self.source = urls, stream, num_streams, seed, source
        self.shuffle, self.block_size = args.shuffle, (args.shuffle_buffer if args.shuffle else 1)
        self.block_bytes = args.shuffle_buffer_bytes
        self.resample, self.epochs = args.resample, args.epochs
        self.limits = ReadLimits(
            max_member_bytes=args.max_member_bytes,
            max_sample_bytes=args.max_sample_bytes,
            max_text_bytes=args.max_text_bytes,
            exts=frozenset(DECODED_EXTS),
            text_exts=frozenset(TEXT_EXTS),
            allow_pipe=args.allow_pipe,
        )
        self._plans: dict[int, list[ReadUnit]] = {}
        self.load_state_dict({"block_start": [0, 0, 0], "block_index": 0, "emitted": 0})

    def _unit(self, epoch: int, pos: int) -> ReadUnit | None:
        if self.resample:
            return resampled_unit(self.urls, self.stream, self.seed, self.source, pos)
        if epoch not in self._plans:
            self._plans = {
                epoch: plan_epoch(self.urls, self.stream, self.num_streams, self.seed, self.source, epoch, self.shuffle)
            }
        plan = self._plans[epoch]
        return plan[pos] if pos < len(plan) else None

    def _reader(self, epoch: int, unit_pos: int, sample_pos: int) -> Iterator[tuple[dict, tuple[int, int, int]]]:
        """(raw item, position after it) from a position on, across units and epochs.

        The "no usable sample" checks judge only what this reader read from the start: a reader
        resumed mid-epoch (or at an epoch's or a unit's very end) has not seen the good samples
        before its start position, so the epoch or unit it starts in is not evidence of bad data.
        """
        whole_epoch = unit_pos == 0 and sample_pos == 0
        good_in_epoch, empty_units = 0, 0
        while self.epochs is None or epoch < self.epochs:
            unit = self._unit(epoch, unit_pos)
            if unit is None:  # end of epoch
                if whole_epoch and good_in_epoch == 0 and self.epochs is None:
                    raise RuntimeError(self._no_data_message())
                epoch, unit_pos, sample_pos, good_in_epoch, whole_epoch = epoch + 1, 0, 0, 0, True
                continue
            whole_unit, good_in_unit = sample_pos == 0, 0
            for index, item in read_unit(unit, sample_pos, self.limits):
                if item.get("__error__") in SHARD_ERRORS:
                    yield item, (epoch, unit_pos + 1, 0)
                elif "__error__" in item:  # one sample over a budget: the shard goes on
                    yield item, (epoch, unit_pos, index + 1)
                else:
                    good_in_unit += 1
                    yield item, (epoch, unit_pos, index + 1)
            good_in_epoch += good_in_unit
            if good_in_unit:
                empty_units = 0
            elif whole_unit:
                empty_units += 1
            if self.resample and empty_units >= _MAX_EMPTY_UNITS:
                raise RuntimeError(self._no_data_message())
            unit_pos, sample_pos = unit_pos + 1, 0

    def _no_data_message(self) -> str:
        return (
            f"data: stream {self.stream} of {self.num_streams} read no usable sample from source {self.source} "
            f"({len(self.urls)} shards, first {self.urls[0]!r}); check the urls, or use fewer ranks x workers "
            f"than shards (see the skipped counters for what was wrong)"
        )

    def next_item(self) -> dict | None:
        """The next raw sample or error item; None when a finite number of epochs is done."""
        if self._block is None or self._emitted >= len(self._block):
            if self._block is not None:
                self._block_index += 1
            self._fill()
            if not self._block:
                return None
        item = self._block[self._order[self._emitted]]
        self._emitted += 1
        return item

    def _fill(self) -> None:
        self._block_start = self._read_pos
        if self._reader_it is None:
            self._reader_it = self._reader(*self._read_pos)
        block, nbytes = [], 0
        for item, pos in self._reader_it:
            if "__error__" not in item:
                item = drop_unused_members(item)
                nbytes += sum(len(v) for k, v in item.items() if not k.startswith("__"))
            block.append(item)
            self._read_pos = pos
            if len(block) >= self.block_size or nbytes >= self.block_bytes:
                break
        self._block = block
        self._order = (
            seeded_rng(self.seed, self.source, self.stream, self._block_index, 0xB10C).permutation(len(block))
            if self.block_size > 1
            else np.arange(len(block))
        )
        self._emitted = 0

    def state_dict(self) -> dict:
        if self._block is None or self._emitted >= len(self._block):  # between blocks: nothing to replay
            index = self._block_index + (1 if self._block is not None else 0)
            return {"block_start": list(self._read_pos), "block_index": index, "emitted": 0}
        return {"block_start": list(self._block_start), "block_index": self._block_index, "emitted": self._emitted}

    def load_state_dict(self, state: dict) -> None:
        self._read_pos = tuple(int(x) for x in state["block_start"])
        self._block_start = self._read_pos
        self._block_index = int(state["block_index"])
        self._reader_it = None
        self._block, self._order, self._emitted = None, None, 0
        skip = int(state["emitted"])
        if skip:
            self._fill()
            self._emitted = min(skip, len(self._block))


class WorkerStream:
    """Batches of one (rank, worker) stream; iterate to get (batch, state) pairs."""

    def __init__(
        self,
        args: DataArgs,
        urls: list[list[str]],
        rank: int,
        world_size: int,
        worker: int,
        num_workers: int,
        batch_size: int,
        seq_len: int,
        seed: int,
        tokenizer: Tokenizer,
    ):
        self.args, self.tok, self.seed = args, tokenizer, seed
        self.stream = rank * num_workers + worker
        num_streams = world_size * num_workers
        self.sources = [SourceStream(u, self.stream, num_streams, seed, i, args) for i, u in enumerate(urls)]
        self.weights = np.array([s.weight for s in args.resolved_sources()], dtype=np.float64)
        self.active = [True] * len(self.sources)
        dtype = getattr(torch, args.image_dtype)
        # An image block must fit in one row, so the tile budget shrinks with short rows.
        max_tiles = max_tiles_for_length(args.max_tiles, seq_len, args.patches_per_tile)
        self.opts = DecodeOptions(
            max_tiles=max_tiles,
            tile_size=args.tile_size,
            video_fps=args.video_fps,
            video_max_frames=args.video_max_frames,
            max_image_pixels=args.max_image_pixels,
            max_video_decode_frames=args.max_video_decode_frames,
            dtype=dtype,
            max_text_bytes=args.max_text_bytes,
            max_media_per_sample=args.max_media_per_sample,
            max_sample_pixels=args.max_sample_pixels,
            max_video_decode_seconds=args.max_video_decode_seconds,
        )
        self.packer = Packer(
            batch_size, seq_len, tokenizer.ids.pad, args.reset_positions, (3, args.tile_size, args.tile_size), dtype
        )
        self.draws = 0  # samples drawn so far, good or bad; seeds the mixture draw
        self.documents = 0  # documents tokenized so far
        self.counters = {k: 0 for k in SKIP_REASONS}
        self._carry_state: dict | None = None  # state before the document the packer holds

    # -- documents -------------------------------------------------------------------------
    def _live_state(self) -> dict:
        return {
            "sources": [s.state_dict() for s in self.sources],
            "active": list(self.active),
            "draws": self.draws,
            "documents": self.documents,
            "counters": dict(self.counters),
        }

    def _pick_source(self) -> int:
        live = [i for i, a in enumerate(self.active) if a]
        if len(live) == 1:
            return live[0]
        w = self.weights[live] / self.weights[live].sum()
        return live[int(seeded_rng(self.seed, self.stream, self.draws, 0x313C).choice(len(live), p=w))]

    def next_document(self) -> TokenizedDocument | None:
        self._carry_state = self._live_state()
        while any(self.active):
            i = self._pick_source()
            self.draws += 1
            item = self.sources[i].next_item()
            if item is None:
                self.active[i] = False
                continue
            if "__error__" in item:
                self.counters[item["__error__"]] += 1
                continue
            try:
                segments = decode_sample(item, self.opts)
            except SkipSample as skip:
                self.counters[skip.reason] += 1
                continue
            self.documents += 1
            return encode_document(self.tok, segments, self.args.tile_size, self.args.patches_per_tile)
        return None

    # -- batches and state -----------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.packer.doc is not None:
            return {
                "stream": copy.deepcopy(self._carry_state),
                "offset": self.packer.offset,
                "dropped_media": self.packer.dropped_media,
            }
        return {"stream": self._live_state(), "offset": None, "dropped_media": self.packer.dropped_media}

    def load_state_dict(self, state: dict) -> None:
        st = state["stream"]
        for s, sd in zip(self.sources, st["sources"]):
            s.load_state_dict(sd)
        self.active, self.draws, self.documents = list(st["active"]), int(st["draws"]), int(st["documents"])
        self.counters.update(st["counters"])
        self.packer.dropped_media = int(state.get("dropped_media", 0))
        if state["offset"] is not None:
            doc = self.next_document()  # replays the document that was cut at the batch boundary
            self.packer.set_carry(doc, int(state["offset"]))

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        """(batch, state) pairs; a finite stream ends with ({"_done": True, counters}, state) so
        the skips after its last batch (or of a stream that never filled one) are reported."""
        while True:
            batch = self.packer.next_batch(self.next_document)
            self.counters["media_too_long"] = self.packer.dropped_media
            done = batch is None
            batch = {"_done": True} if done else batch
            batch["skipped"] = dict(self.counters)
            batch["documents"] = self.documents
            yield batch, self.state_dict()
            if done:
                return
