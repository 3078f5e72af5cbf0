"""Episode files, the manifest and streaming datasets."""

from worldmodels.data.dataset import (
    count_frames,
    iterate_episodes,
    iterate_frame_batches,
    open_episodes,
    split_by_episode,
)
from worldmodels.data.episodes import Episode, InvalidEpisode, load_episode, write_episode
from worldmodels.data.manifest import ManifestEntry, read_manifest

__all__ = [
    "Episode",
    "InvalidEpisode",
    "ManifestEntry",
    "count_frames",
    "iterate_episodes",
    "iterate_frame_batches",
    "load_episode",
    "open_episodes",
    "read_manifest",
    "split_by_episode",
    "write_episode",
]
