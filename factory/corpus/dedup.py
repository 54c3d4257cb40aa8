"""The last MinHash step, aware of the held-out text.

datatrove's MinhashDedupCluster keeps one document per cluster, chosen by cluster size, not
by what the document is: a held-out document could be removed and its near-copy kept in the
training data, exactly the leak held-out loss must not have. Here held-out documents are
always kept, and a training document in a cluster with a held-out one is removed.
Reads datatrove's files: `<rank:06d>.remove` (uint32 document indices) and
`<rank:06d>.clusters` (uint32 index, uint32 cluster id pairs) of MinhashDedupCluster
(save_cluster_id=True).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from factory.corpus.steps import HELDOUT, OUT_KEY, SOURCE_KEY, count_out, label


def _uints(path: Path) -> list[int]:
    data = path.read_bytes() if path.is_file() else b""
    return list(struct.unpack(f"<{len(data) // 4}I", data))


def clusters_of(folder: Path, rank: int) -> dict[int, int]:
    """Document index -> cluster id, for the documents of `rank` that have a near-duplicate."""
    flat = _uints(folder / f"{rank:06d}.clusters")
    return dict(zip(flat[0::2], flat[1::2]))


def heldout_clusters(clean_shards: list[Path], folder: Path) -> list[int]:
    """The clusters holding a held-out document. Shard i of the sorted cleaned shards is the
    rank i the signatures were computed on."""
    out = set()
    for rank, shard in enumerate(clean_shards):
        clusters = clusters_of(folder, rank)
        if not clusters:
            continue
        with open(shard, encoding="utf-8") as f:
            for idx, line in enumerate(f):
                if idx in clusters and json.loads(line).get("metadata", {}).get(OUT_KEY) == HELDOUT:
                    out.add(clusters[idx])
    return sorted(out)


class NearDedupFilter(PipelineStep):
    """Drops near-duplicates (counted as `near_dedup:<source>:in/out`); see the module doc."""

    type = "🫂 - DEDUP"
    name = "near_dedup"

    def __init__(self, folder: str, held_clusters: list[int]):
        super().__init__()
        self.folder = folder
        self.held_clusters = set(held_clusters)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        remove = set(_uints(Path(self.folder) / f"{rank:06d}.remove"))
        clusters = clusters_of(Path(self.folder), rank) if self.held_clusters else {}
        for idx, doc in enumerate(data):
            src = doc.metadata.get(SOURCE_KEY, "")
            self.stat_update(label(self.name, src, "in"))
            dup = idx in remove or clusters.get(idx, -1) in self.held_clusters
            if dup and doc.metadata.get(OUT_KEY) != HELDOUT:
                self.stat_update(label(self.name, src, "dropped_near_duplicate"))
                continue
            count_out(self, self.name, doc)
            yield doc
